"""Puts the repository root on sys.path and points the data code at the real files beside it.

Omniglot is fetched through a file:// mirror of ../shared/data/omniglot, the same code path as
a real download, into the repository's data/omniglot (prepared once, then cached).
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'
sys.path.insert(0, str(ROOT))
os.environ.setdefault('OMNIGLOT_MIRROR', (SHARED_DATA / 'omniglot').as_uri())
os.environ.setdefault('OMNIGLOT_DIR', str(ROOT / 'data' / 'omniglot'))

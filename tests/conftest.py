"""Puts the repository root on sys.path: tests import its top-level modules however pytest runs."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

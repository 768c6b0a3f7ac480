"""Puts the repository root on sys.path and points the data code at the real files beside it.

Omniglot is fetched through a file:// mirror of ../shared/data/omniglot, the same code path as
a real download, into the repository's data/omniglot (prepared once, then cached). The TDC
Metabolism files of ../shared/data/metabolism/raw_tdc are built once per test session (about
half a minute, the `built` fixture), for every test file that needs them.
"""
import contextlib
import io
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'
RAW = SHARED_DATA / 'metabolism' / 'raw_tdc'
sys.path.insert(0, str(ROOT))
os.environ.setdefault('OMNIGLOT_MIRROR', (SHARED_DATA / 'omniglot').as_uri())
os.environ.setdefault('OMNIGLOT_DIR', str(ROOT / 'data' / 'omniglot'))
if os.environ.get('PYTEST_XDIST_WORKER'):  # pytest.ini runs a worker per core (-n auto):
    os.environ['OMP_NUM_THREADS'] = '1'  # one thread each, for it and what it starts


@pytest.fixture
def one_thread():
    """Tiny tensors run faster on one thread, and much faster on a busy machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def built(tmp_path_factory):
    """(datadir, data, printed output, seconds): all 8 real files built through a file:// mirror."""
    import metabolism  # here, not above: only the sessions that need it pay for RDKit
    assert RAW.is_dir(), f'{RAW} is missing: the tests need ../shared beside the repository'
    datadir = tmp_path_factory.mktemp('metabolism')
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setenv('TDC_MIRROR', RAW.as_uri())
        start = time.perf_counter()
        data = metabolism.load_metabolism(datadir)
        seconds = time.perf_counter() - start
    print(f'\nbuilding all 8 TDC files took {seconds:.1f} s')
    return datadir, data, out.getvalue(), seconds


@pytest.fixture(scope='session')
def omniglot_batch():
    """A function (batch_size, num_way, num_support, num_query, seed=0) -> a fixed batch of
    real Omniglot training tasks (a list of task tuples)."""
    import omniglot

    def first_batch(batch_size, num_way, num_support, num_query, seed=0):
        return next(iter(omniglot.get_omniglot_dataloader(
            'train', batch_size, num_way, num_support, num_query, batch_size, seed=seed)))
    return first_batch

"""Puts the repository root on sys.path and points the data code at the real files beside it.

Omniglot is fetched through a file:// mirror of ../shared/data/omniglot, the same code path as
a real download, into the repository's data/omniglot (prepared once, then cached). The TDC
Metabolism files of ../shared/data/metabolism/raw_tdc are built once per test run (about
15 s, the `built` fixture), for every test file that needs them.
"""
import contextlib
import fcntl
import io
import json
import os
import shutil
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


class Payload:
    """Pickles as a call of os.system: unpickling it runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def one_thread():
    """Tiny tensors run faster on one thread, and much faster on a busy machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_line_error(capsys):
    """A function: main -> the one line util.cli prints on stderr as main() is refused, with
    exit status 2 (as `python script.py` is)."""
    import util

    def refused(main):
        with pytest.raises(SystemExit) as exit:
            util.cli(main)
        assert exit.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error: '), lines
        return lines[0]
    return refused


@pytest.fixture(scope='session')
def built(tmp_path_factory):
    """(datadir, data, printed output, seconds): all 8 real files built through a file://
    mirror, once for all of pytest-xdist's workers (under a lock, in the folder they share),
    then copied into a datadir of this worker's own, which the printed output names."""
    import metabolism  # here, not above: only test runs that need it pay for RDKit
    assert RAW.is_dir(), f'{RAW} is missing: the tests need ../shared beside the repository'
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        shared = shared.parent  # the workers' basetemps are its subfolders
    record = shared / 'metabolism_build.json'
    with open(shared / 'metabolism_build.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.is_file():
            out = io.StringIO()
            with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
                patch.setenv('TDC_MIRROR', RAW.as_uri())
                start = time.perf_counter()
                metabolism.load_metabolism(shared / 'metabolism')
                seconds = time.perf_counter() - start
            record.write_text(json.dumps({'printed': out.getvalue(), 'seconds': seconds}))
    datadir = tmp_path_factory.mktemp('metabolism')
    shutil.copytree(shared / 'metabolism', datadir, dirs_exist_ok=True)
    build = json.loads(record.read_text())
    print(f'\nbuilding all 8 TDC files took {build["seconds"]:.1f} s')
    out = build['printed'].replace(str(shared / 'metabolism'), str(datadir))
    with contextlib.redirect_stdout(io.StringIO()):
        data = metabolism.load_metabolism(datadir)
    return datadir, data, out, build['seconds']


@pytest.fixture(scope='session')
def omniglot_batch():
    """A function (batch_size, num_way, num_support, num_query, seed=0) -> a fixed batch of
    real Omniglot training tasks (a list of task tuples)."""
    import omniglot

    def first_batch(batch_size, num_way, num_support, num_query, seed=0):
        return next(iter(omniglot.get_omniglot_dataloader(
            'train', batch_size, num_way, num_support, num_query, batch_size, seed=seed)))
    return first_batch

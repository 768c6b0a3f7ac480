"""Puts the repository root on sys.path and points the data code at the real data.

The sources, first found first: ../shared/data beside the repository (its omniglot and
metabolism/raw_tdc folders, as file:// mirrors); else the mirrors that OMNIGLOT_MIRROR and
TDC_MIRROR name; else the official downloads. Whatever the source, the files are fetched as the
scripts fetch them, into the repository's data/omniglot and data/metabolism (once per machine,
then cached there). With no source reachable, the first test that needs the data stops the
suite with one line saying what to set. The TDC files are built once per test run (about 15 s,
the `built` fixture), for every test file that needs them.
"""
import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'
DATA = ROOT / 'data'  # where the scripts cache what they download, run from the repository
NO_SOURCE = ('the tests cannot reach their data: set OMNIGLOT_MIRROR and TDC_MIRROR to folders '
             'or file:// URLs holding the official files (README), or put shared/data beside '
             'the repository')
STOPPED = 'stopped at the first test without its data'
sys.path.insert(0, str(ROOT))
SHARED_RAW = SHARED_DATA / 'metabolism' / 'raw_tdc'
for variable, shared in [('OMNIGLOT_MIRROR', SHARED_DATA / 'omniglot'), ('TDC_MIRROR', SHARED_RAW)]:
    if shared.is_dir():
        os.environ[variable] = shared.as_uri()
TDC_MIRROR = os.environ.get('TDC_MIRROR')  # test files may point TDC_MIRROR elsewhere later
os.environ.setdefault('OMNIGLOT_DIR', str(DATA / 'omniglot'))
if os.environ.get('PYTEST_XDIST_WORKER'):  # pytest.ini runs a worker per core (-n auto):
    os.environ['OMP_NUM_THREADS'] = '1'  # one thread each, for it and what it starts


class Payload:
    """Pickles as a call of os.system: unpickling it runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that fails because the data could not be downloaded stops the suite (every later
    data test would fail the same way), its failure shortened to one line saying what to set.
    Through session.shouldstop, which pytest-xdist's workers pass on to the main process."""
    import util
    report = yield
    error = call.excinfo and call.excinfo.value
    if isinstance(error, util.UserError) and str(error).startswith(util.DOWNLOAD_FAILED):
        report.longrepr = f'{NO_SOURCE} ({error})'
        item.session.shouldstop = STOPPED
    return report


@pytest.fixture(scope='session')
def omniglot_zips():
    """The folder of the two official Omniglot zips (OMNIGLOT_DIR), fetched if missing."""
    import omniglot
    return omniglot.fetch_zips(omniglot.data_dir())[0].parent


@pytest.fixture(scope='session')
def tdc_raw():
    """The folder of the 8 raw TDC files: ../shared's, else data/metabolism, fetched into it
    from TDC_MIRROR or the official source if missing."""
    import metabolism  # here, not above: only test runs that need it pay for RDKit
    if SHARED_RAW.is_dir():
        return SHARED_RAW
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv('TDC_MIRROR', raising=False)
        if TDC_MIRROR:
            patch.setenv('TDC_MIRROR', TDC_MIRROR)
        metabolism.fetch_tables(DATA / 'metabolism')
    return DATA / 'metabolism'


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
def built(tmp_path_factory, tdc_raw):
    """(datadir, data, printed output, seconds): all 8 real files built through a file://
    mirror of tdc_raw, once for all of pytest-xdist's workers (under a lock, in the folder they share),
    then copied into a datadir of this worker's own, which the printed output names."""
    import metabolism  # here, not above: only test runs that need it pay for RDKit
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        shared = shared.parent  # the workers' basetemps are its subfolders
    record = shared / 'metabolism_build.json'
    with open(shared / 'metabolism_build.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.is_file():
            out = io.StringIO()
            with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
                patch.setenv('TDC_MIRROR', tdc_raw.as_uri())
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
    real Omniglot training tasks (a sampling.TaskBatch: to the assignment, a list of task
    tuples)."""
    import omniglot

    def first_batch(batch_size, num_way, num_support, num_query, seed=0):
        return next(iter(omniglot.get_omniglot_dataloader(
            'train', batch_size, num_way, num_support, num_query, batch_size, seed=seed)))
    return first_batch


GRADESCOPE_VISIBILITIES = ('hidden', 'after_due_date', 'after_published', 'visible')


def assert_gradescope_results(path, score, max_score):
    """path holds a results.json as Gradescope documents it (gradescope-autograders.readthedocs
    .io/en/latest/specs/#output-format): a number `score` (here the tests' sum), a string
    `output`, and `tests`, each with a string `name`, number `score` and `max_score`, `status`
    passed or failed, a `visibility` of Gradescope's four and a string `output`."""
    results = json.loads(Path(path).read_text())
    assert set(results) == {'score', 'output', 'tests'}
    assert isinstance(results['output'], str)
    for test in results['tests']:
        assert set(test) == {'name', 'score', 'max_score', 'status', 'visibility', 'output'}
        assert all(isinstance(test[key], str) for key in ('name', 'output'))
        assert all(type(test[key]) in (int, float) for key in ('score', 'max_score'))
        assert test['status'] == ('passed' if test['score'] == test['max_score'] else 'failed')
        assert test['visibility'] in GRADESCOPE_VISIBILITIES
    assert results['score'] == sum(test['score'] for test in results['tests']) == score
    assert sum(test['max_score'] for test in results['tests']) == max_score
    return results


def assert_graded_in_full(output, results):
    """grader.py's printed grading of every test (output) and its parsed results.json: each
    test framed as the assignment's grader frames it, with full marks, then the total; in
    results, hidden tests published after the deadline, visible ones at once."""
    import grader
    for test_id, points in grader.POINTS.items():
        assert f'----- START {test_id}: ' in output
        assert re.search(rf'----- END {test_id} \[took [\d:.]+ \(max allowed \d+ seconds\), '
                         rf'{points}/{points} points\]', output)
    total = sum(grader.POINTS.values())
    assert output.rstrip().endswith(f'========== END GRADING [{total}/{total} points]')
    assert {test['name'].split(':')[0]: (test['visibility'], test['output'])
            for test in results['tests']} == {
        test_id: ('after_published' if grader.is_hidden(test_id) else 'visible', 'passed')
        for test_id in grader.POINTS}

"""A copy of the repository with nothing beside it, as a user's clone: its tests fetch their
data through the mirrors that OMNIGLOT_MIRROR and TDC_MIRROR name, and with no source at all
they stop in one line."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import NO_SOURCE, ROOT

DATA_TESTS = ['tests/test_omniglot.py::test_download_through_file_mirror_gives_the_same_bytes',
              'tests/test_metabolism_data.py::test_fingerprints_match_rdkit_bits']
UNREACHABLE_PROXY = 'http://127.0.0.1:9'  # the discard port: the connection is refused at once


@pytest.fixture
def clone(tmp_path):
    """The repository's tracked files, copied into tmp_path/clone (nothing beside it)."""
    if shutil.which('git') is None or not (ROOT / '.git').exists():
        pytest.skip('not a git checkout')
    files = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split('\0')
    for name in filter(None, files):
        (tmp_path / 'clone' / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / 'clone' / name)
    return tmp_path / 'clone'


def pytest_in(clone, *tests, **env):
    """Runs pytest on tests in clone, one process, in this environment less our data variables
    and plus env."""
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith(('OMNIGLOT_', 'TDC_', 'PYTEST_'))}
    return subprocess.run([sys.executable, '-m', 'pytest', '-q', '-n', '0', *tests], cwd=clone,
                          capture_output=True, text=True, env={**clean, **env}, timeout=300)


def test_a_clone_fetches_its_data_through_file_mirrors(clone, omniglot_zips, tdc_raw):
    result = pytest_in(clone, *DATA_TESTS, OMNIGLOT_MIRROR=omniglot_zips.as_uri(),
                       TDC_MIRROR=tdc_raw.as_uri())
    assert result.returncode == 0 and '2 passed' in result.stdout, result.stdout + result.stderr
    assert (clone / 'data' / 'omniglot' / 'images_background.zip').read_bytes() == (
        omniglot_zips / 'images_background.zip').read_bytes()
    assert (clone / 'data' / 'metabolism' / 'cyp1a2_veith.tab').is_file()


def test_a_clone_without_any_source_stops_in_one_line(clone):
    result = pytest_in(clone, DATA_TESTS[0], 'tests/test_layers.py', http_proxy=UNREACHABLE_PROXY,
                       https_proxy=UNREACHABLE_PROXY, no_proxy='')
    assert result.returncode == 2, result.stdout + result.stderr
    # The error's report, between its header and the summary (which repeats it, cut to the
    # terminal's width unless CI is set), is the one line: no traceback.
    report = result.stdout.split('ERROR at setup')[1].split('short test summary')[0]
    lines = report.splitlines()[1:-1]
    assert len(lines) == 1 and NO_SOURCE in lines[0] and 'OMNIGLOT_MIRROR' in lines[0], result.stdout
    assert 'passed' not in result.stdout  # it stopped there: test_layers.py never ran

"""homework.py: the students' starter (blanks filled with the solution's regions give back the
solution byte for byte; its scripts stop in one line at their first blank; its grader skips the
hidden tests) and the Gradescope autograder (on the solution, a broken submission, the bare
starter and a submission that does not import)."""
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT, assert_graded_in_full, assert_gradescope_results

import grader
import homework
import util

# The file whose code each of the assignment's questions grades.
QUESTION_FILES = {'1b': 'protonet.py', '2a': 'maml.py', '2b': 'maml.py'}
QUICK_TESTS = ['1b-0-hidden', '2a-0-basic', '2a-2-basic']  # 14 of the 32 points
BROKEN = ('    prototypes = sums / one_hot.sum(1).unsqueeze(-1)\n',
          '    prototypes = sums / one_hot.shape[1]\n')  # divided by the examples, not K


def is_marked(name):
    return bool(homework.find_regions((ROOT / name).read_text(), name))


def blanked_points(test_ids):
    """The points of those tests whose file has graded regions (blank in the starter)."""
    return sum(grader.POINTS[test_id] for test_id in test_ids
               if is_marked(QUESTION_FILES[test_id[:2]]))


def run(cwd, *args, **env):
    """Runs a command in cwd, one thread; the CompletedProcess, text output."""
    return subprocess.run([str(arg) for arg in args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1', **env))


@pytest.fixture(scope='module')
def starter(tmp_path_factory):
    out = tmp_path_factory.mktemp('homework') / 'starter'
    homework.write_starter(out)
    return out


# ----- the regions -----
REGIONS = '''import util


class Learner:
    def step(self, batch):
        with open(batch) as file:
            ### START CODE HERE ###
            # Read the batch.
            text = file.read()
            size = len(text)
            ### END CODE HERE ###
        return size

    def reset(self):
        ### START CODE HERE ###
        self.count = 0
        ### END CODE HERE ###


def double(x):
    ### START CODE HERE ###
    return 2 * x
    ### END CODE HERE ###
'''


def test_any_number_of_regions_blank_with_what_they_owe_and_fill_back():
    regions = homework.find_regions(REGIONS, 'learner.py')
    assert [(region.name, region.indent) for region in regions] == [
        ('Learner.step', ' ' * 12), ('Learner.reset', ' ' * 8), ('double', ' ' * 4)]
    blank = homework.blank(REGIONS, 'learner.py')
    assert blank == REGIONS.replace('''            text = file.read()
            size = len(text)
''', '''            # TODO: assign size (the code below uses it).
            raise util.UserError(
                'complete Learner.step in learner.py: its CODE HERE region is blank')
''').replace('''        self.count = 0
''', '''        # TODO: write what is missing here.
        raise util.UserError(
            'complete Learner.reset in learner.py: its CODE HERE region is blank')
''').replace('''    return 2 * x
''', '''    # TODO: return what the docstring says.
    raise util.UserError(
        'complete double in learner.py: its CODE HERE region is blank')
''')
    assert homework.fill(blank, REGIONS, 'learner.py') == REGIONS


@pytest.mark.parametrize('text, line', [
    (REGIONS.replace('            ### END CODE HERE ###\n', '', 1), '14: ### START'),
    (REGIONS.replace('    ### START CODE HERE ###\n    return', '    return'), '22: ### END'),
    ('### START CODE HERE ###\n### END CODE HERE ###\n', '1: ### START CODE HERE ### outside')])
def test_a_marker_out_of_place_is_one_line_naming_file_and_line(text, line):
    with pytest.raises(util.UserError, match=f'^learner.py:{line}'):
        homework.find_regions(text, 'learner.py')


def test_a_file_whose_blanks_could_not_raise_is_refused_in_one_line():
    with pytest.raises(util.UserError, match='^learner.py has graded regions but does not '
                                             'import util'):
        homework.blank(REGIONS.replace('import util\n', ''), 'learner.py')


@pytest.mark.parametrize('write', [homework.write_starter, homework.write_autograder])
def test_starter_and_autograder_refuse_an_existing_path(tmp_path, write):
    with pytest.raises(util.UserError, match=f'^{tmp_path} already exists; name a new path'):
        write(tmp_path)


# ----- the starter -----
def test_the_starter_is_the_solution_with_blanks_that_fill_back_byte_for_byte(starter):
    expected = sorted(name for name in homework.tracked_files()
                      if not name.startswith(homework.INSTRUCTOR_ONLY))
    assert sorted(str(path.relative_to(starter)) for path in starter.rglob('*')
                  if path.is_file() and '__pycache__' not in path.parts) == expected
    assert {'grader.py', 'points.json'} <= set(expected) and 'reference.py' not in expected
    assert not {'docs/HANDOUT.md', 'docs/RESULTS.md'} & set(expected)  # our answers
    assert not any(name.startswith(('figures/', 'docs/test_results/')) for name in expected)  # our results
    for name in expected:
        solution = (ROOT / name).read_bytes()
        if name in homework.GRADED_FILES:
            blank = (starter / name).read_text()
            assert (blank != solution.decode()) == is_marked(name), name
            assert homework.fill(blank, solution.decode(), name).encode() == solution
        else:
            assert (starter / name).read_bytes() == solution, name


SCRIPTS = [  # (script and flags but the log folder's, the function its first blank names)
    (['protonet.py', '--num_train_iterations', '2', '--batch_size', '2'], 'ProtoNet._step'),
    (['maml_transfer.py', '--num_train_iterations', '2', '--batch_size', '4'], 'transfer_learn'),
    (['run_metabolism.py', '--batch_size', '2'], 'ProtoNet._step'),
    (['experiments.py', '--scale', 'tiny', '--only', 'protonet_5shot'], 'ProtoNet._step'),
    (['maml.py', '--num_train_iterations', '2', '--batch_size', '2'], 'MAML._task')]


@pytest.mark.parametrize('script, name', SCRIPTS)
def test_each_starter_script_stops_in_one_line_at_its_first_blank(starter, request, tmp_path,
                                                                   script, name):
    datadir = (['--datadir', request.getfixturevalue('built')[0]]
               if script[0] == 'run_metabolism.py' else [])
    log_dir = '--log_root' if script[0] == 'experiments.py' else '--log_dir'
    result = run(starter, sys.executable, *script, *datadir, log_dir, tmp_path / 'logs')
    assert result.returncode == 2
    line = f'error: complete {name} in {name_file(name)}: its CODE HERE region is blank'
    lines = result.stderr.splitlines()
    if script[0] == 'experiments.py':  # runs protonet.py under a progress bar (on stderr)
        line = f'error: protonet_5shot failed ({line}); its output is in {tmp_path}'
        lines = lines[-1:]
    (stderr,) = lines
    assert stderr.startswith(line) and 'Traceback' not in result.stderr


def name_file(name):
    """The graded file whose region a qualified name's blank is in."""
    return next(path for path in homework.GRADED_FILES
                if name in {region.name for region in homework.find_regions(
                    (ROOT / path).read_text(), path)})


def test_the_starters_grader_skips_the_hidden_tests_and_scores_the_visible_ones(starter):
    result = run(starter, sys.executable, 'grader.py')
    hidden = [test_id for test_id in grader.POINTS if grader.is_hidden(test_id)]
    visible = [test_id for test_id in grader.POINTS if not grader.is_hidden(test_id)]
    lines = result.stdout.splitlines()
    assert [line.split(':')[0] for line in lines if line.startswith('----- SKIP')] == [
        f'----- SKIP {test_id}' for test_id in hidden]
    assert [line.split(':')[0] for line in lines if line.startswith('----- START')] == [
        f'----- START {test_id}' for test_id in visible]
    got = 13 - blanked_points(visible)
    assert lines[-1] == f'========== END GRADING [{got}/13 points]'


# ----- the autograder -----
@pytest.fixture(scope='module')
def autograder_zip(tmp_path_factory):
    path = tmp_path_factory.mktemp('autograder') / 'autograder.zip'
    homework.write_autograder(path)
    return path


def autograde(zip_path, root, submission, *test_ids):
    """Runs run_autograder as Gradescope does, in root instead of /autograder: the zip in
    root/source, the submission's {name: text} in root/submission. (CompletedProcess, path of
    results.json.)"""
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(root / 'source')
    (root / 'submission').mkdir()
    for name, text in submission.items():
        (root / 'submission' / name).write_text(text)
    result = run(root, 'bash', root / 'source' / 'run_autograder', *test_ids,
                 AUTOGRADER_ROOT=str(root))
    return result, root / 'results' / 'results.json'


def test_the_autograder_zip_holds_setup_and_run_autograder_at_its_root(autograder_zip):
    with zipfile.ZipFile(autograder_zip) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        setup = archive.read('setup.sh').decode()
    for name in ('setup.sh', 'run_autograder'):
        assert infos[name].external_attr >> 16 == 0o100755
    assert {'reference.py', 'grader.py', 'points.json', 'requirements.txt'} <= set(infos)
    assert not any(name.startswith(('tests/', 'benchmarks/')) for name in infos)
    assert '/bin/pip" install -r requirements.txt\n' in setup
    assert subprocess.run(['bash', '-n'], input=setup, text=True).returncode == 0


def test_setup_refuses_a_python_older_than_3_11_in_one_line(autograder_zip, tmp_path):
    """Gradescope's older base images carry Python 3.10 or less, where pip would fail later."""
    with zipfile.ZipFile(autograder_zip) as archive:
        archive.extract('setup.sh', tmp_path)
    (tmp_path / 'bin').mkdir()
    (tmp_path / 'bin' / 'python3').write_text(
        '#!/bin/sh\n[ "$1" = --version ] && echo Python 3.10.12 || exit 1\n')
    (tmp_path / 'bin' / 'python3').chmod(0o755)
    result = run(tmp_path, 'bash', tmp_path / 'setup.sh', AUTOGRADER_ROOT=str(tmp_path),
                 PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}')
    assert result.returncode == 2 and not (tmp_path / 'venv').exists()
    assert result.stderr == ("error: this image's python3 is 3.10.12; the pinned requirements "
                             "need 3.11 or newer: pick a newer base image (Ubuntu 24.04) in "
                             "Gradescope's autograder settings\n")


def test_setup_installs_the_pinned_requirements_in_a_venv_then_caches_omniglot(autograder_zip,
                                                                              tmp_path):
    """setup.sh's commands, each recorded by a stand-in (the real ones need the network)."""
    with zipfile.ZipFile(autograder_zip) as archive:
        archive.extractall(tmp_path / 'source')
    assert (tmp_path / 'source' / 'requirements.txt').read_text() == (
        ROOT / 'requirements.txt').read_text()
    log, bin_folder = tmp_path / 'commands.log', tmp_path / 'bin'
    bin_folder.mkdir()
    record = f'echo "$(basename "$0") $* (in $(pwd))" >> {log}\n'
    (bin_folder / 'record').write_text('#!/bin/sh\n' + record)
    (bin_folder / 'python3').write_text(  # as `python3 -m venv DIR`, it makes DIR's recorders
        '#!/bin/sh\n[ "$1" = -c ] && exit 0  # the version check: 3.11 or newer\n' + record
        + 'if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"; for name in pip python;'
        f' do cp {bin_folder}/record "$3/bin/$name"; done; fi\n')
    for name in ('record', 'python3'):
        (bin_folder / name).chmod(0o755)
    result = run(tmp_path, 'bash', tmp_path / 'source' / 'setup.sh',
                 AUTOGRADER_ROOT=str(tmp_path), PATH=f'{bin_folder}:{os.environ["PATH"]}')
    assert result.returncode == 0, result.stderr
    source = tmp_path / 'source'
    assert log.read_text().splitlines() == [
        f'python3 -m venv {tmp_path}/venv (in {source})',
        f'pip install -r requirements.txt (in {source})',
        f'python protonet.py --cache (in {source})']


def test_the_solution_scores_full_marks_and_a_broken_method_fewer(autograder_zip, tmp_path):
    solution = {name: (ROOT / name).read_text() for name in homework.GRADED_FILES}
    assert solution['protonet.py'].count(BROKEN[0]) == 1
    broken = solution | {'protonet.py': solution['protonet.py'].replace(*BROKEN)}
    everything = sum(grader.POINTS.values())
    assert everything == 32
    for name, submission, test_ids, score, out_of in [
            ('solution', solution, (), everything, everything),  # every test
            ('broken', broken, QUICK_TESTS, 6, 14)]:
        result, results = autograde(autograder_zip, tmp_path / name, submission, *test_ids)
        assert result.returncode == 0, result.stderr
        graded = assert_gradescope_results(results, score, out_of)
        assert [test['name'].split(':')[0] for test in graded['tests']] == list(
            test_ids or grader.POINTS)
        if name == 'solution':
            assert_graded_in_full(result.stdout, graded)


def test_the_bare_starter_scores_nothing_of_its_blanks(autograder_zip, tmp_path):
    result, results = autograde(autograder_zip, tmp_path, {}, *QUICK_TESTS)
    for name in homework.GRADED_FILES:
        assert f'{name} is not in the submission: its blank regions are graded' in result.stdout
    assert_gradescope_results(results, 14 - blanked_points(QUICK_TESTS), 14)


def test_a_submission_that_does_not_import_scores_0_with_the_reason(autograder_zip, tmp_path):
    typo = (ROOT / 'protonet.py').read_text().replace('import torch\n', 'import torch(\n', 1)
    _, results = autograde(autograder_zip, tmp_path, {'protonet.py': typo})
    results = assert_gradescope_results(results, 0, 0)
    assert results['output'].startswith('grader.py stopped before grading:\n')
    assert 'SyntaxError' in results['output']

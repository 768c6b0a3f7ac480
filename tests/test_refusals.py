"""A refused run leaves nothing behind: every kind of bad input to every script, run in an empty
folder, is one line on stderr, exit status 2, and the folder is still empty."""
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import maml
import maml_transfer
import metabolism
import protonet
import run_metabolism
import util

ROOT = Path(__file__).resolve().parents[1]
TASK_SHAPES = (['--num_way', '0'], ['--num_support', '0'], ['--num_query', '-1'],
               ['--num_support', '10', '--num_query', '11'])  # 21 of a class's 20 images
COMMON = (['--batch_size', '0'], ['--num_train_iterations', '0'], ['--num_test_tasks', '0'],
          ['--checkpoint_step', '-2'], ['--checkpoint_step', '100'], ['--device', 'tpu'],
          ['--learning_rate', '0'])
OMNIGLOT = (*TASK_SHAPES, ['--num_way', '101'])  # the validation split has 100 characters
BAD = {
    protonet: (*OMNIGLOT, *COMMON, ['--tasks', 'sideways']),
    maml: (*OMNIGLOT, *(argv for argv in COMMON if '--learning_rate' not in argv),
           ['--tasks', 'sideways'], ['--num_inner_steps', '-1'], ['--inner_lr', '0'],
           ['--outer_lr', '-1']),
    maml_transfer: (*OMNIGLOT, *COMMON, ['--adapt_steps', '-1'], ['--adapt_lr', '0']),
    run_metabolism: (['--num_way', '3'], *TASK_SHAPES[1:], *COMMON,
                     ['--num_support', '6']),  # more than the tiny data's 10 of a class
}


@pytest.fixture(scope='module')
def tiny_metabolism(tmp_path_factory):
    """A datadir whose pickle holds the 8 data sets, 10 molecules of each class in each."""
    datadir = tmp_path_factory.mktemp('metabolism')
    rng = np.random.default_rng(0)
    data = {name: {'feature': rng.integers(0, 2, (20, metabolism.NUM_BITS)).astype(np.float32),
                   'label': np.repeat([0, 1], 10)}
            for name in metabolism.SPLIT_SETS['train'] + metabolism.SPLIT_SETS['val']}
    (datadir / metabolism.cache_name('bits')).write_bytes(pickle.dumps(data))
    return datadir


@pytest.mark.parametrize('script', BAD, ids=lambda script: script.__name__)
def test_every_bad_flag_is_refused_before_anything_is_written(script, tmp_path, monkeypatch,
                                                              one_line_error, tiny_metabolism):
    extra = ['--datadir', str(tiny_metabolism)] if script is run_metabolism else []
    for argv in BAD[script]:
        folder = tmp_path / f'run{BAD[script].index(argv)}'
        folder.mkdir()
        monkeypatch.chdir(folder)
        line = one_line_error(lambda: script.main(script.parse_args([*argv, *extra])))
        assert argv[0].removeprefix('--') in line, (argv, line)  # refused for that flag
        assert list(folder.iterdir()) == [], (argv, list(folder.rglob('*')))


def test_the_command_line_refuses_in_an_empty_folder(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / 'protonet.py'), '--num_way', '0'],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ['error: --num_way must be at least 1, got 0']
    assert list(tmp_path.iterdir()) == []


def test_an_old_python_is_one_line(capsys):
    util.check_python((3, 11, 7))
    with pytest.raises(SystemExit) as exit:
        util.check_python((3, 9, 18))
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        'error: Python 3.9 is too old; this project and its pinned requirements need Python '
        '3.11 or newer']

"""torchrun: two CPU processes (gloo) train, validate, resume and test as one process does.

Two processes run through torchrun, one in this process (as `python script.py` runs it), all
with one thread. Training runs go through float64_run.py (float64, a checkpoint every step; its
docstring says why float64), --test through the plain scripts in float32.
"""
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distributed
import float64_run
import maml_transfer
import util

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
TASKS = ['--num_way', '3', '--num_support', '1', '--num_query', '2', '--batch_size', '2']
STEPS = 3  # validations at steps 0 and 2 (float64_run.VAL_INTERVAL)
SCRIPTS = {'protonet.py': [], 'maml.py': ['--learn_inner_lrs']}  # MAML second order


def torchrun(*command, expect_success=True):
    """Runs `torchrun --nproc_per_node=2 command` in the repository root; returns the result."""
    result = subprocess.run([*TORCHRUN, *command], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert (result.returncode == 0) == expect_success, result.stdout + result.stderr
    return result


def in_process(run, script, flags):
    """run(script, flags) here with one thread, as `python script flags...` runs; returns what
    it printed."""
    out, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            run(script, flags)
    finally:
        torch.set_num_threads(threads)
    return out.getvalue()


def run_script(script, flags):
    sys.argv, saved = [script, *flags], sys.argv
    try:
        runpy.run_path(str(ROOT / script), run_name='__main__')
    finally:
        sys.argv = saved


def train_flags(script, log_dir, checkpoint_step=-1):
    return [*TASKS, *SCRIPTS[script], '--num_train_iterations', str(STEPS),
            '--checkpoint_step', str(checkpoint_step), '--log_dir', str(log_dir)]


def without_log_dir(printed):
    return [line for line in printed.splitlines() if not line.startswith('log_dir')]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """script -> (folder, printed): folder/p1 and folder/p2 hold the same float64 run of STEPS
    iterations with 1 and 2 processes; printed[P] its lines, but the log dir's. Each script
    trains once per module."""
    cache = {}

    def get(script):
        if script not in cache:
            folder = tmp_path_factory.mktemp(script.removesuffix('.py'))
            printed = {1: in_process(float64_run.run, script, train_flags(script, folder / 'p1')),
                       2: torchrun('tests/float64_run.py', script,
                                   *train_flags(script, folder / 'p2')).stdout}
            cache[script] = folder, {p: without_log_dir(lines) for p, lines in printed.items()}
        return cache[script]
    return get


def assert_same_tensors(a, b, name=''):
    """Every tensor of two checkpoints (nested dicts) equal to float64 rounding."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), name
        for key in a:
            assert_same_tensors(a[key], b[key], f'{name}.{key}')
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    else:
        assert a == b, name


def load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize('script', SCRIPTS)
def test_two_processes_train_as_one(trained, script):
    folder, printed = trained(script)
    assert printed[2] == printed[1]  # every Iteration and Validation line, from rank 0 alone
    assert sum(line.startswith('Validation') for line in printed[1]) == 2  # steps 0 and 2
    for step in range(STEPS):
        assert_same_tensors(load(folder / 'p2' / f'state{step}.pt'),
                            load(folder / 'p1' / f'state{step}.pt'), f'state{step}')


@pytest.mark.parametrize('script', SCRIPTS)
def test_a_two_process_run_resumes_with_one(trained, script):
    folder, printed = trained(script)
    resumed = folder / 'resumed'
    resumed.mkdir()
    (resumed / 'state1.pt').write_bytes((folder / 'p2' / 'state1.pt').read_bytes())
    lines = without_log_dir(in_process(float64_run.run, script,
                                       train_flags(script, resumed, checkpoint_step=1)))
    assert lines[-1] == printed[1][-1]  # the validation of step 2
    assert_same_tensors(load(resumed / f'state{STEPS - 1}.pt'),
                        load(folder / 'p1' / f'state{STEPS - 1}.pt'))


NUM_TEST_TASKS = 61  # odd: one process tests one task more


def test_two_processes_test_every_task_once(trained):
    """ProtoNet's --test in float32 from the last checkpoint: the same task accuracies, with a
    number of tasks the two processes share unevenly."""
    folder, _ = trained('protonet.py')
    flags = ['--test', *TASKS, '--log_dir', str(folder / 'p1'),
             '--checkpoint_step', str(STEPS - 1), '--num_test_tasks', str(NUM_TEST_TASKS)]
    printed, results = {}, {}
    for processes in (1, 2):
        printed[processes] = (in_process(run_script, 'protonet.py', flags) if processes == 1
                              else torchrun('protonet.py', *flags).stdout).splitlines()[-1]
        result_path, = (folder / 'p1').glob('test.*.json')
        results[processes] = json.loads(result_path.read_text())
        result_path.unlink()
    assert printed[2] == printed[1]
    assert printed[1].startswith(f'Accuracy over {NUM_TEST_TASKS} test tasks')
    assert results[2]['accuracies'] == results[1]['accuracies']
    assert len(results[1]['accuracies']) == NUM_TEST_TASKS


def test_a_batch_that_does_not_split_is_one_line_on_stderr():
    result = torchrun('protonet.py', '--batch_size', '3', expect_success=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert errors == ['error: --batch_size 3 does not split evenly over the 2 processes '
                      'torchrun started; use a multiple of 2 or another --nproc_per_node']
    assert '[rank' not in result.stderr  # no traceback from either process
    assert result.stdout == ''


def test_transfer_pretraining_averages_the_gradients_of_the_processes_images(tmp_path):
    """maml_transfer.py's pre-training batch is images: each process takes every second one,
    with its own batch-norm statistics, and the processes average their gradients. Its first
    step with 2 processes equals that computed here in one process, in float64."""
    flags = [*TASKS, '--adapt_steps', '2', '--num_train_iterations', '1']
    torchrun('tests/float64_run.py', 'maml_transfer.py', *flags, '--log_dir', str(tmp_path))
    args = maml_transfer.parse_args(flags)
    with float64_run.float64():
        util.seed_everything(args.seed)
        learner = maml_transfer.TransferLearner(args.learning_rate, args.adapt_steps,
                                                args.adapt_lr, str(tmp_path), 'cpu')
        tasks = maml_transfer.PretrainingTasks(args.num_way, args.num_support, args.num_query)
        (images, labels), = next(iter(tasks.loader('train', args.batch_size, args.batch_size,
                                                   'cpu')))
        for share in (slice(0, None, 2), slice(1, None, 2)):
            loss, _ = learner._evaluate([(images[share], labels[share])], train=True)
            (loss / 2).backward()
        learner._optimizer.step()
    saved = load(tmp_path / 'state0.pt')
    assert_same_tensors(saved['parameters'], learner._checkpoint_state()['parameters'])
    assert_same_tensors(saved['optimizer_state_dict']['state'],
                        learner._optimizer.state_dict()['state'])


def as_process(monkeypatch, rank, world_size):
    """Makes distributed.py see this process as torchrun's process rank of world_size."""
    for name, value in (('RANK', rank), ('WORLD_SIZE', world_size), ('LOCAL_RANK', rank)):
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize('world_size', [2, 3, 8])
def test_shares_cover_every_task_once_and_interleave_restores_the_order(monkeypatch,
                                                                         world_size):
    """Batches of 4 tasks (numbered in the pass), each process its share; the gathered shares
    back in the pass's order; with 8 processes the last ones have none."""
    batches = [list(range(first, first + 4)) for first in range(0, 12, 4)]
    shares = []
    for rank in range(world_size):
        as_process(monkeypatch, rank, world_size)
        shares.append([task for i, batch in enumerate(batches)
                       for task in distributed.share(batch, start=4 * i)])
    assert sorted(sum(shares, [])) == list(range(12))
    assert all(task % world_size == rank for rank, share in enumerate(shares) for task in share)
    assert distributed.interleave([np.array(s) for s in shares if s]).tolist() == list(range(12))

"""torchrun: two CPU processes (gloo) train, validate, resume and test as one process does.

Two processes run through torchrun, one in this process (as `python script.py` runs it), all
with one thread. Training runs go through float64_run.py (float64, a checkpoint every step; its
docstring says why float64), --test through the plain scripts in float32.
"""
import contextlib
import io
import json
import os
import re
import shutil
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
# Training runs, each with 1 process and with 2: name -> (script, flags, iterations).
# MAML++ over 7 iterations: the multi-step loss in iteration 0, first order in 0 and 1 (the
# annealing's first part), second order after, per-step lrs and batch norm, the cosine.
RUNS = {'protonet.py': ('protonet.py', [], STEPS),
        'maml.py': ('maml.py', ['--learn_inner_lrs'], STEPS),  # second order
        'maml.py --first_order': ('maml.py', ['--first_order', '--learn_inner_lrs'], STEPS),
        'maml.py --mamlpp --tasks batched': ('maml.py', ['--mamlpp', '--tasks', 'batched'], 7)}
TRANSFER_FLAGS = [*TASKS, '--adapt_steps', '2', '--num_train_iterations', '1']
NUM_TEST_TASKS = 7  # odd: one process tests one task more


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


def run_folder(folder, name):
    return folder / name.replace(' ', '_')


def train_flags(name, log_dir, checkpoint_step=-1):
    _, flags, iterations = RUNS[name]
    return [*TASKS, *flags, '--num_train_iterations', str(iterations),
            '--checkpoint_step', str(checkpoint_step), '--log_dir', str(log_dir)]


def without_log_dir(printed):
    return [line for line in printed.splitlines() if not line.startswith('log_dir')]


def script_test_flags(folder, datadir):
    """script -> its --test flags, each from a checkpoint made before or earlier in the
    launch (the transfer baseline's by the launch's pre-training)."""
    common = ['--test', '--checkpoint_step', '0', '--num_test_tasks', str(NUM_TEST_TASKS)]
    return {'protonet.py': [*TASKS, '--log_dir', str(folder / 'protonet.py' / 'p1'), *common],
            'maml.py': [*TASKS, '--learn_inner_lrs', '--log_dir', str(folder / 'maml.py' / 'p1'),
                        *common],
            'maml_transfer.py': [*TASKS, '--adapt_steps', '2', '--log_dir',
                                 str(folder / 'transfer'), *common],
            'run_metabolism.py': ['--num_support', '3', '--num_query', '4', '--datadir',
                                  str(datadir), '--log_dir', str(folder / 'metabolism'),
                                  *common]}


@pytest.fixture(scope='module')
def launched(tmp_path_factory, built):
    """(folder, printed, test results): every run of RUNS with 1 process here (folder/NAME/p1)
    and with 2 in one torchrun launch (folder/NAME/p2), printed[NAME][P] its lines but the log
    dir's; in the same launch, ProtoNet resumed with 2 processes from the 1-process run's
    checkpoint 1 (folder/resumed_with_2), the transfer baseline's pre-training
    (folder/transfer), then each script's --test, its JSON result test_results[script]."""
    folder = tmp_path_factory.mktemp('distributed')
    printed = {name: {1: without_log_dir(in_process(float64_run.run, script,
                                                    train_flags(name, run_folder(folder, name) / 'p1')))}
               for name, (script, _, _) in RUNS.items()}
    resumed = folder / 'resumed_with_2'
    resumed.mkdir()
    shutil.copy(folder / 'protonet.py' / 'p1' / 'state1.pt', resumed)
    import protonet
    import run_metabolism
    torch.manual_seed(0)
    protonet.ProtoNet(0.001, str(folder / 'metabolism'), 'cpu',
                      learner=run_metabolism.FCNet())._save(0)
    tests = script_test_flags(folder, built[0])
    commands = [[script, *train_flags(name, run_folder(folder, name) / 'p2')]
                for name, (script, _, _) in RUNS.items()]
    commands += [['protonet.py', *train_flags('protonet.py', resumed, checkpoint_step=1)],
                 ['maml_transfer.py', *TRANSFER_FLAGS, '--log_dir', str(folder / 'transfer')]]
    commands += [['--float32', script, *flags] for script, flags in tests.items()]
    argv = [word for command in commands for word in [float64_run.SEPARATOR, *command]][1:]
    outputs = re.split(r'^=== \d+ ===\n', torchrun('tests/float64_run.py', *argv).stdout,
                       flags=re.M)[1:]
    assert len(outputs) == len(commands)
    for name, output in zip(RUNS, outputs):
        printed[name][2] = without_log_dir(output)
    results = {}
    for script, output in zip(tests, outputs[-len(tests):]):
        path, = Path(tests[script][tests[script].index('--log_dir') + 1]).glob('test.*.json')
        results[script] = json.loads(path.read_text()), output.splitlines()[-1]
        path.unlink()  # the 1-process --test writes its own
    return folder, printed, results


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


@pytest.mark.parametrize('name', RUNS)
def test_two_processes_train_as_one(launched, name):
    folder, printed, _ = launched
    printed = printed[name]
    iterations = RUNS[name][2]
    assert printed[2] == printed[1]  # every Iteration and Validation line, from rank 0 alone
    assert sum(line.startswith('Validation') for line in printed[1]) == (iterations + 1) // 2
    for step in range(iterations):
        assert_same_tensors(load(run_folder(folder, name) / 'p2' / f'state{step}.pt'),
                            load(run_folder(folder, name) / 'p1' / f'state{step}.pt'), f'state{step}')


@pytest.mark.parametrize('name', ['protonet.py', 'maml.py'])
def test_a_two_process_run_resumes_with_one(launched, name):
    folder, printed, _ = launched
    script = RUNS[name][0]
    resumed = run_folder(folder, name) / 'resumed_with_1'
    resumed.mkdir()
    (resumed / 'state1.pt').write_bytes((run_folder(folder, name) / 'p2' / 'state1.pt').read_bytes())
    lines = without_log_dir(in_process(float64_run.run, script,
                                       train_flags(name, resumed, checkpoint_step=1)))
    assert lines[-1] == printed[name][1][-1]  # the validation of step 2
    assert_same_tensors(load(resumed / f'state{STEPS - 1}.pt'),
                        load(run_folder(folder, name) / 'p1' / f'state{STEPS - 1}.pt'))


def test_a_one_process_run_resumes_with_two(launched):
    folder, _, _ = launched
    assert_same_tensors(load(folder / 'resumed_with_2' / f'state{STEPS - 1}.pt'),
                        load(folder / 'protonet.py' / 'p1' / f'state{STEPS - 1}.pt'))


@pytest.mark.parametrize('script', ['protonet.py', 'maml.py', 'maml_transfer.py',
                                    'run_metabolism.py'])
def test_two_processes_test_every_task_once(launched, built, script):
    """Each script's --test in float32: the same task accuracies with 2 processes as with 1,
    with a number of tasks the two share unevenly."""
    folder, _, results = launched
    flags = script_test_flags(folder, built[0])[script]
    printed = in_process(float64_run.run_main, script, flags).splitlines()[-1]
    path, = Path(flags[flags.index('--log_dir') + 1]).glob('test.*.json')
    one = json.loads(path.read_text())
    two, printed_two = results[script]
    assert printed_two == printed
    assert printed.startswith(f'Accuracy over {NUM_TEST_TASKS} test tasks')
    assert two['accuracies'] == one['accuracies']
    assert len(one['accuracies']) == NUM_TEST_TASKS


def test_a_batch_that_does_not_split_is_one_line_on_stderr():
    result = torchrun('protonet.py', '--batch_size', '3', expect_success=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert errors == ['error: --batch_size 3 does not split evenly over the 2 processes '
                      'torchrun started; use a multiple of 2 or another --nproc_per_node']
    assert '[rank' not in result.stderr  # no traceback from either process
    assert result.stdout == ''


def test_transfer_pretraining_averages_the_gradients_of_the_processes_images(launched):
    """maml_transfer.py's pre-training batch is images: each process takes every second one,
    with its own batch-norm statistics, and the processes average their gradients. Its first
    step with 2 processes equals that computed here in one process, in float64."""
    folder = launched[0] / 'transfer'
    args = maml_transfer.parse_args(TRANSFER_FLAGS)
    with float64_run.float64():
        util.seed_everything(args.seed)
        learner = maml_transfer.TransferLearner(args.learning_rate, args.adapt_steps,
                                                args.adapt_lr, str(folder), 'cpu',
                                                num_way=args.num_way)
        tasks = maml_transfer.PretrainingTasks(args.num_way, args.num_support, args.num_query)
        (images, labels), = next(iter(tasks.loader('train', args.batch_size, args.batch_size,
                                                   'cpu')))
        for share in (slice(0, None, 2), slice(1, None, 2)):
            loss, _ = learner._evaluate([(images[share], labels[share])], train=True)
            (loss / 2).backward()
        learner._optimizer.step()
    saved = load(folder / 'state0.pt')
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

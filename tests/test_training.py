"""training.py and util.py through ProtoNet: resume, intervals, NaN stop, atomic saves, errors,
Adam's fused kernel; the memory a MAML batch needs, named before a step that would not fit."""
import argparse
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import distributed
import maml
import omniglot
import protonet
import reference
import training
import util
from conftest import Payload

ROOT = Path(__file__).resolve().parents[1]


def parse(*flags):
    parser = argparse.ArgumentParser()
    protonet.add_protonet_args(parser, num_train_iterations=5000)
    return parser.parse_args(list(flags))


def train_protonet(log_dir, num_iterations, checkpoint_step=-1):
    """Trains a tiny ProtoNet in-process, checkpointing every 2 steps; returns the learner."""
    args = parse('--num_way', '3', '--num_query', '2', '--batch_size', '2', '--log_dir', log_dir,
                 '--num_train_iterations', str(num_iterations),
                 '--checkpoint_step', str(checkpoint_step))
    models = []

    def build(log_dir, device):
        models.append(protonet.ProtoNet(args.learning_rate, log_dir, device, val_interval=2,
                                        save_interval=2))
        return models[0]
    training.main(args, omniglot.OmniglotTasks(3, 1, 2, args.seed), build, 'unused')
    return models[0]


def test_resuming_gives_the_same_parameters_as_training_straight(tmp_path):
    straight = train_protonet(str(tmp_path / 'a'), 6)
    train_protonet(str(tmp_path / 'b'), 3)  # saves state0 and state2
    resumed = train_protonet(str(tmp_path / 'b'), 6, checkpoint_step=2)
    for (name, a), b in zip(straight._network.state_dict().items(),
                            resumed._network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    saved = torch.load(tmp_path / 'b' / 'state2.pt', weights_only=True)['network_state_dict']
    assert not torch.equal(saved['convs.0.weight'], resumed._network.convs[0].weight)


@pytest.mark.parametrize('bad', ['nan', 'inf'])
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                         bad):
    """A NaN loss, or an infinite one, stops training before the optimizer steps."""
    evaluate = protonet.ProtoNet._evaluate
    calls = []

    def poisoned(self, task_batch, train):
        loss, metrics = evaluate(self, task_batch, train)
        calls.append(train)
        return (loss + float(bad) if calls.count(True) == 4 else loss), metrics

    monkeypatch.setattr(protonet.ProtoNet, '_evaluate', poisoned)
    with pytest.raises(util.UserError, match=f'loss became {bad} at iteration 3'):
        train_protonet(str(tmp_path), 10)
    assert sorted(os.listdir(tmp_path))[-2:] == ['state0.pt', 'state2.pt']
    state = torch.load(tmp_path / 'state2.pt', weights_only=True)
    assert all(torch.isfinite(v).all() for v in state['network_state_dict'].values())


def test_a_failed_save_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / 'state0.pt'
    util.atomic_save({'x': torch.ones(3)}, path)

    def crash(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        util.atomic_save({'x': torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == ['state0.pt']
    assert torch.equal(torch.load(path, weights_only=True)['x'], torch.ones(3))


class FixedAccuracies(training.MetaLearner):
    """A learner whose per-task query accuracies are given: checks test()'s arithmetic."""
    TEST_METRIC = 'query'

    def __init__(self, accuracies):
        super().__init__('unused', 'cpu')
        self._accuracies = iter(accuracies)

    def _evaluate(self, task_batch, train):
        return torch.tensor(0.), {'query': torch.tensor([next(self._accuracies)])}


def test_test_prints_the_mean_and_the_course_interval(capsys):
    accuracies = [0.5, 1.0, 0.75, 1.0]
    # mean 0.8125; population std sqrt(0.171875 / 4) = 0.207289; 1.96 * 0.207289 / 2
    mean, ci95, per_task = FixedAccuracies(accuracies).test([[None]] * 4)
    assert per_task.tolist() == accuracies
    assert mean == pytest.approx(0.8125) and ci95 == pytest.approx(0.2031433, abs=1e-6)
    assert capsys.readouterr().out == (
        'Accuracy over 4 test tasks: mean 0.812, 95% confidence interval 0.203\n')


@pytest.fixture
def cli_error(one_line_error):
    """A function: protonet.py's flags -> the one-line error its main is refused with."""
    return lambda *flags: one_line_error(lambda: protonet.main(parse(*flags)))


@pytest.mark.parametrize('flags, message', [
    (('--num_support', '10', '--num_query', '11'), 'num_support \\+ num_query = 21'),
    (('--num_way', '1101'), 'more than the 1100 classes'),
    (('--test', '--num_way', '424'), "more than the 423 classes of the 'test' split"),
    (('--num_query', '0'), '--num_query must be at least 1'),
    (('--num_support', '-1'), '--num_support must be at least 1'),
    (('--batch_size', '0'), '--batch_size must be positive'),
    (('--num_train_iterations', '0'), '--num_train_iterations must be positive'),
    (('--learning_rate', '0'), '--learning_rate must be positive'),
    (('--device', 'tpu'), "unknown device 'tpu'"),
])
def test_bad_flags_are_one_line_errors(cli_error, tmp_path, flags, message):
    assert message.replace('\\', '') in cli_error('--log_dir', str(tmp_path), *flags)


def test_missing_and_corrupt_checkpoints_are_one_line_errors(cli_error, tmp_path):
    err = cli_error('--log_dir', str(tmp_path), '--checkpoint_step', '7')
    assert f'no checkpoint at {tmp_path / "state7.pt"}' in err
    (tmp_path / 'state8.pt').write_bytes(b'not a checkpoint')
    err = cli_error('--log_dir', str(tmp_path), '--checkpoint_step', '8')
    assert 'state8.pt is corrupt or unreadable' in err
    torch.save({'architecture': 'maml/5-way'}, tmp_path / 'state9.pt')
    err = cli_error('--log_dir', str(tmp_path), '--checkpoint_step', '9')
    assert 'holds a maml/5-way model' in err


def test_checkpoint_carrying_a_pickled_object_is_refused_unrun(cli_error, tmp_path):
    marker = tmp_path / 'ran'
    torch.save({'architecture': 'protonet/5-way', 'x': Payload(f'touch {marker}')},
               tmp_path / 'state3.pt')
    err = cli_error('--log_dir', str(tmp_path), '--checkpoint_step', '3')
    assert not marker.exists()
    assert 'state3.pt is corrupt or unreadable (UnpicklingError)' in err


@pytest.mark.parametrize('setup, message', [
    ('missing', 'could not download'),
    ('truncated', 'corrupt or truncated'),
])
def test_data_problems_are_one_line_errors(tmp_path, monkeypatch, cli_error, omniglot_zips, setup,
                                          message):
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    if setup == 'truncated':
        for name in omniglot.OFFICIAL_MD5:
            (data_dir / name).write_bytes((omniglot_zips / name).read_bytes()[:100000])
    monkeypatch.setenv('OMNIGLOT_DIR', str(data_dir))
    monkeypatch.setenv('OMNIGLOT_MIRROR', str(tmp_path / 'none'))
    omniglot.images_on.cache_clear()  # as in a new process: nothing read yet
    assert message in cli_error('--cache')


def test_a_run_record_names_the_commit_of_its_code_and_whether_files_differ(tmp_path):
    """flags.json's commit is this checkout's HEAD ('+' when tracked files differ); a copy of
    the code outside any checkout records None."""
    import shutil
    import subprocess
    if shutil.which('git') is None or not (ROOT / '.git').exists():
        pytest.skip('not a git checkout')
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    assert training.run_record(parse())['commit'] == head + ('+' if dirty else '')
    shutil.copy(ROOT / 'util.py', tmp_path / 'util.py')
    copied = subprocess.run([sys.executable, '-c', 'import util; print(util.git_commit())'],
                            cwd=tmp_path, capture_output=True, text=True)
    assert copied.stdout.strip() == 'None', copied.stderr


def test_a_new_run_into_another_run_s_log_dir_is_refused_and_writes_nothing(tmp_path, cli_error):
    """Two runs differing only in --seed keep both runs' files: the second, pointed at the
    first's folder, is refused before it writes."""
    train_protonet(str(tmp_path), 3)  # checkpoints, events, flags.json
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert any(name.startswith(training.EVENTS_PREFIX) for name in before)
    err = cli_error('--num_way', '3', '--num_query', '2', '--batch_size', '2', '--seed', '1',
                    '--log_dir', str(tmp_path))
    assert all(flag in err for flag in ('--resume', '--checkpoint_step', '--log_dir')), err
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_a_log_dir_under_a_file_is_a_one_line_error(tmp_path, cli_error):
    (tmp_path / 'file').write_text('')
    assert 'cannot create --log_dir' in cli_error('--log_dir', str(tmp_path / 'file' / 'run'))
    assert sorted(tmp_path.iterdir()) == [tmp_path / 'file']


@pytest.mark.parametrize('device, fused', [('cpu', True), ('cuda', True), ('mps', True),
                                           ('meta', None)])
def test_adam_runs_fused_where_the_device_has_the_kernel(device, fused):
    assert training.adam_kernels(torch.device(device))['fused'] is fused
    assert training.adam_kernels(device)['foreach'] is (False if fused else None)


def test_a_learner_s_adam_is_fused_and_updates_as_the_plain_adam_does_in_float64():
    learner = protonet.ProtoNet(0.001, 'unused', 'cpu')
    assert all(group['fused'] for group in learner._optimizer.param_groups)
    torch.manual_seed(0)
    start = [torch.randn(shape, dtype=torch.float64) for shape in [(8, 1, 3, 3), (8,), (5, 8)]]
    plain, fused = ([value.clone().requires_grad_() for value in start] for _ in range(2))
    optimizers = [torch.optim.Adam(plain, lr=0.01),
                  training.use_adam_kernels(torch.optim.Adam(fused, lr=0.01), 'cpu')]
    for _ in range(5):
        for value in start:
            value.grad = torch.randn_like(value)
        for parameters, optimizer in zip([plain, fused], optimizers):
            for parameter, value in zip(parameters, start):
                parameter.grad = value.grad.clone()
            optimizer.step()
    assert not torch.equal(plain[0], start[0])
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-14, atol=0)


def test_a_checkpoint_of_plain_adam_loads_into_the_fused_one(tmp_path):
    """A checkpoint written before Adam was fused (its groups say fused None) trains on fused."""
    old = protonet.ProtoNet(0.001, str(tmp_path), 'cpu')
    for group in old._optimizer.param_groups:
        group.update(fused=None, foreach=None)
    for parameter in old._network.parameters():
        parameter.grad = torch.ones_like(parameter)
    old._optimizer.step()
    old._save(0)
    learner = protonet.ProtoNet(0.001, str(tmp_path), 'cpu')
    learner.load(0)
    assert all(group['fused'] for group in learner._optimizer.param_groups)
    for parameter in learner._network.parameters():
        parameter.grad = torch.ones_like(parameter)
    learner._optimizer.step()
    assert all(float(state['step']) == 2 for state in learner._optimizer.state.values())


def maml_batch(num_tasks, tasks='loop'):
    """(a second-order MAML 5-way 1-shot learner of one inner step, a batch of num_tasks)."""
    learner = maml.MAML(5, 1, 0.4, False, 0.001, 'unused', 'cpu',
                        settings=training.RunSettings(tasks=tasks))
    return learner, next(iter(omniglot.get_omniglot_dataloader('train', num_tasks, 5, 1, 15,
                                                               num_tasks)))


def hooked_bytes(function):
    """Bytes of the tensors autograd saves while function() runs, each storage once, counted
    as they are saved (torch.autograd.graph.saved_tensors_hooks)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


def test_the_memory_of_a_maml_task_is_what_autograd_saves_and_grows_with_the_tasks():
    """graph_bytes of one task's loss against the bytes counted as autograd saves them (within
    1%), the batched path against the loop (1%), 3 tasks against 3 times one (5%); about the 65
    MiB per task of second-order MAML 5-way 1-shot that issue 27 measured."""
    learner, task_batch = maml_batch(3)
    per_task = training.graph_bytes(learner._evaluate(task_batch[:1], train=True)[0])
    # counted on the course's plain autograd MAML: hooks on saving do not run under
    # torch.func.grad, which ours takes its inner gradients with
    assert per_task == pytest.approx(hooked_bytes(lambda: reference.maml_outer_step(
        reference.leaf_copies(learner._meta_parameters), dict.fromkeys(reference.MAML_KEYS, 0.4),
        task_batch[:1], num_steps=1)), rel=0.01)
    assert per_task == pytest.approx(60 * 2 ** 20, rel=0.2)
    assert training.graph_bytes(learner._evaluate(task_batch, train=True)[0]) == pytest.approx(
        3 * per_task, rel=0.05)
    batched, _ = maml_batch(1, 'batched')
    assert training.graph_bytes(batched._evaluate(task_batch[:1], train=True)[0]) == (
        pytest.approx(per_task, rel=0.01))


def test_free_memory_is_cuda_s_free_and_cached_memory_and_the_cpu_is_not_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device: (5 * 2 ** 30, 16 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, 'memory_reserved', lambda device: 3 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda device: 2 * 2 ** 30)
    assert training.free_memory(torch.device('cuda')) == 6 * 2 ** 30
    assert training.free_memory(torch.device('cpu')) is None


def test_a_batch_that_would_not_fit_is_named_before_the_first_step(monkeypatch, capsys,
                                                                    tmp_path):
    learner, task_batch = maml_batch(4)
    per_task = training.graph_bytes(learner._evaluate(task_batch[:1], train=True)[0])
    monkeypatch.setattr(training, 'free_memory', lambda device: int(2.5 * per_task))
    learner._log_dir = str(tmp_path)
    learner.train(*(omniglot.get_omniglot_dataloader(split, 4, 5, 1, 15, 4)
                    for split in ('train', 'val')), distributed.NullWriter())
    lines = capsys.readouterr().out.splitlines()
    warning, = [line for line in lines if line.startswith('Warning')]
    assert lines.index(warning) < lines.index(next(line for line in lines
                                                   if line.startswith('Iteration 0')))
    assert re.fullmatch(r'Warning: a batch of 4 tasks keeps about 0\.\d GiB for its backward '
                        r'pass \(\d+ MiB a task\), more than the 0\.\d GiB free on cpu; '
                        r'--batch_size 2 at most fits\.', warning), warning
    assert training.memory_warning(per_task, 4, 4 * per_task, torch.device('cuda')) is None
    assert 'not even one task fits' in training.memory_warning(
        per_task, 4, per_task // 2, torch.device('mps'))

"""What the README says the scripts do, through each script's main in this process: --seed
repeats a run, --amp bf16 and MAML++'s options run through every script, the K sweep's tasks
hold K shots, the "No GPU found" fallback, Ctrl-C's exit status, an infinite loss, and
run_metabolism.py's --test, resuming and --fingerprint through the script."""
import argparse
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

import maml
import mamlpp
import maml_transfer
import metabolism
import protonet
import run_metabolism
import training
import util

TASKS = ['--num_way', '3', '--num_support', '1', '--num_query', '2', '--batch_size', '2']


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny tensors


def parse(add_args, *flags):
    parser = argparse.ArgumentParser()
    add_args(parser, num_train_iterations=10)
    return parser.parse_args([str(flag) for flag in flags])


def quietly(main, args):
    """main(args), its printed output returned."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(args)
    return out.getvalue()


def tensors(state, prefix=''):
    """{dotted name: tensor} of every tensor in a checkpoint (nested dicts and lists)."""
    found = {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for key, value in items:
        if isinstance(value, torch.Tensor):
            found[f'{prefix}{key}'] = value
        elif isinstance(value, (dict, list, tuple)):
            found.update(tensors(value, f'{prefix}{key}.'))
    return found


# ----- --seed -----
def test_the_same_seed_repeats_a_run_exactly_and_another_seed_does_not(tmp_path, monkeypatch):
    """The same maml.py command twice: every tensor of every checkpoint equal (weights, inner
    lrs, Adam's state); with --seed 1 the weights differ."""
    monkeypatch.setattr(training, 'SAVE_INTERVAL', 1)
    states = {}
    for run, seed in (('a', 0), ('b', 0), ('c', 1)):
        quietly(maml.main, parse(maml.add_maml_args, *TASKS, '--learn_inner_lrs', '--seed', seed,
                                 '--num_train_iterations', 2, '--log_dir', tmp_path / run))
        states[run] = [tensors(torch.load(tmp_path / run / f'state{step}.pt', weights_only=True))
                       for step in (0, 1)]
    for first, second in zip(states['a'], states['b']):
        assert first.keys() == second.keys() and len(first) > 20
        for name in first:
            assert torch.equal(first[name], second[name]), name
    assert not torch.equal(states['a'][1]['meta_parameters.conv0'],
                           states['c'][1]['meta_parameters.conv0'])


# ----- --amp bf16 and MAML++ through the scripts -----
def trained_finite(log_dir, names):
    """The checkpoint of step 0 in log_dir: float32, finite, holding names."""
    state = torch.load(log_dir / 'state0.pt', weights_only=True)
    assert set(names) <= set(state)
    for name, value in tensors({name: state[name] for name in names}).items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
    return state


@pytest.mark.parametrize('script', ['protonet.py', 'maml.py', 'maml_transfer.py',
                                    'run_metabolism.py'])
def test_amp_bf16_trains_and_tests_through_every_script(tmp_path, monkeypatch, built, script):
    monkeypatch.setattr(run_metabolism, 'NUM_VAL_TASKS', 8)
    if script == 'protonet.py':
        main, names = protonet.main, ['network_state_dict']
        flags = lambda *more: parse(protonet.add_protonet_args, *TASKS, *more)  # noqa: E731
    elif script == 'maml.py':
        main, names = maml.main, ['meta_parameters', 'inner_lrs']
        flags = lambda *more: parse(maml.add_maml_args, *TASKS, '--learn_inner_lrs',  # noqa: E731
                                    *more)
    elif script == 'maml_transfer.py':
        main, names = maml_transfer.main, ['parameters']
        flags = lambda *more: maml_transfer.parse_args(  # noqa: E731
            [*TASKS, '--adapt_steps', '2', *map(str, more)])
    else:
        main, names = run_metabolism.main, ['network_state_dict']
        flags = lambda *more: run_metabolism.parse_args(  # noqa: E731
            ['--num_support', '2', '--num_query', '3', '--batch_size', '2', '--datadir',
             str(built[0]), *map(str, more)])
    printed = quietly(main, flags('--amp', 'bf16', '--num_train_iterations', 2, '--log_dir',
                                  tmp_path))
    assert 'Validation: loss: ' in printed and 'nan' not in printed
    trained_finite(tmp_path, names)
    printed = quietly(main, flags('--amp', 'bf16', '--test', '--checkpoint_step', 0,
                                  '--num_test_tasks', 3, '--log_dir', tmp_path))
    assert 'Accuracy over 3 test tasks' in printed
    result, = tmp_path.glob('test.*.json')
    assert json.loads(result.read_text())['flags']['amp'] == 'bf16'


@pytest.mark.parametrize('options, num_inner_steps', [
    (['--multi_step_loss'], 2), (['--derivative_order_annealing'], 2),
    (['--per_step_inner_lrs'], 2), (['--per_step_bn'], 2), (['--cosine_outer_lr'], 2),
    (['--mamlpp'], 2), (['--multi_step_loss', '--per_step_bn'], 2), (['--mamlpp'], 0)])
def test_mamlpp_options_alone_and_together_train_through_maml_py(tmp_path, options,
                                                                 num_inner_steps):
    """Each option alone, the multi-step loss with per-step batch norm, all five, and all five
    with zero inner steps (where there is nothing to adapt: post-adaptation support accuracy
    is the pre-adaptation one)."""
    args = parse(maml.add_maml_args, *TASKS, *options, '--num_inner_steps', num_inner_steps,
                 '--num_train_iterations', 7, '--log_dir', tmp_path)
    plus = mamlpp.options(args)
    printed = quietly(maml.main, args)
    state = trained_finite(tmp_path, ['meta_parameters', 'inner_lrs'])
    rows = max(num_inner_steps, 1)
    assert all(v.shape == ((num_inner_steps,) if plus.per_step_inner_lrs else ())
               for v in state['inner_lrs'].values())
    assert ('step_norms' in state) == plus.per_step_bn
    if plus.per_step_bn:
        assert all(v.shape == (rows, 32) for v in state['step_norms'].values())
    if num_inner_steps == 0:
        for line in printed.splitlines():
            if line.startswith(('Iteration', 'Validation')):
                values = dict(part.rsplit(': ', 1) for part in line.split(': ', 1)[1].split(', '))
                assert (values['pre-adaptation support accuracy']
                        == values['post-adaptation support accuracy']), line
    assert plus.msl_iterations in (0, 1) and plus.first_order_iterations in (0, 2)
    assert 'Iteration 0: loss: ' in printed and 'nan' not in printed


# ----- the K sweep -----
def test_a_k_shot_test_evaluates_k_shot_tasks(tmp_path, monkeypatch):
    """--test --num_support 10 --num_query 10 (the sweep's K = 10): every task holds 10
    support and 10 query examples of each of its 5 classes."""
    torch.manual_seed(0)
    protonet.ProtoNet(0.001, str(tmp_path), 'cpu')._save(0)
    evaluate, shapes = protonet.ProtoNet._evaluate, []

    def recorded(self, task_batch, train):
        for _, labels_support, _, labels_query in task_batch:
            shapes.append((torch.bincount(labels_support).tolist(),
                           torch.bincount(labels_query).tolist()))
        return evaluate(self, task_batch, train)

    monkeypatch.setattr(protonet.ProtoNet, '_evaluate', recorded)
    quietly(protonet.main, parse(protonet.add_protonet_args, '--test', '--num_support', 10,
                                 '--num_query', 10, '--checkpoint_step', 0, '--num_test_tasks', 4,
                                 '--log_dir', tmp_path))
    assert shapes == [([10] * 5, [10] * 5)] * 4
    saved = json.loads((tmp_path / 'test.way_5.support_10.query_10.step_0.json').read_text())
    assert (saved['shot'], saved['query'], saved['num_tasks']) == (10, 10, 4)


# ----- devices, Ctrl-C, an infinite loss -----
def test_gpu_without_cuda_or_mps_falls_back_to_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    monkeypatch.setattr(util, 'no_cuda_reason', lambda: 'REASON')
    assert util.get_device('gpu') == torch.device('cpu')
    assert capsys.readouterr().out == ('No GPU found (neither CUDA nor MPS): REASON; using the '
                                       'CPU.\n')


def test_without_a_cuda_build_the_reason_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, 'cuda', None)
    assert util.no_cuda_reason() == (f'torch {torch.__version__} is built without CUDA '
                                     f'(install a CUDA build of it)')


@pytest.mark.parametrize('error', [
    'The NVIDIA driver on your system is too old (found version 11040). Please update your GPU '
    'driver.\nAlternatively, go to: https://pytorch.org',
    'Found no NVIDIA driver on your system.', 'No CUDA GPUs are available'])
def test_with_a_cuda_build_the_reason_names_the_build_and_cudas_own_reason(monkeypatch, error):
    """A driver older than the build, no driver, no device: torch's first line, after the
    CUDA version the build needs."""
    def fails():
        raise RuntimeError(error)

    monkeypatch.setattr(torch.version, 'cuda', '12.8')
    monkeypatch.setattr(torch.cuda, 'init', fails)
    assert util.no_cuda_reason() == (f'torch {torch.__version__} is built for CUDA 12.8, which '
                                     f'does not start: {error.splitlines()[0]}')


def test_cuda_that_starts_without_a_device_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, 'cuda', '12.8')
    monkeypatch.setattr(torch.cuda, 'init', lambda: None)
    assert util.no_cuda_reason() == 'CUDA starts but finds no device'


def test_ctrl_c_exits_130_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, 'SAVE_INTERVAL', 1)
    step = protonet.ProtoNet._train_step

    def interrupted(self, task_batch, number):
        if number == 2:
            raise KeyboardInterrupt
        return step(self, task_batch, number)

    monkeypatch.setattr(protonet.ProtoNet, '_train_step', interrupted)
    with pytest.raises(SystemExit) as exit_info:
        util.cli(lambda: protonet.main(parse(protonet.add_protonet_args, *TASKS, '--log_dir',
                                             tmp_path, '--num_train_iterations', 5)))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == 'Interrupted; the last checkpoint written is intact.\n'
    assert sorted(p.name for p in tmp_path.glob('*.pt')) == ['state0.pt', 'state1.pt']
    torch.load(tmp_path / 'state1.pt', weights_only=True)  # whole


# ----- run_metabolism.py through the script -----
def metabolism_flags(datadir, log_dir, *more):
    return run_metabolism.parse_args(['--num_support', '2', '--num_query', '3', '--batch_size',
                                      '2', '--datadir', str(datadir), '--log_dir', str(log_dir),
                                      *map(str, more)])


def test_metabolism_test_draws_its_tasks_from_the_test_data_sets(tmp_path, monkeypatch, built):
    """--test evaluates metabolism tasks of the test split (the original evaluated Omniglot):
    every task's molecules are rows of one test data set, with that set's labels; the JSON
    holds every task's accuracy and the course's interval over them."""
    torch.manual_seed(0)
    protonet.ProtoNet(0.001, str(tmp_path), 'cpu', learner=run_metabolism.FCNet())._save(0)
    data = built[1]
    evaluate, seen = protonet.ProtoNet._evaluate, []

    def recorded(self, task_batch, train):
        seen.extend(task_batch)
        return evaluate(self, task_batch, train)

    monkeypatch.setattr(protonet.ProtoNet, '_evaluate', recorded)
    printed = quietly(run_metabolism.main, metabolism_flags(
        built[0], tmp_path, '--test', '--checkpoint_step', 0, '--num_test_tasks', 12))
    assert len(seen) == 12 and 'Accuracy over 12 test tasks' in printed
    sets_used = set()
    for features_support, labels_support, features_query, labels_query in seen:
        features = torch.cat([features_support, features_query]).numpy()
        labels = torch.cat([labels_support, labels_query]).numpy()
        homes = [name for name in metabolism.ALL_SETS if all(
            (data[name]['label'][np.all(data[name]['feature'] == row, axis=1)] == label).any()
            for row, label in zip(features, labels))]
        # (a molecule may be in several data sets, of the training split too)
        assert set(homes) & set(metabolism.TEST_SETS), homes
        sets_used.add(all(home not in metabolism.TRAIN_SETS for home in homes))
    assert True in sets_used  # some task could come from no training set
    saved = json.loads((tmp_path / 'test.way_2.support_2.query_3.step_0.json').read_text())
    accuracies = saved['accuracies']
    mean = sum(accuracies) / len(accuracies)
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / len(accuracies))
    assert saved['ci95'] == pytest.approx(1.96 * std / math.sqrt(12))
    assert saved['mean'] == pytest.approx(mean) and saved['num_tasks'] == 12


def test_metabolism_resumes_through_the_script_as_it_trains_straight(tmp_path, monkeypatch,
                                                                     built):
    monkeypatch.setattr(run_metabolism, 'NUM_VAL_TASKS', 4)
    monkeypatch.setattr(run_metabolism, 'SAVE_INTERVAL', 2)
    quietly(run_metabolism.main, metabolism_flags(built[0], tmp_path / 'a',
                                                  '--num_train_iterations', 5))
    quietly(run_metabolism.main, metabolism_flags(built[0], tmp_path / 'b',
                                                  '--num_train_iterations', 3))
    printed = quietly(run_metabolism.main, metabolism_flags(
        built[0], tmp_path / 'b', '--num_train_iterations', 5, '--checkpoint_step', 2))
    assert 'Loaded checkpoint iteration 2.' in printed
    straight, resumed = (tensors(torch.load(tmp_path / run / 'state4.pt', weights_only=True))
                         for run in 'ab')
    saved = tensors(torch.load(tmp_path / 'b' / 'state2.pt', weights_only=True))
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
    assert not torch.equal(saved['network_state_dict.layers.0.weight'],
                           resumed['network_state_dict.layers.0.weight'])


def test_metabolism_count_fingerprints_through_the_script(tmp_path, monkeypatch):
    """--fingerprint counts builds (and caches) count features from the TDC files and trains on
    them, in a log dir named after them."""
    import test_metabolism_data
    test_metabolism_data.write_tiny_tables(tmp_path / 'data')
    monkeypatch.setenv('TDC_MIRROR', str(tmp_path / 'no_mirror'))
    monkeypatch.setenv('TDC_ACCEPT_SHA256', test_metabolism_data.TINY_SHA256)
    monkeypatch.setattr(run_metabolism, 'NUM_VAL_TASKS', 4)
    monkeypatch.chdir(tmp_path)
    inputs = []
    evaluate = protonet.ProtoNet._evaluate

    def recorded(self, task_batch, train):
        inputs.extend(task[0] for task in task_batch)
        return evaluate(self, task_batch, train)

    monkeypatch.setattr(protonet.ProtoNet, '_evaluate', recorded)
    args = run_metabolism.parse_args(['--fingerprint', 'counts', '--num_support', '1',
                                      '--num_query', '1', '--batch_size', '2',
                                      '--num_train_iterations', '2', '--datadir', 'data'])
    printed = quietly(run_metabolism.main, args)
    assert (tmp_path / 'data' / 'metabolism_data_counts.pkl').is_file()
    log_dir = tmp_path / run_metabolism.default_log_dir(args)
    assert log_dir.name.endswith('.fingerprint_counts') and (log_dir / 'state0.pt').is_file()
    assert 'Validation: ' in printed
    assert max(features.max().item() for features in inputs) > 1  # counts, not bits


@pytest.mark.parametrize('module, flags, name', [
    (protonet, [], 'test.way_3.support_2.query_4.step_0.json'),
    (maml, ['--num_inner_steps', '2'], 'test.way_3.support_2.query_4.inner_steps_2.step_0.json')])
def test_the_test_json_holds_what_was_printed_and_its_interval_recomputes(module, flags, name,
                                                                          tmp_path):
    """--test's JSON: the task shape asked for (not the training one), every task's accuracy,
    and the printed mean and interval, which recompute from them as 1.96 * std / sqrt(n)."""
    quietly(module.main, module.parse_args([*TASKS, '--num_train_iterations', '1', '--log_dir',
                                            str(tmp_path)]))
    printed = quietly(module.main, module.parse_args([
        *TASKS, *flags, '--test', '--checkpoint_step', '0', '--num_support', '2',
        '--num_query', '4', '--num_test_tasks', '13', '--log_dir', str(tmp_path)]))
    saved = json.loads((tmp_path / name).read_text())
    accuracies = np.array(saved['accuracies'])
    assert len(accuracies) == saved['num_tasks'] == 13
    assert np.allclose(accuracies * 12, np.round(accuracies * 12), atol=1e-5)  # of 3 * 4 queries
    assert saved['mean'] == pytest.approx(accuracies.mean())
    assert saved['ci95'] == pytest.approx(1.96 * accuracies.std() / math.sqrt(13))
    assert (saved['way'], saved['shot'], saved['query'], saved['checkpoint_step'],
            saved['inner_steps']) == (3, 2, 4, 0, 2 if flags else None)
    assert (f'Accuracy over 13 test tasks: mean {saved["mean"]:.3f}, 95% confidence interval '
            f'{saved["ci95"]:.3f}') in printed


def test_protonet_built_as_the_assignments_run_metabolism_builds_it(tmp_path):
    """ProtoNet(learning_rate, log_dir, device, compile, backend, learner=..., val_interval=...,
    save_interval=..., bio=True), as the assignment's run_metabolism.py calls it (no num_way:
    the classes are counted in the labels): the same loss as with num_way given, _step's
    accuracies numpy float64, and validation with its interval (bio)."""
    rng = np.random.default_rng(0)
    data = {name: {'feature': rng.integers(0, 2, (30, 1024)).astype(np.float32),
                   'label': np.arange(30) % 2} for name in metabolism.ALL_SETS}
    batch = next(iter(metabolism.metabolism_task_loader(data, 'train', 3, 2, 2, 3, 3)))
    losses = []
    for num_way in (None, 2):
        torch.manual_seed(0)
        keywords = {} if num_way is None else {'num_way': num_way}
        model = protonet.ProtoNet(0.001, str(tmp_path), 'cpu', False, 'inductor',
                                  learner=run_metabolism.FCNet(), val_interval=2000,
                                  save_interval=2000, bio=True, **keywords)
        loss, support, query = model._step(batch)
        assert type(support) is np.float64 and type(query) is np.float64 and 0 <= query <= 1
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    summary = model.validate(metabolism.metabolism_task_loader(data, 'val', 3, 2, 2, 3, 12))
    assert set(summary) == {'loss', 'support', 'query', 'ci95'} and summary['ci95'] > 0

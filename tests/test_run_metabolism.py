"""run_metabolism.py and run_bio.sh: the fingerprint encoder, real training, --test, user errors.

Training uses the real TDC data that conftest.py's `built` fixture builds once per test run.
"""
import contextlib
import io
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import metabolism
import protonet
import run_metabolism
import test_metabolism_data
import training
import util
from conftest import Payload

ROOT = Path(__file__).resolve().parents[1]
BIO_FLAGS = ['--num_way', '2', '--num_support', '5', '--num_query', '10', '--batch_size', '4',
             '--learning_rate', '0.0005']  # run_bio.sh's, but for the iterations and the device
NUM_STEPS = 100  # trained in-process, validating and saving every INTERVAL steps
INTERVAL = 100
NUMBER = r'(\d\.\d{3})'
LOG_DIR = 'logs/protonet/metabolism.way_2.support_5.query_10.lr_0.0005.batch_size_4'  # default


def run_script(*args, cwd=ROOT):
    """Runs run_metabolism.py with args; returns the CompletedProcess (text stdout, stderr).
    One thread: the network is tiny, and beside other work on a small machine, two threads
    waiting for each other made --test much slower."""
    return subprocess.run([sys.executable, str(ROOT / 'run_metabolism.py'), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


# ----- the encoder -----
def test_fcnet_embeds_each_molecule_in_500_dimensions():
    net = run_metabolism.FCNet()
    assert net(torch.rand(7, 1024)).shape == (7, 500)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 500), (500, 500)]
    assert sum(p.numel() for p in net.parameters()) == 1024 * 500 + 500 * 500 + 3 * 2 * 500


def test_fcnet_in_protonet_equals_batch_norm_1d_applied_to_one_task_at_a_time():
    torch.manual_seed(0)
    net = run_metabolism.FCNet().double()
    plain = nn.Sequential(nn.Linear(1024, 500), nn.BatchNorm1d(500), nn.LeakyReLU(),
                          nn.Linear(500, 500), nn.BatchNorm1d(500), nn.LeakyReLU()).double().train()
    with torch.no_grad():  # same random weights, affine norms included
        for ours, theirs in zip(net.parameters(), plain.parameters(), strict=True):
            assert ours.shape == theirs.shape
            theirs.normal_()
            ours.copy_(theirs)
    # Sparse bits, as fingerprints are; denser in later tasks, so the tasks' statistics differ.
    features = (torch.rand(3, 30, 1024) < torch.tensor([0.02, 0.05, 0.2]).view(3, 1, 1)).double()
    expected = torch.stack([plain(task) for task in features])
    for batched in (False, True):
        torch.testing.assert_close(training.per_task(net, batched)(features), expected,
                                   rtol=1e-10, atol=1e-10)
    assert (expected < 0).any()  # the leaky slope mattered
    # Statistics over all tasks at once would differ: the check above can fail.
    assert not torch.allclose(plain(features.flatten(0, 1)).view_as(expected), expected)


# ----- training -----
@pytest.fixture(scope='module')
def trained(built, tmp_path_factory):
    """(working folder, printed output, loaders asked for, each validation's per-task query
    accuracies): NUM_STEPS + 1 steps of the run_bio configuration in-process, in the working
    folder's default log dir, with validation and checkpoints every INTERVAL steps instead of
    every 2000; the loaders as (split, batch_size, num_tasks)."""
    folder = tmp_path_factory.mktemp('metabolism_run')
    out = io.StringIO()
    loaders, validations = [], []
    loader = metabolism.MetabolismTasks.loader
    evaluate_pass = training.MetaLearner._evaluate_pass

    def recorded_pass(self, dataloader):
        loss, metrics = evaluate_pass(self, dataloader)
        validations.append(np.array(metrics['query']))
        return loss, metrics

    def recorded(self, split, batch_size, num_tasks, device):
        loaders.append((split, batch_size, num_tasks))
        return loader(self, split, batch_size, num_tasks, device)

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(folder)
        patch.setattr(run_metabolism, 'VAL_INTERVAL', INTERVAL)
        patch.setattr(run_metabolism, 'SAVE_INTERVAL', INTERVAL)
        patch.setattr(metabolism.MetabolismTasks, 'loader', recorded)
        patch.setattr(training.MetaLearner, '_evaluate_pass', recorded_pass)
        run_metabolism.main(run_metabolism.parse_args(
            [*BIO_FLAGS, '--num_train_iterations', str(NUM_STEPS + 1), '--datadir', str(built[0])]))
    return folder, out.getvalue(), loaders, validations


def test_validation_draws_2400_tasks_as_the_assignment(trained):
    assert trained[2] == [('train', 4, 4 * (NUM_STEPS + 1)), ('val', 4, 2400)]


def test_training_prints_validation_with_its_interval(trained):
    output = trained[1]
    assert f'log_dir: ./{LOG_DIR}' in output
    assert 'Checkpoint loading skipped.' in output
    assert re.search(rf'^Iteration {NUM_STEPS}: loss: {NUMBER}, support accuracy: {NUMBER}, '
                     rf'query accuracy: {NUMBER}$', output, re.M)
    validations = re.findall(rf'^Validation: loss: {NUMBER}, support accuracy: {NUMBER}, '
                             rf'query accuracy: {NUMBER}, Ci95: {NUMBER}$', output, re.M)
    assert len(validations) == NUM_STEPS // INTERVAL + 1, output
    # Ci95 is the course's formula over the 2,400 tasks, not over the 600 batches' means
    assert [len(accuracies) for accuracies in trained[3]] == [2400] * len(validations)
    for (_, _, query, ci95), accuracies in zip(validations, trained[3], strict=True):
        mean = sum(accuracies) / 2400
        std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / 2400)
        # printed to 3 decimals: within half of the last one
        assert abs(float(query) - mean) <= 5e-4 + 1e-12, (query, mean)
        assert abs(float(ci95) - 1.96 * std / math.sqrt(2400)) <= 5e-4 + 1e-12, (ci95, std)
        assert 0.001 < 1.96 * std / math.sqrt(2400) < 0.015  # the interval is not degenerate


def test_training_logs_the_interval_and_saves_checkpoints(trained):
    log_dir = trained[0] / LOG_DIR
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert set(events.Tags()['scalars']) == {
        'loss/train', 'train_accuracy/support', 'train_accuracy/query', 'loss/val',
        'val_accuracy/support', 'val_accuracy/query', 'val_accuracy/ci95'}
    steps = list(range(0, NUM_STEPS + 1, INTERVAL))
    assert [e.step for e in events.Scalars('val_accuracy/ci95')] == steps
    assert sorted(p.name for p in log_dir.glob('*.pt')) == sorted(f'state{s}.pt' for s in steps)
    state = torch.load(log_dir / f'state{NUM_STEPS}.pt', weights_only=True)
    assert {'network_state_dict', 'optimizer_state_dict'} <= set(state)
    assert state['network_state_dict']['layers.0.weight'].shape == (500, 1024)
    assert state['architecture'] == 'protonet/FCNet'


def query_accuracies(log_dir, step, data):
    """Per-task query accuracy of checkpoint step on 600 fixed test tasks, numpy (600,)."""
    learner = protonet.ProtoNet(0.0005, str(log_dir), 'cpu', learner=run_metabolism.FCNet())
    learner.load(step)
    tasks = metabolism.metabolism_task_loader(data, 'test', 100, 2, 5, 10, 600, seed=1)
    return np.concatenate([learner._evaluate(batch, train=False)[1]['query'] for batch in tasks])


def test_training_raises_held_out_accuracy_above_chance(trained, built):
    """Paired over the same 600 tasks of the held-out data sets: the lower end of the 95%
    interval of (after - before) is above 0, and the trained model is above chance."""
    with contextlib.redirect_stdout(io.StringIO()):
        before = query_accuracies(trained[0] / LOG_DIR, 0, built[1])
        after = query_accuracies(trained[0] / LOG_DIR, NUM_STEPS, built[1])
    gain, gain_ci95 = util.mean_and_ci95(after - before)
    accuracy, accuracy_ci95 = util.mean_and_ci95(after)
    print(f'\nheld-out query accuracy: {before.mean():.3f} before, {accuracy:.3f} after '
          f'{NUM_STEPS} steps; gain {gain:.3f} +- {gain_ci95:.3f}')
    assert gain - gain_ci95 > 0
    assert accuracy - accuracy_ci95 > 0.5


def test_test_flag_evaluates_600_metabolism_tasks(trained, built):
    result = run_script(*BIO_FLAGS, '--test', '--checkpoint_step', NUM_STEPS, '--datadir',
                        built[0], cwd=trained[0])  # the default log dir
    assert result.returncode == 0, result.stderr
    assert f'Loaded checkpoint iteration {NUM_STEPS}.' in result.stdout
    match = re.search(rf'^Accuracy over 600 test tasks: mean {NUMBER}, '
                      rf'95% confidence interval {NUMBER}$', result.stdout, re.M)
    assert match and 0.5 < float(match[1]) < 1 and 0 < float(match[2]) < 0.03, result.stdout


# ----- flags -----
def test_flags_are_protonet_flags_plus_datadir():
    args = run_metabolism.parse_args([])
    assert args.num_way == 2  # protonet.py's 5 cannot work on binary data
    assert args.num_train_iterations == 8000 and args.datadir == './data/metabolism'
    assert (args.num_support, args.num_query, args.batch_size, args.learning_rate) == (
        1, 15, 16, 0.001)
    assert args.device == 'cpu' and args.checkpoint_step == -1 and not args.test


def test_fingerprint_flag_defaults_to_the_assignment_s_bits_and_names_the_log_dir():
    assert run_metabolism.parse_args([]).fingerprint == 'bits'
    assert run_metabolism.default_log_dir(run_metabolism.parse_args([*BIO_FLAGS])) == './' + LOG_DIR
    args = run_metabolism.parse_args([*BIO_FLAGS, '--fingerprint', 'fcfp_counts'])
    assert run_metabolism.default_log_dir(args) == f'./{LOG_DIR}.fingerprint_fcfp_counts'
    with pytest.raises(SystemExit):
        run_metabolism.parse_args(['--fingerprint', 'maccs'])


def test_cache_prepares_the_data_and_exits(built, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_metabolism.main(run_metabolism.parse_args(['--cache', '--datadir', str(built[0])]))
    assert f'The metabolism data is ready in {built[0]}.' in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no log dir, no checkpoint


def test_num_way_other_than_2_fails_before_loading(tmp_path, one_line_error):
    argv = ['--num_way', '3', '--datadir', str(tmp_path / 'absent')]
    assert one_line_error(lambda: run_metabolism.main(run_metabolism.parse_args(argv))) == (
        'error: --num_way 3: the metabolism data is binary (labels 0 and 1); use --num_way 2')
    assert not (tmp_path / 'absent').exists()


def test_missing_data_names_the_data_sets(tmp_path, monkeypatch, one_line_error):
    mirror = tmp_path / 'empty_mirror'
    mirror.mkdir()
    monkeypatch.setenv('TDC_MIRROR', str(mirror))
    monkeypatch.chdir(tmp_path)
    argv = ['--datadir', str(tmp_path / 'data')]
    message = one_line_error(lambda: run_metabolism.main(run_metabolism.parse_args(argv)))
    assert message.startswith('error: could not download')
    assert all(name in message for name in metabolism.ALL_SETS), message
    assert 'TDC_MIRROR' in message


def test_authors_pickle_with_numpy_1_paths_trains(tmp_path, monkeypatch, capsys):
    datadir = tmp_path / 'data'
    datadir.mkdir()
    (datadir / metabolism.CACHE_NAME).write_bytes(test_metabolism_data.authors_pickle(2)[1])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_metabolism, 'NUM_VAL_TASKS', 4)
    run_metabolism.main(run_metabolism.parse_args(
        ['--num_support', '1', '--num_query', '2', '--batch_size', '2',
         '--num_train_iterations', '1', '--datadir', str(datadir), '--log_dir', 'run']))
    assert re.search(r'^Iteration 0: loss: \d', capsys.readouterr().out, re.M)
    assert (tmp_path / 'run' / 'state0.pt').is_file()


def test_payload_pickle_is_refused_before_it_runs(tmp_path, monkeypatch, one_line_error):
    datadir, marker, folder = tmp_path / 'data', tmp_path / 'ran', tmp_path / 'run'
    datadir.mkdir()
    folder.mkdir()
    (datadir / metabolism.CACHE_NAME).write_bytes(
        pickle.dumps({'CYP1A2_Veith': Payload(f'touch {marker}')}))
    monkeypatch.chdir(folder)
    argv = ['--datadir', str(datadir)]
    message = one_line_error(lambda: run_metabolism.main(run_metabolism.parse_args(argv)))
    assert not marker.exists()
    assert f'{datadir / metabolism.CACHE_NAME} asks for posix.system' in message, message
    assert 'refused without running it' in message
    assert list(folder.iterdir()) == [] and os.listdir(datadir) == [metabolism.CACHE_NAME]


# ----- run_bio.sh -----
@pytest.fixture
def fake_python(tmp_path):
    """A python3 first on PATH that prints its arguments, one a line."""
    folder = tmp_path / 'bin'
    folder.mkdir()
    script = folder / 'python3'
    script.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    script.chmod(0o755)
    return dict(os.environ, PATH=f'{folder}{os.pathsep}{os.environ["PATH"]}')


@pytest.mark.parametrize('argv, datadir_env, expected', [
    ([], None, './data/metabolism'),
    ([], '/env/dir', '/env/dir'),
    (['/arg/dir'], '/env/dir', '/arg/dir'),
])
def test_run_bio_runs_the_assignment_command(fake_python, argv, datadir_env, expected):
    env = {key: value for key, value in fake_python.items() if key != 'DATADIR'}
    if datadir_env:
        env['DATADIR'] = datadir_env
    result = subprocess.run(['bash', str(ROOT / 'run_bio.sh'), *argv], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split('\n')[:-1] == [
        f'{ROOT}/run_metabolism.py', '--num_way', '2', '--num_support', '5', '--num_query', '10',
        '--batch_size', '4', '--num_train_iterations', '8000', '--learning_rate', '0.0005',
        '--datadir', expected, '--device', 'gpu']

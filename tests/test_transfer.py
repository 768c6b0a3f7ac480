"""maml_transfer.py: transfer_learn against a plain computation and by hand, pre-training, the
image batches, resuming, a short real run with --test, user errors."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import maml
import maml_transfer
import omniglot
import reference
import test_device_path
import training
import util

ROOT = Path(__file__).resolve().parents[1]


def pretrained_like(seed=0):
    """maml.py's weights with an 1100-way classifier, as the learner holds them."""
    torch.manual_seed(seed)
    return {k: v.requires_grad_() for k, v in maml.init_parameters(1100).items()}


@pytest.mark.parametrize('batched', [False, True])
def test_transfer_learn_equals_plain_gradient_descent_on_reference_features(omniglot_batch,
                                                                            batched):
    parameters = pretrained_like()
    tasks = reference.to_float64(omniglot_batch(2, 5, 2, 3, seed=4))
    parameters64 = {k: v.detach().double() for k, v in parameters.items()}
    losses, support, query = maml_transfer.transfer_learn(parameters64, tasks, 5, 7, 0.3, batched)
    for i, task in enumerate(tasks):  # each task's own classifier, fitted one task at a time
        loss, support_plain, query_plain = reference.transfer_learn(parameters64, task, 7, 0.3)
        torch.testing.assert_close(losses[i], loss, rtol=1e-10, atol=0)
        assert query[i] == query_plain and support[i] == support_plain


def test_transfer_learn_by_hand_and_frozen(omniglot_batch):
    parameters = pretrained_like()
    before = {k: v.detach().clone() for k, v in parameters.items()}
    tasks = omniglot_batch(2, 5, 2, 3)
    # no step: the zero classifier gives equal logits, loss log 5, and argmax class 0 (1 in 5)
    losses, support, query = maml_transfer.transfer_learn(parameters, tasks, 5, 0, 1.0)
    torch.testing.assert_close(losses, torch.full((2,), math.log(5)))
    assert support.tolist() == query.tolist() == pytest.approx([0.2, 0.2])
    maml_transfer.transfer_learn(parameters, tasks, 5, 5, 1.0)
    assert all(torch.equal(v, before[k]) and v.grad is None for k, v in parameters.items())


@pytest.mark.parametrize('tasks', ['loop', 'batched'])
def test_an_evaluation_batch_makes_the_host_wait_for_nothing(omniglot_batch, tmp_path, tasks):
    """The number of ways is given, not read from the labels (a scalar read per batch)."""
    learner = maml_transfer.TransferLearner(0.001, 3, 1.0, str(tmp_path), 'cpu',
                                            training.RunSettings(tasks=tasks), num_way=3)
    batch = omniglot_batch(2, 3, 1, 2)
    with test_device_path.watched() as recorder:
        learner._evaluate(batch, train=False)
    assert not recorder.waits, recorder.waits


def test_image_batches_hold_meta_train_characters_with_their_labels():
    loader = omniglot.get_image_dataloader('train', 6, 12, seed=3)
    assert len(loader) == 2
    batch = next(iter(loader))
    assert len(batch) == 1
    images, labels = batch[0]
    assert images.shape == (6, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 1100
    all_images = torch.from_numpy(omniglot.prepare())
    train = omniglot.split_classes('train')
    for image, label in zip(images, labels):  # the image is one of its labelled character's
        assert (all_images[train[label]].float() == image[0]).all(-1).all(-1).any()
    again = next(iter(omniglot.get_image_dataloader('train', 6, 12, seed=3)))[0]
    assert torch.equal(again[1], labels)


def test_pretraining_loss_is_the_1100_way_cross_entropy(tmp_path):
    torch.manual_seed(0)
    learner = maml_transfer.TransferLearner(0.001, 3, 1.0, str(tmp_path), 'cpu', num_way=5)
    batch = next(iter(omniglot.get_image_dataloader('train', 8, 8)))
    loss, metrics = learner._evaluate(batch, train=True)
    images, labels = batch[0]
    logits = reference.maml_forward(learner._parameters, images)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels), rtol=1e-5, atol=1e-6)
    assert metrics['accuracy'].tolist() == [reference.accuracy(logits, labels)]


def parse(*flags):
    return maml_transfer.parse_args([str(flag) for flag in flags])


def pretrain(log_dir, num_iterations, checkpoint_step=-1):
    args = parse('--log_dir', str(log_dir), '--batch_size', '8', '--adapt_steps', '3',
                 '--num_train_iterations', str(num_iterations),
                 '--checkpoint_step', str(checkpoint_step))
    learners = []

    def build(log_dir, device):
        learners.append(maml_transfer.TransferLearner(args.learning_rate, args.adapt_steps,
                                                      args.adapt_lr, log_dir, device,
                                                      training.RunSettings(100, 2),
                                                      num_way=args.num_way))
        return learners[0]
    training.main(args, maml_transfer.PretrainingTasks(args.num_way, args.num_support,
                                                       args.num_query, args.seed),
                  build, 'unused')
    return learners[0]


def test_resuming_pretraining_gives_the_same_weights(tmp_path):
    straight = pretrain(tmp_path / 'a', 5)
    pretrain(tmp_path / 'b', 3)
    resumed = pretrain(tmp_path / 'b', 5, checkpoint_step=2)
    saved = torch.load(tmp_path / 'b' / 'state2.pt', weights_only=True)
    assert {'parameters', 'optimizer_state_dict'} <= set(saved)
    for key, value in straight._parameters.items():
        torch.testing.assert_close(resumed._parameters[key], value, rtol=0, atol=0)
        assert not torch.equal(saved['parameters'][key], value) or key.startswith('b')


def run_script(*args):
    return subprocess.run([sys.executable, 'maml_transfer.py', *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_pretraining_steps_fit_a_batch(tmp_path):
    """The shared loop's training step lowers the 1100-way loss: 30 steps on one batch of 16
    images take its cross-entropy (log 1100 = 7.0 at the start) down by more than 2 (measured:
    to 4.3)."""
    torch.manual_seed(0)
    learner = maml_transfer.TransferLearner(0.003, 3, 1.0, str(tmp_path), 'cpu', num_way=5)
    batch = next(iter(omniglot.get_image_dataloader('train', 16, 16, seed=1)))
    losses = [float(learner._train_step(batch, step)[0]) for step in range(30)]  # loss first
    assert losses[0] == pytest.approx(math.log(1100), rel=0.1)
    assert losses[-1] < losses[0] - 2, losses


NUM_TEST_TASKS = 24


def test_short_real_pretraining_logs_checkpoints_and_tests(tmp_path, capsys, one_thread):
    """The script end to end: pre-training iterations and a validation printed, a checkpoint
    (trained in this process), then --test on fresh test tasks from it (the command line), its
    JSON beside the checkpoint."""
    log_dir = tmp_path / 'run'
    maml_transfer.main(parse('--num_train_iterations', 11, '--batch_size', 8, '--log_dir',
                             log_dir, '--adapt_steps', 5))
    printed = capsys.readouterr().out
    assert re.search(r'^Iteration 10: loss: \d\.\d{3}, classification accuracy: \d\.\d{3}$',
                     printed, re.M)
    validation = re.findall(
        r'^Validation: loss: [\d.]+, post-adaptation support accuracy: ([\d.]+), '
        r'post-adaptation query accuracy: ([\d.]+)$', printed, re.M)
    assert len(validation) == 1 and all(0 < float(v) <= 1 for v in validation[0])
    assert sorted(p.name for p in log_dir.glob('*.pt')) == ['state0.pt']
    result = run_script('--test', '--log_dir', log_dir, '--checkpoint_step', 0,
                        '--adapt_steps', 5, '--num_test_tasks', NUM_TEST_TASKS)
    assert result.returncode == 0, result.stderr
    match = re.search(rf'^Accuracy over {NUM_TEST_TASKS} test tasks: mean (\d\.\d{{3}}), '
                      r'95% confidence interval (\d\.\d{3})$', result.stdout, re.M)
    assert match and 0.2 < float(match[1]) < 1 and 0 < float(match[2]) < 0.2, result.stdout
    saved = json.loads((log_dir / 'test.way_5.support_5.query_15.step_0.json').read_text())
    accuracies = saved['accuracies']
    mean = sum(accuracies) / len(accuracies)
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / len(accuracies))
    assert len(accuracies) == saved['num_tasks'] == NUM_TEST_TASKS
    assert saved['mean'] == pytest.approx(mean) and f"{mean:.3f}" == match[1]
    assert saved['ci95'] == pytest.approx(1.96 * std / math.sqrt(NUM_TEST_TASKS))
    assert all(min(abs(a - q / 75) for q in range(76)) < 1e-6 for a in accuracies)  # of 75
    assert (saved['way'], saved['shot'], saved['query'], saved['checkpoint_step'],
            saved['inner_steps'], saved['script']) == (5, 5, 15, 0, None, 'maml_transfer.py')


@pytest.mark.parametrize('flags, message', [(('--adapt_steps', '-1'), '--adapt_steps must be'),
                                            (('--adapt_lr', '0'), '--adapt_lr must be positive')])
def test_bad_flags_are_one_line_errors(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        util.cli(lambda: maml_transfer.main(parse(*flags)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and err.count('\n') == 1


def test_default_log_dir_names_every_hyperparameter():
    assert maml_transfer.default_log_dir(parse()) == (
        './logs/transfer/omniglot.way_5.support_5.query_15.lr_0.001.batch_size_64'
        '.adapt_steps_100.adapt_lr_2.0')


def test_validation_and_test_run_through_transfer_learn_once_per_batch(tmp_path, capsys,
                                                                        monkeypatch, one_thread):
    """The graded function is what the script evaluates with: a 1-iteration run validates
    batch_size * 4 = 8 tasks in 4 batches of 2, and --test 6 tasks one at a time."""
    calls, graded = [], maml_transfer.transfer_learn

    def counted(parameters, task_batch, *args, **kwargs):
        calls.append(len(task_batch))
        return graded(parameters, task_batch, *args, **kwargs)
    monkeypatch.setattr(maml_transfer, 'transfer_learn', counted)
    maml_transfer.main(parse('--num_train_iterations', 1, '--batch_size', 2, '--adapt_steps', 1,
                             '--log_dir', tmp_path))
    assert calls == [2] * 4
    maml_transfer.main(parse('--test', '--log_dir', tmp_path, '--checkpoint_step', 0,
                             '--adapt_steps', 1, '--num_test_tasks', 6))
    assert calls == [2] * 4 + [1] * 6
    capsys.readouterr()

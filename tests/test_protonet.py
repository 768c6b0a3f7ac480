"""protonet.py: the step against hand computations and a plain implementation, real training."""
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import float64_run
import layers
import protonet
import reference
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


class Identity(nn.Module):
    """A 'network' whose latents are its inputs: makes the step computable by hand."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # Adam needs a parameter

    def forward(self, x):
        return x + 0 * self.unused


def test_step_equals_a_hand_computation(tmp_path):
    # 2-way, 2-shot, 1-d latents: prototypes are 1 and 10.
    support = torch.tensor([[0.], [2.], [9.], [11.]])
    query = torch.tensor([[4.], [8.]])
    task = (support, torch.tensor([0, 0, 1, 1]), query, torch.tensor([0, 0]))
    model = protonet.ProtoNet(0.001, str(tmp_path), 'cpu', learner=Identity())
    loss, accuracy_support, accuracy_query = model._step([task])
    # query 4: distances 9 and 36; query 8: distances 49 and 4 (wrongly closer to class 1).
    expected_loss = (math.log(1 + math.exp(-27)) + math.log(1 + math.exp(45))) / 2
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert accuracy_support == 1.0 and accuracy_query == 0.5


def test_two_tasks_with_more_shots_than_ways_by_hand(tmp_path):
    """2-way 3-shot (K != N, so dividing by the number of classes instead of each class's count
    gives other prototypes), two tasks of different sizes of latents, worked by hand."""
    first = (torch.tensor([[0.], [1.], [2.], [9.], [10.], [11.]]), torch.tensor([0, 0, 0, 1, 1, 1]),
             torch.tensor([[4.], [8.]]), torch.tensor([0, 1]))  # prototypes 1 and 10
    second = (torch.tensor([[-3.], [-1.], [-2.], [1.], [2.], [6.]]),
              torch.tensor([0, 0, 0, 1, 1, 1]),
              torch.tensor([[0.], [-1.]]), torch.tensor([1, 1]))  # prototypes -2 and 3
    model = protonet.ProtoNet(0.001, str(tmp_path), 'cpu', learner=Identity())
    loss, accuracy_support, accuracy_query = model._step([first, second])
    # first task: query 4, distances 9 and 36 (right); query 8, 49 and 4 (right).
    # second task: query 0, distances 4 and 9, label 1 (wrong); query -1, 1 and 16 (wrong).
    # The support: every example nearest its own prototype, but 1 in the second task
    # (distances 9 and 4: right too).
    losses = [math.log(1 + math.exp(9 - 36)), math.log(1 + math.exp(4 - 49)),
              math.log(1 + math.exp(9 - 4)), math.log(1 + math.exp(16 - 1))]
    assert loss.item() == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert accuracy_support == 1.0 and accuracy_query == 0.5
    # the batched path computes the same
    batched = protonet.ProtoNet(0.001, str(tmp_path), 'cpu', learner=Identity(), tasks='batched')
    assert batched._step([first, second])[0].item() == pytest.approx(sum(losses) / 4, rel=1e-6)


def test_task_batch_norm_equals_batch_norm_in_train_mode_also_in_eval_mode():
    torch.manual_seed(0)
    norm = layers.TaskBatchNorm(3)
    norm.weight.data.uniform_(0.5, 2)
    norm.bias.data.normal_()
    x = torch.randn(6, 3, 5, 5) * 3 + 1
    plain = nn.BatchNorm2d(3).train()
    plain.load_state_dict({'weight': norm.weight, 'bias': norm.bias}, strict=False)
    torch.testing.assert_close(norm.eval()(x), plain(x), rtol=1e-5, atol=1e-5)


def test_loss_and_gradients_equal_a_plain_per_task_implementation(omniglot_batch):
    # float64 throughout, so that only a real difference can exceed the tolerance.
    torch.manual_seed(1)
    model = protonet.ProtoNet(0.001, 'unused', 'cpu')
    model._network.double()
    task_batch = reference.to_float64(omniglot_batch(batch_size=3, num_way=5, num_support=2,
                                                     num_query=4, seed=3))
    plain = reference.protonet_network_like(model._network)
    loss, _, _ = model._step(task_batch)
    expected, _, _ = reference.protonet_step(plain, task_batch)
    loss.backward()
    expected.backward()
    # Parameters in the same order: conv0 weight, bias, norm0 weight, bias, conv1 ...
    ours = [p.grad for conv, norm in zip(model._network.convs, model._network.norms)
            for p in (conv.weight, conv.bias, norm.weight, norm.bias)]
    theirs = [p.grad for p in plain.parameters()]
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def run_protonet(capsys, *argv):
    """`python protonet.py argv...`, in this process; returns what it printed."""
    float64_run.run_main('protonet.py', list(argv))
    return capsys.readouterr().out


def test_training_and_validation_run_through_step(tmp_path, monkeypatch):
    """The graded _step is what trains: each training batch (with gradients) and each
    validation batch (without) is one call of it."""
    step, calls = protonet.ProtoNet._step, []

    def counted(self, task_batch, *args, **kwargs):
        calls.append((len(task_batch), torch.is_grad_enabled()))
        return step(self, task_batch, *args, **kwargs)
    monkeypatch.setattr(protonet.ProtoNet, '_step', counted)
    protonet.main(protonet.parse_args(['--num_query', '1', '--batch_size', '2', '--log_dir',
                                       str(tmp_path), '--num_train_iterations', '2']))
    assert calls == [(2, True)] + [(2, False)] * 4 + [(2, True)]  # validation: 8 tasks


def test_short_real_training_learns_logs_checkpoints_and_tests(tmp_path, capsys, one_thread):
    log_dir = tmp_path / 'run'
    output = run_protonet(capsys, '--num_support', '5', '--num_query', '5',
                          '--batch_size', '4', '--num_train_iterations', '51', '--log_dir',
                          str(log_dir))
    validation = [float(v) for v in re.findall(r'Validation: .*query accuracy: ([\d.]+)', output)]
    assert len(validation) == 2 and validation[0] < 0.85 and validation[1] >= 0.9, output
    assert re.search(r'^Iteration 50: loss: \d\.\d{3}, support accuracy: \d\.\d{3}, '
                     r'query accuracy: \d\.\d{3}$', output, re.M)

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert set(events.Tags()['scalars']) == {
        'loss/train', 'train_accuracy/support', 'train_accuracy/query',
        'loss/val', 'val_accuracy/support', 'val_accuracy/query'}
    assert [e.step for e in events.Scalars('loss/val')] == [0, 50]

    state = torch.load(log_dir / 'state0.pt', weights_only=True)
    assert {'network_state_dict', 'optimizer_state_dict'} <= set(state)
    assert sorted(p.name for p in log_dir.glob('*.pt')) == ['state0.pt']  # no temp files left
    record = json.loads((log_dir / 'flags.json').read_text())
    assert record['script'] == 'protonet.py' and record['flags']['num_support'] == 5
    assert record['flags']['num_train_iterations'] == 51 and record['flags']['seed'] == 0
    assert '_hparams_/experiment' in events.PluginTagToContent('hparams')  # the same run

    output = run_protonet(capsys, '--test', '--log_dir', str(log_dir),
                          '--checkpoint_step', '0', '--num_support', '2', '--num_query', '10',
                          '--num_test_tasks', '100')
    assert 'Loaded checkpoint iteration 0.' in output
    match = re.search(r'^Accuracy over 100 test tasks: mean (\d\.\d{3}), '
                      r'95% confidence interval (\d\.\d{3})$', output, re.M)
    assert match and 0.2 < float(match[1]) <= 1 and 0 < float(match[2]) < 0.05, output
    result = json.loads((log_dir / 'test.way_5.support_2.query_10.step_0.json').read_text())
    assert (f"{result['mean']:.3f}", f"{result['ci95']:.3f}") == (match[1], match[2])
    assert result['num_tasks'] == len(result['accuracies']) == 100
    assert result['mean'] == pytest.approx(np.mean(result['accuracies']))
    assert (result['way'], result['shot'], result['query'], result['checkpoint_step']) == (
        5, 2, 10, 0)

"""Unit tests of the algorithms, graded as in the assignment: `python grader.py [test_id]`.

The assignment kept its "hidden" tests secret and compared with the staff solution; here they
run openly and compare with plain, loop-per-task implementations written below, which share
nothing with the code under test but the equations.
"""
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import omniglot
import protonet

TESTS = []


def graded(test_id, title, points, max_seconds):
    """Registers a test function; it passes when it returns without raising in time."""
    def register(function):
        TESTS.append((test_id, title, points, max_seconds, function))
        return function
    return register


def omniglot_batch(batch_size, num_way, num_support, num_query, seed=0):
    """A fixed batch of training tasks of the real Omniglot data."""
    loader = omniglot.get_omniglot_dataloader('train', batch_size, num_way, num_support,
                                              num_query, batch_size, seed=seed)
    return next(iter(loader))


# ----- plain reference implementations -----
def plain_protonet_network(network):
    """An nn.Sequential of the assignment's layers holding the weights of a ProtoNetNetwork."""
    layers = []
    for conv, norm in zip(network.convs, network.norms):
        batch_norm = nn.BatchNorm2d(conv.out_channels)
        batch_norm.weight.data.copy_(norm.weight.data)
        batch_norm.bias.data.copy_(norm.bias.data)
        layers += [nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding='same'),
                   batch_norm, nn.ReLU(), nn.MaxPool2d(2)]
        layers[-4].load_state_dict(conv.state_dict())
    return nn.Sequential(*layers, nn.Flatten()).train()


def reference_protonet_step(network, task_batch):
    """ProtoNet loss and accuracies, one task at a time, with a plain network.

    Args:
        network (nn.Module): maps images (n, 1, 28, 28) to latents (n, 64); in train mode
        task_batch (list of tuple): task tuples as from omniglot.get_omniglot_dataloader

    Returns:
        mean query loss (0-dim Tensor), mean support accuracy, mean query accuracy (floats)
    """
    losses, accuracies_support, accuracies_query = [], [], []
    for images_support, labels_support, images_query, labels_query in task_batch:
        latents_support, latents_query = network(images_support), network(images_query)
        classes = labels_support.unique()
        prototypes = torch.stack([latents_support[labels_support == c].mean(0) for c in classes])

        def logits(latents):
            return -((latents[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)

        losses.append(F.cross_entropy(logits(latents_query), labels_query))
        accuracies_support.append(
            (logits(latents_support).argmax(1) == labels_support).float().mean().item())
        accuracies_query.append(
            (logits(latents_query).argmax(1) == labels_query).float().mean().item())
    return torch.stack(losses).mean(), np.mean(accuracies_support), np.mean(accuracies_query)


# ----- the graded tests -----
@graded('1b-0-hidden', 'ProtoNet _step: loss and accuracies equal a plain implementation',
        points=8, max_seconds=60)
def test_protonet_step():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as log_dir:
        model = protonet.ProtoNet(0.001, log_dir, 'cpu')
    task_batch = omniglot_batch(batch_size=4, num_way=5, num_support=5, num_query=15)
    loss, accuracy_support, accuracy_query = model._step(task_batch)
    expected = reference_protonet_step(plain_protonet_network(model._network), task_batch)
    assert loss.dim() == 0 and loss.requires_grad, 'the loss must be a 0-dim tensor with grad'
    assert isinstance(accuracy_support, np.float64) and isinstance(accuracy_query, np.float64)
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([accuracy_support, accuracy_query], expected[1:], atol=1e-12)


def run(test_ids):
    """Runs the chosen tests with the assignment's framing; returns (points got, points max)."""
    got = total = 0
    for test_id, title, points, max_seconds, function in TESTS:
        if test_ids and test_id not in test_ids:
            continue
        print(f'----- START {test_id}: {title}')
        start = time.perf_counter()
        try:
            function()
            passed = True
        except Exception as error:  # a failed test is reported, then grading goes on
            print(f'FAIL: {type(error).__name__}: {error}')
            passed = False
        seconds = time.perf_counter() - start
        if passed and seconds > max_seconds:
            print(f'FAIL: took longer than the {max_seconds} seconds allowed')
            passed = False
        got += points if passed else 0
        total += points
        print(f'----- END {test_id} [took {timedelta(seconds=seconds)} '
              f'(max allowed {max_seconds} seconds), {points if passed else 0}/{points} points]')
    print(f'========== END GRADING [{got}/{total} points]')
    return got, total


if __name__ == '__main__':
    known = {test[0] for test in TESTS}
    unknown = [test_id for test_id in sys.argv[1:] if test_id not in known]
    if unknown:
        print(f"error: unknown test id {', '.join(unknown)}; known: {', '.join(sorted(known))}",
              file=sys.stderr)
        sys.exit(2)
    got, total = run(sys.argv[1:])
    sys.exit(0 if got == total else 1)

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

import maml
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
    """A fixed batch of training tasks of the real Omniglot data, asked for with the keywords
    the assignment's grader uses."""
    loader = omniglot.get_omniglot_dataloader(
        split='train', batch_size=batch_size, num_way=num_way, num_support=num_support,
        num_query=num_query, num_tasks_per_epoch=batch_size, num_workers=1, seed=seed)
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


def reference_maml_logits(weights, images):
    """The MAML network written out layer by layer.

    Args:
        weights (list of Tensor): [conv0, b0, conv1, b1, conv2, b2, conv3, b3, w4, b4]
        images (Tensor): shape (n, 1, 28, 28)

    Returns:
        logits, shape (n, num_outputs)
    """
    x = images
    for layer in range(4):
        x = F.conv2d(x, weights[2 * layer], weights[2 * layer + 1], padding=1)
        x = F.relu(F.batch_norm(x, None, None, training=True))
    return x.mean(dim=(2, 3)) @ weights[8].t() + weights[9]


def reference_maml_adapt(weights, learning_rates, images, labels, num_steps, create_graph):
    """Plain gradient descent on one task's support loss.

    Returns:
        adapted weights (list), support accuracies before each step and after the last (list)
    """
    accuracies = []
    for _ in range(num_steps):
        logits = reference_maml_logits(weights, images)
        accuracies.append((logits.argmax(1) == labels).float().mean().item())
        gradients = torch.autograd.grad(F.cross_entropy(logits, labels), weights,
                                        create_graph=create_graph)
        weights = [w - lr * g for w, lr, g in zip(weights, learning_rates, gradients)]
    logits = reference_maml_logits(weights, images)
    accuracies.append((logits.argmax(1) == labels).float().mean().item())
    return weights, accuracies


def reference_maml_step(weights, learning_rates, task_batch, num_steps):
    """Second-order MAML loss and accuracies, one task at a time.

    Args:
        weights (list of Tensor): leaf tensors that require grad, in the order of
            reference_maml_logits
        learning_rates (list of float): inner learning rate of each weight
        task_batch (list of tuple): task tuples as from omniglot.get_omniglot_dataloader
        num_steps (int): inner steps

    Returns:
        mean query loss (0-dim Tensor, with grad), support accuracies averaged over tasks
        (numpy array of shape (num_steps + 1,)), mean query accuracy (float)
    """
    losses, accuracies_support, accuracies_query = [], [], []
    for images_support, labels_support, images_query, labels_query in task_batch:
        adapted, accuracies = reference_maml_adapt(weights, learning_rates, images_support,
                                                   labels_support, num_steps, create_graph=True)
        logits = reference_maml_logits(adapted, images_query)
        losses.append(F.cross_entropy(logits, labels_query))
        accuracies_support.append(accuracies)
        accuracies_query.append((logits.argmax(1) == labels_query).float().mean().item())
    return (torch.stack(losses).mean(), np.mean(accuracies_support, axis=0),
            np.mean(accuracies_query))


def to_float64(thing):
    """A MAML (its meta-parameters converted in place) or a task batch, in float64."""
    if isinstance(thing, maml.MAML):
        for value in [*thing._meta_parameters.values(), *thing._inner_lrs.values()]:
            value.data = value.data.double()
        return thing
    return [tuple(t.double() if t.is_floating_point() else t for t in task) for task in thing]


def reference_maml_weights(model):
    """Copies of a MAML's meta-parameters as a list of leaf tensors that require grad."""
    return [model._meta_parameters[key].detach().clone().requires_grad_() for key in
            ['conv0', 'b0', 'conv1', 'b1', 'conv2', 'b2', 'conv3', 'b3', 'w4', 'b4']]


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


MAML_KEYS = ['conv0', 'b0', 'conv1', 'b1', 'conv2', 'b2', 'conv3', 'b3', 'w4', 'b4']


def maml_model():
    """The MAML configuration of the assignment's tests, seeded."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as log_dir:
        return maml.MAML(num_outputs=5, num_inner_steps=1, inner_lr=0.4, learn_inner_lrs=False,
                         outer_lr=0.001, log_dir=log_dir, device='cpu')


def maml_task(seed=0):
    """One 5-way 1-shot 15-query training task: (images, labels) of its support set."""
    images_support, labels_support, _, _ = omniglot_batch(1, 5, 1, 15, seed=seed)[0]
    return images_support, labels_support


def check_inner_loop_gradients(train):
    """_inner_loop's third value read as the assignment's grader reads it, `for grad in
    gradients`: the tensors torch.autograd.grad returns, one per meta-parameter in
    _meta_parameters order, requiring grad exactly when train."""
    model = maml_model()
    _, _, gradients = model._inner_loop(*maml_task(), train=train)
    assert isinstance(gradients, (tuple, list)), (
        f'gradients must be the sequence torch.autograd.grad returns, got a '
        f'{type(gradients).__name__}')
    shapes = [tuple(grad.shape) for grad in gradients]
    expected = [tuple(value.shape) for value in model._meta_parameters.values()]
    assert shapes == expected, f'gradient shapes {shapes}, expected {expected} (parameter order)'
    assert all(grad.requires_grad == train for grad in gradients), (
        f'with train={train}, every gradient must {"" if train else "not "}require grad')


@graded('2a-0-basic', 'MAML _inner_loop(train=False): no gradient requires grad',
        points=2, max_seconds=60)
def test_inner_loop_eval_gradients():
    check_inner_loop_gradients(train=False)


@graded('2a-1-basic', 'MAML _inner_loop(train=True): every gradient requires grad',
        points=2, max_seconds=60)
def test_inner_loop_train_gradients():
    check_inner_loop_gradients(train=True)


@graded('2a-2-basic', 'MAML _inner_loop: adapted parameter shapes and number of accuracies',
        points=4, max_seconds=60)
def test_inner_loop_shapes():
    expected = {'conv0': (32, 1, 3, 3), 'b0': (32,), 'conv1': (32, 32, 3, 3), 'b1': (32,),
                'conv2': (32, 32, 3, 3), 'b2': (32,), 'conv3': (32, 32, 3, 3), 'b3': (32,),
                'w4': (5, 32), 'b4': (5,)}
    for train in (False, True):
        parameters, accuracies, _ = maml_model()._inner_loop(*maml_task(), train=train)
        shapes = {key: tuple(value.shape) for key, value in parameters.items()}
        assert shapes == expected, f'train={train}: adapted shapes {shapes}, expected {expected}'
        assert len(accuracies) == 2, f'{len(accuracies)} accuracies for 1 inner step, expected 2'


@graded('2a-3-hidden', 'MAML _inner_loop: adapted parameters and accuracies equal a plain '
        'implementation', points=4, max_seconds=60)
def test_inner_loop_values():
    # In float64: in float32 the convolution biases' gradients (zero in exact arithmetic, as
    # batch norm follows) are rounding noise of the size of the tolerance.
    for seed in range(2):
        images, labels = maml_task(seed)
        images = images.double()
        model = to_float64(maml_model())
        inner_lrs = [model._inner_lrs[key].item() for key in MAML_KEYS]  # 0.4 as float32 holds it
        expected, expected_accuracies = reference_maml_adapt(
            reference_maml_weights(model), inner_lrs, images, labels, 1, create_graph=False)
        for train in (False, True):
            parameters, accuracies, _ = model._inner_loop(images, labels, train=train)
            for key, value in zip(MAML_KEYS, expected):
                torch.testing.assert_close(parameters[key].detach(), value.detach(),
                                           rtol=1e-9, atol=1e-12, msg=lambda m: f'{key}: {m}')
            np.testing.assert_allclose(accuracies, expected_accuracies, atol=1e-12)


@graded('2b-0-basic', 'MAML _outer_step: 0-dim loss, support accuracies of shape (2,), '
        'float64 query accuracy', points=5, max_seconds=120)
def test_outer_step_types():
    task_batch = omniglot_batch(batch_size=2, num_way=5, num_support=1, num_query=15)
    for train in (True, False):
        loss, accuracies_support, accuracy_query = maml_model()._outer_step(task_batch, train)
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0, 'the loss must be a 0-dim tensor'
        assert loss.requires_grad == train, f'train={train}: loss.requires_grad is wrong'
        assert isinstance(accuracies_support, np.ndarray) and accuracies_support.shape == (2,), (
            f'support accuracies must be a numpy array of shape (2,), got {accuracies_support!r}')
        assert type(accuracy_query) is np.float64, (
            f'the query accuracy must be a numpy float64, got {type(accuracy_query)}')


@graded('2b-1-hidden', 'MAML _outer_step: loss, accuracies and meta-gradient equal a plain '
        'implementation', points=7, max_seconds=300)
def test_outer_step_values():
    task_batch = omniglot_batch(batch_size=4, num_way=5, num_support=1, num_query=15)
    model = maml_model()
    weights = reference_maml_weights(model)
    expected = reference_maml_step(weights, [0.4] * 10, task_batch, num_steps=1)
    loss, accuracies_support, accuracy_query = model._outer_step(task_batch, train=True)
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(accuracies_support, expected[1], atol=1e-12)
    np.testing.assert_allclose(accuracy_query, expected[2], atol=1e-12)
    # The meta-gradient, through the inner gradient (second order), matches too: in float64,
    # since float32 second derivatives through batch norm on 5 images keep only ~3 digits.
    model_64, batch_64 = to_float64(maml_model()), to_float64(task_batch)
    weights = reference_maml_weights(model_64)
    model_64._outer_step(batch_64, train=True)[0].backward()
    reference_maml_step(weights, [0.4] * 10, batch_64, num_steps=1)[0].backward()
    for key, weight in zip(MAML_KEYS, weights):
        torch.testing.assert_close(model_64._meta_parameters[key].grad, weight.grad,
                                   rtol=1e-6, atol=1e-9, msg=lambda m: f'd loss / d {key}: {m}')
    with torch.no_grad():
        loss_eval, accuracies_eval, query_eval = model._outer_step(task_batch, train=False)
    torch.testing.assert_close(loss_eval, expected[0].detach(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(accuracies_eval, expected[1], atol=1e-12)
    np.testing.assert_allclose(query_eval, expected[2], atol=1e-12)


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

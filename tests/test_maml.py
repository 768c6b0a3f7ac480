"""maml.py: meta-gradients against independent computations, first order, graphs, resuming,
user errors.

Gradient checks run in float64 on tiny random tasks (3-way, 2 images per class, 7x7 pixels: the
network averages over positions, so any image size works) against the plain implementation of
reference.py and against central finite differences of our own objective; the rest uses real
Omniglot tasks.
"""
import argparse
import inspect

import pytest
import torch
import torch.nn.functional as F

import maml
import mamlpp
import omniglot
import protonet
import reference
import training

KEYS = reference.MAML_KEYS
NUM_WAY = 3


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny tensors


# ----- helpers -----
def tiny_tasks(num_tasks=2, shots=2, size=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_WAY).repeat_interleave(shots)

    def images():
        return torch.randn(NUM_WAY * shots, 1, size, size, generator=generator,
                           dtype=torch.float64)
    return [(images(), labels, images(), labels) for _ in range(num_tasks)]


def float64_model(tmp_path, num_inner_steps, learn_inner_lrs=True, first_order=False):
    """A MAML in float64 with a different inner learning rate per parameter (catches mix-ups)."""
    torch.manual_seed(0)
    model = maml.MAML(NUM_WAY, num_inner_steps, 0.4, learn_inner_lrs, 0.001, str(tmp_path), 'cpu',
                      first_order=first_order)
    model._meta_parameters = {k: v.detach().double().requires_grad_()
                              for k, v in model._meta_parameters.items()}
    model._inner_lrs = {k: torch.tensor(0.1 + 0.03 * i, dtype=torch.float64,
                                        requires_grad=learn_inner_lrs)
                        for i, k in enumerate(KEYS)}
    return model


def values(model):
    return ({k: v.detach() for k, v in model._meta_parameters.items()},
            {k: v.detach() for k, v in model._inner_lrs.items()})


def meta_gradient(model, tasks):
    loss, _, _ = model._outer_step(tasks, train=True)
    loss.backward()
    return ({k: v.grad for k, v in model._meta_parameters.items()},
            {k: v.grad for k, v in model._inner_lrs.items()})


def assert_dicts_close(actual, expected, **tolerances):
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **tolerances,
                                   msg=lambda m: f'{key}: {m}')


# ----- the meta-gradient -----
@pytest.mark.parametrize('num_inner_steps', [1, 3])
def test_second_order_meta_gradient_equals_the_reference(tmp_path, num_inner_steps):
    model = float64_model(tmp_path, num_inner_steps)
    tasks = tiny_tasks()
    parameters, lrs = (reference.leaf_copies(tensors) for tensors in values(model))
    reference.maml_outer_step(parameters, lrs, tasks, num_inner_steps)[0].backward()
    expected = [{k: v.grad for k, v in tensors.items()} for tensors in (parameters, lrs)]
    got = meta_gradient(model, tasks)
    assert_dicts_close(got[0], expected[0], rtol=1e-9, atol=1e-12)
    assert_dicts_close(got[1], expected[1], rtol=1e-9, atol=1e-12)  # learned inner lrs
    assert all(g.abs().sum() > 0 for g in got[1].values())


@pytest.mark.parametrize('num_inner_steps', [1, 3])
def test_second_order_meta_gradient_equals_finite_differences(tmp_path, num_inner_steps):
    """Directional derivative along a random direction of the MAML objective written apart
    from ours (reference.maml_outer_step: its own forward, inner steps and query loss), at the
    model's weights and inner learning rates: a wrong sign or order in the model's inner loop
    moves the model's gradient away from it."""
    model = float64_model(tmp_path, num_inner_steps)
    tasks = tiny_tasks(seed=1)
    gradients = meta_gradient(model, tasks)
    tensors = list(model._meta_parameters.values()) + list(model._inner_lrs.values())
    grads = list(gradients[0].values()) + list(gradients[1].values())
    generator = torch.Generator().manual_seed(0)
    directions = [torch.randn(t.shape, generator=generator, dtype=torch.float64)
                  for t in tensors]
    norm = torch.cat([d.flatten() for d in directions]).norm()
    directions = [d / norm for d in directions]
    # A step of 1e-7 (the direction has norm 1): the objective is only piecewise smooth, since
    # the inner gradient jumps where a ReLU input crosses 0, and larger steps cross such kinks.
    epsilon = 1e-7

    def objective(sign):
        with torch.no_grad():
            for t, d in zip(tensors, directions):
                t.add_(sign * epsilon * d)
            parameters, lrs = values(model)
            with torch.enable_grad():  # the reference's inner loop differentiates
                loss = reference.maml_outer_step(reference.leaf_copies(parameters), lrs, tasks,
                                                 num_inner_steps)[0].item()
            for t, d in zip(tensors, directions):
                t.sub_(sign * epsilon * d)
        return loss

    numeric = (objective(1) - objective(-1)) / (2 * epsilon)
    analytic = sum((g * d).sum() for g, d in zip(grads, directions)).item()
    assert abs(numeric - analytic) <= 1e-5 * abs(analytic), (numeric, analytic)
    # the model's loss is that objective's value
    parameters, lrs = values(model)
    assert model._outer_step(tasks, train=False)[0].item() == pytest.approx(
        reference.maml_outer_step(reference.leaf_copies(parameters), lrs, tasks,
                                  num_inner_steps)[0].item(), rel=1e-12)


def test_a_fixed_inner_lr_stays_fixed_and_gets_no_gradient(tmp_path):
    """Without --learn_inner_lrs the inner learning rates are constants: no gradient reaches
    them, the optimizer leaves them at --inner_lr, and the checkpoint holds that value."""
    torch.manual_seed(0)
    model = reference.maml_in_float64(maml.MAML(NUM_WAY, 1, 0.25, False, 0.01, str(tmp_path),
                                                'cpu'))
    assert not any(value.requires_grad for value in model._inner_lrs.values())
    for step in range(2):
        model._train_step(tiny_tasks(seed=step), step)
    for key, value in model._inner_lrs.items():
        assert value.grad is None, key
        assert value.item() == 0.25, key
    assert all(value.grad is not None for value in model._meta_parameters.values())
    model._save(0)
    saved = torch.load(tmp_path / 'state0.pt', weights_only=True)['inner_lrs']
    assert all(value.item() == 0.25 for value in saved.values())


@pytest.mark.parametrize('num_inner_steps', [1, 3])
def test_first_order_meta_gradient(tmp_path, num_inner_steps):
    """Weights: the query-loss gradient at the adapted parameters. Inner lrs: the gradient
    through phi = theta - sum_k alpha * g_k with the g_k constant, i.e. -sum_k <g_k, dL/dphi>."""
    tasks = tiny_tasks(seed=2)
    model = float64_model(tmp_path, num_inner_steps, first_order=True)
    parameters, lrs = values(model)
    expected_weights = {k: torch.zeros_like(v) for k, v in parameters.items()}
    expected_lrs = {k: torch.zeros_like(v) for k, v in lrs.items()}
    for xs, ys, xq, yq in tasks:
        adapted, _, steps = reference.maml_adapt(reference.leaf_copies(parameters), lrs, xs, ys,
                                                 num_inner_steps, create_graph=False)
        adapted = reference.leaf_copies(adapted)
        query_loss = F.cross_entropy(reference.maml_forward(adapted, xq), yq)
        query_gradient = dict(zip(adapted, torch.autograd.grad(query_loss,
                                                               list(adapted.values()))))
        for k in KEYS:
            expected_weights[k] += query_gradient[k] / len(tasks)
            expected_lrs[k] -= sum((g[k] * query_gradient[k]).sum() for g in steps) / len(tasks)
    got = meta_gradient(model, tasks)
    assert_dicts_close(got[0], expected_weights, rtol=1e-9, atol=1e-12)
    assert_dicts_close(got[1], expected_lrs, rtol=1e-9, atol=1e-12)

    second_order = meta_gradient(float64_model(tmp_path, num_inner_steps), tasks)
    for k in KEYS:
        difference = (second_order[0][k] - got[0][k]).norm() / second_order[0][k].norm()
        assert difference > 1e-3, f'first- and second-order gradients of {k} agree'


# ----- graphs -----
def autograd_node_names(tensor):
    """The class names of every node of the autograd graph that produced tensor."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(child for child, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize('tasks', ['loop', 'batched'])
def test_the_training_graph_holds_the_inner_gradients_exactly_when_second_order(tmp_path,
                                                                               tasks):
    """The graph _evaluate builds in training (the one backward differentiates): second order,
    it holds the derivatives of the inner gradients' own backward operations (nodes named
    ...BackwardBackward, for the convolutions, batch norms and ReLUs of the inner step); first
    order, none; in evaluation, no graph at all."""
    for first_order in (False, True):
        torch.manual_seed(0)
        model = reference.maml_in_float64(maml.MAML(NUM_WAY, 2, 0.4, True, 0.001, str(tmp_path),
                                                    'cpu', first_order=first_order,
                                                    settings=training.RunSettings(tasks=tasks)))
        loss, _ = model._evaluate(tiny_tasks(), train=True)
        double_backward = {name for name in autograd_node_names(loss)
                           if 'BackwardBackward' in name}
        if first_order:
            assert double_backward == set()
        else:
            assert {'ConvolutionBackwardBackward0', 'NativeBatchNormBackwardBackward0',
                    'ThresholdBackwardBackward0'} <= double_backward, double_backward
        assert model._evaluate(tiny_tasks(), train=False)[0].grad_fn is None


def test_inner_loop_graphs(tmp_path):
    images, labels, _, _ = tiny_tasks(num_tasks=1)[0]
    for first_order in (False, True):
        model = float64_model(tmp_path, 2, first_order=first_order)
        parameters, accuracies, gradients = model._inner_loop(images, labels, train=False)
        assert len(accuracies) == 3
        assert not any(t.requires_grad or t.grad_fn for t in parameters.values())
        assert not any(t.requires_grad or t.grad_fn for t in gradients)
        assert model._outer_step(tiny_tasks(), train=False)[0].grad_fn is None

        parameters, _, gradients = model._inner_loop(images, labels, train=True)
        assert all(t.requires_grad for t in parameters.values())
        # second order: the inner gradients are part of the graph; first order: constants
        assert all(t.requires_grad != first_order for t in gradients)

    # evaluation works inside torch.no_grad() too (the inner loop needs gradients)
    with torch.no_grad():
        _, accuracies, gradients = model._inner_loop(images, labels, train=False)
    assert len(gradients) == len(KEYS)


def test_zero_inner_steps_is_the_unadapted_network(tmp_path):
    images, labels, _, _ = tiny_tasks(num_tasks=1)[0]
    model = float64_model(tmp_path, 0)
    parameters, accuracies, gradients = model._inner_loop(images, labels, train=False)
    assert len(accuracies) == 1 and gradients == ()
    assert_dicts_close(parameters, values(model)[0], rtol=0, atol=0)


# ----- resuming -----
def parse(argv):
    parser = argparse.ArgumentParser()
    maml.add_maml_args(parser, num_train_iterations=15000)
    return parser.parse_args(argv)


def train(log_dir, num_iterations, checkpoint_step, save_interval,
          options=None, num_inner_steps=1):
    """Trains a tiny MAML through training.main, as maml.main does; returns it."""
    args = parse(['--log_dir', str(log_dir), '--num_way', '3', '--num_support', '1',
                  '--num_query', '2', '--batch_size', '2', '--learn_inner_lrs',
                  '--num_train_iterations', str(num_iterations),
                  '--checkpoint_step', str(checkpoint_step),
                  '--num_inner_steps', str(num_inner_steps)])
    models = []

    def build(log_dir, device):
        arguments = (args.num_way, args.num_inner_steps, args.inner_lr, args.learn_inner_lrs,
                     0.01, log_dir, device)
        settings = training.RunSettings(save_interval=save_interval)
        models.append(mamlpp.MAMLpp(*arguments, options=options, settings=settings) if options
                      else maml.MAML(*arguments, settings=settings))
        return models[0]
    training.main(args, omniglot.OmniglotTasks(args.num_way, args.num_support, args.num_query,
                                               args.seed), build, 'unused')
    return models[0]


def test_training_calls_outer_step_once_per_batch_and_inner_loop_once_per_task(tmp_path,
                                                                                monkeypatch):
    """The graded methods are the code that trains: in the loop path, every training batch
    goes through _outer_step once and each of its tasks through _inner_loop once (and the
    validation and --test tasks likewise, with train=False)."""
    calls = []

    def spy(name):
        method = getattr(maml.MAML, name)

        def counted(*args, **kwargs):
            calls.append((name, inspect.signature(method).bind(*args, **kwargs).arguments['train']))
            return method(*args, **kwargs)
        monkeypatch.setattr(maml.MAML, name, counted)
    spy('_outer_step')
    spy('_inner_loop')
    model = train(tmp_path, num_iterations=3, checkpoint_step=-1, save_interval=100)
    assert not model._batched
    assert calls.count(('_outer_step', True)) == 3  # batches of 2 tasks
    assert calls.count(('_inner_loop', True)) == 3 * 2
    assert calls.count(('_outer_step', False)) == 4  # step 0's validation: 8 tasks
    assert calls.count(('_inner_loop', False)) == 8


def test_resume_continues_training_exactly(tmp_path):
    straight = train(tmp_path, num_iterations=6, checkpoint_step=-1, save_interval=3)
    assert (tmp_path / 'state3.pt').is_file()
    checkpoint = torch.load(tmp_path / 'state3.pt', weights_only=True)
    assert {'meta_parameters', 'inner_lrs', 'optimizer_state_dict'} <= set(checkpoint)

    resumed = train(tmp_path, num_iterations=6, checkpoint_step=3, save_interval=100)
    held = resumed._optimizer.param_groups[0]['params']
    assert all(a is b for a, b in zip(held, [*resumed._meta_parameters.values(),
                                             *resumed._inner_lrs.values()]))
    for name in ('meta_parameters', 'inner_lrs'):
        final = getattr(resumed, '_' + name)
        assert_dicts_close({k: v.detach() for k, v in final.items()},
                           {k: v.detach() for k, v in getattr(straight, '_' + name).items()},
                           rtol=0, atol=1e-6)
        # the original assignment's bug: after loading, the parameters no longer moved
        moved = [k for k in final if not torch.equal(final[k].detach(), checkpoint[name][k])]
        assert moved == list(final), f'{name} that did not change after resuming: ' \
                                     f'{sorted(set(final) - set(moved))}'

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path)).Reload()
    tags = set(events.Tags()['scalars'])
    assert {'loss/train', 'train_accuracy/pre_adapt_support', 'train_accuracy/post_adapt_query',
            'loss/val', 'val_accuracy/post_adapt_support', 'inner_lrs/conv0',
            'inner_lrs/b4'} <= tags, tags


def test_checkpoint_loads_with_other_inner_steps_and_shots(tmp_path):
    torch.manual_seed(0)
    trained = maml.MAML(NUM_WAY, 1, 0.4, True, 0.001, str(tmp_path), 'cpu')
    with torch.no_grad():
        trained._inner_lrs['w4'].fill_(0.7)
    trained._save(0)
    torch.manual_seed(1)
    tested = maml.MAML(NUM_WAY, 5, 0.4, False, 0.001, str(tmp_path), 'cpu')
    tested.load(0)
    assert tested._inner_lrs['w4'].item() == pytest.approx(0.7)
    assert_dicts_close(values(tested)[0], values(trained)[0], rtol=0, atol=0)


def test_default_log_dir():
    args = parse([])
    assert maml.default_log_dir(args) == (
        './logs/maml/omniglot.way_5.support_1.query_15.inner_steps_1.inner_lr_0.4'
        '.learn_inner_lrs_False.outer_lr_0.001.batch_size_16')
    args = parse(['--first_order', '--learn_inner_lrs', '--num_inner_steps', '5'])
    assert maml.default_log_dir(args) == (
        './logs/maml/omniglot.way_5.support_1.query_15.inner_steps_5.inner_lr_0.4'
        '.learn_inner_lrs_True.outer_lr_0.001.batch_size_16.first_order_True')


# ----- user errors -----
def test_a_checkpoint_of_another_model_is_one_line(tmp_path, one_line_error):
    """(The flags' own checks are in test_refusals.py.)"""
    protonet.ProtoNet(0.001, str(tmp_path / 'first'), 'cpu')._save(0)
    maml.MAML(3, 1, 0.4, False, 0.001, str(tmp_path / 'second'), 'cpu')._save(0)
    for folder, expected in (('first', 'protonet'), ('second', '3-way')):
        argv = ['--log_dir', str(tmp_path / folder), '--checkpoint_step', '0', '--test']
        assert expected in one_line_error(lambda: maml.main(maml.parse_args(argv)))


def test_test_result_file_names_the_task_shape_and_inner_steps():
    args = parse(['--num_support', '3', '--num_inner_steps', '2', '--checkpoint_step', '7'])
    assert training.test_result_path(args, 'logs') == (
        'logs/test.way_5.support_3.query_15.inner_steps_2.step_7.json')


def test_forward_as_the_assignment_s_outer_step_calls_it(tmp_path, omniglot_batch):
    """The assignment's _outer_step: parameters, _, _ = self._inner_loop(images_support,
    labels_support, train); logits = self._forward(images_query, parameters)."""
    images_support, labels_support, images_query, _ = reference.to_float64(
        omniglot_batch(1, 5, 1, 3))[0]
    model = reference.maml_in_float64(maml.MAML(5, 1, 0.4, False, 0.001, str(tmp_path), 'cpu'))
    parameters, _, _ = model._inner_loop(images_support, labels_support, True)
    logits = model._forward(images_query, parameters)
    assert logits.shape == (15, 5) and logits.requires_grad
    torch.testing.assert_close(logits, reference.maml_forward(parameters, images_query),
                               rtol=1e-10, atol=1e-12)

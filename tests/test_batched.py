"""--tasks batched: all tasks of a batch in one torch.func.vmap call equal the per-task loop.

In float64, on the same weights and batch, the two paths must give the same loss, the same
per-task accuracies and the same gradient of every parameter the optimizer holds (second order
included), for ProtoNet on real Omniglot tasks, ProtoNet with the metabolism FCNet, and MAML in
each of its configurations, in training and in evaluation. Then the flag end to end, its
errors, what `auto` picks, and bfloat16 autocast on the batched path.
"""
import argparse
import contextlib
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import maml
import mamlpp
import protonet
import reference
import run_metabolism
import training
import util

# Tasks small enough for float64 second order in a second: 3-way, 1 or 2 shots, 2 queries.
NUM_WAY = 3
PROTONET_MODULES = {'ProtoNetNetwork': protonet.ProtoNetNetwork, 'FCNet': run_metabolism.FCNet}


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny tensors


def evaluate(learner, task_batch, train):
    """(loss, metrics, gradient of every parameter the optimizer holds; None where it has none)
    of learner._evaluate, as the training loop calls it."""
    loss, metrics = learner._evaluate(task_batch, train)
    parameters = learner._optimizer.param_groups[0]['params']
    for parameter in parameters:
        parameter.grad = None
    if train:
        loss.backward()
    return loss.detach(), metrics, [p.grad for p in parameters]


def assert_same_results(loop, batched):
    """loop and batched: evaluate's results of the two paths on the same weights and batch."""
    (loss, metrics, gradients), (loss_b, metrics_b, gradients_b) = loop, batched
    torch.testing.assert_close(loss_b, loss, rtol=1e-12, atol=0)
    assert list(metrics_b) == list(metrics)
    for key, value in metrics.items():  # the same predictions, so the same fractions exactly
        np.testing.assert_array_equal(metrics_b[key], value, err_msg=key)
    assert [g is None for g in gradients_b] == [g is None for g in gradients]
    scale = max(g.abs().max() for g in gradients if g is not None) if any(
        g is not None for g in gradients) else 0
    for i, (actual, expected) in enumerate(zip(gradients_b, gradients, strict=True)):
        if expected is not None:  # relative to the largest: zero-in-theory biases are noise
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12 * scale,
                                       msg=lambda m: f'gradient {i}: {m}')


def metabolism_tasks(num_tasks=3, num_support=5, num_query=10, seed=0):
    """Synthetic 2-way tasks of sparse 1024-bit fingerprints, denser in later tasks (so the
    tasks' batch statistics differ), float64."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(2)

    def features(shots, density):
        return (torch.rand(2 * shots, 1024, generator=generator) < density).double()
    return [(features(num_support, 0.02 * (t + 1)), labels.repeat_interleave(num_support),
             features(num_query, 0.02 * (t + 1)), labels.repeat_interleave(num_query))
            for t in range(num_tasks)]


# ----- ProtoNet -----
@pytest.mark.parametrize('module', PROTONET_MODULES)
@pytest.mark.parametrize('train', [True, False])
def test_protonet_batched_equals_the_loop_in_float64(tmp_path, omniglot_batch, module, train):
    task_batch = (reference.to_float64(omniglot_batch(3, NUM_WAY, 2, 2, seed=5))
                  if module == 'ProtoNetNetwork' else metabolism_tasks())
    results = []
    for tasks in ('loop', 'batched'):
        torch.manual_seed(0)
        learner = protonet.ProtoNet(0.001, str(tmp_path), 'cpu', learner=PROTONET_MODULES[module](),
                                    tasks=tasks)
        with torch.no_grad():  # batch norms' weights and biases away from 1 and 0: they matter
            for parameter in learner._network.parameters():
                if parameter.dim() == 1:
                    parameter.uniform_(0.5, 1.5)
        learner._network.double()
        results.append(evaluate(learner, task_batch, train))
    assert_same_results(*results)
    assert results[0][1]['query'].min() < 1  # not a degenerate all-correct batch


@pytest.mark.parametrize('module', PROTONET_MODULES)
def test_protonet_networks_hold_no_running_statistics_to_update_under_vmap(module):
    assert list(PROTONET_MODULES[module]().buffers()) == []


# ----- MAML -----
def distinct_lrs_and_norms(model):
    """Every inner learning rate different (per key and per step) and the per-step batch-norm
    rows away from 1 and 0, so that a mix-up of keys, steps or rows changes the numbers."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, value in enumerate(model._inner_lrs.values()):
            value.copy_(0.1 + 0.03 * i + 0.01 * torch.arange(value.numel()).view(value.shape))
        for value in model._step_norms.values() if isinstance(model, mamlpp.MAMLpp) else ():
            value.add_(0.3 * torch.randn(value.shape, generator=generator, dtype=value.dtype))
    return model


MAML_CONFIGS = {  # name: (MAML's keyword arguments, the training iteration)
    'second order': ({}, 0),
    'learned inner lrs': ({'learn_inner_lrs': True}, 0),
    'first order': ({'first_order': True, 'learn_inner_lrs': True}, 0),
    'multi-step loss': ({'options': mamlpp.Options(msl_iterations=10)}, 3),
    'derivative-order annealing, first-order part': (
        {'options': mamlpp.Options(first_order_iterations=5)}, 2),
    'per-step inner lrs': ({'options': mamlpp.Options(per_step_inner_lrs=True)}, 0),
    'per-step batch norm': ({'options': mamlpp.Options(per_step_bn=True)}, 0),
    'all of MAML++': ({'options': mamlpp.Options(msl_iterations=10, first_order_iterations=2,
                                             per_step_inner_lrs=True, per_step_bn=True,
                                             cosine_iterations=10)}, 4),
}


# The configurations reference.maml_outer_step computes too: whether second order.
REFERENCE_SECOND_ORDER = {'second order': True, 'learned inner lrs': True, 'first order': False,
                          'derivative-order annealing, first-order part': False}


def reference_results(model, task_batch):
    """(loss, gradients as evaluate lists them: the weights', then the inner lrs' where
    learned, else None) of reference.maml_outer_step at the model's values."""
    parameters = reference.leaf_copies(model._meta_parameters)
    learned = model._learn_inner_lrs
    lrs = (reference.leaf_copies(model._inner_lrs) if learned else
           {key: value.detach() for key, value in model._inner_lrs.items()})
    loss = reference.maml_outer_step(parameters, lrs, task_batch, model._num_inner_steps,
                                     create_graph=model._second_order())[0]
    loss.backward()
    return loss.detach(), [v.grad for v in parameters.values()] + [
        v.grad if learned else None for v in lrs.values()]


@pytest.mark.parametrize('config', MAML_CONFIGS)
@pytest.mark.parametrize('num_inner_steps', [1, 2])
def test_maml_batched_equals_the_loop_in_float64(tmp_path, omniglot_batch, config,
                                                 num_inner_steps):
    """Both paths against each other; where the reference computes the configuration, both
    against the reference too (so a change to the math both share cannot pass)."""
    options, iteration = MAML_CONFIGS[config]
    task_batch = reference.to_float64(omniglot_batch(2, NUM_WAY, 1, 2, seed=6))
    results = {}
    for tasks in ('loop', 'batched'):
        torch.manual_seed(0)
        learner = mamlpp.MAMLpp if 'options' in options else maml.MAML
        model = distinct_lrs_and_norms(reference.maml_in_float64(learner(
            NUM_WAY, num_inner_steps, 0.4, outer_lr=0.001, log_dir=str(tmp_path), device='cpu',
            settings=training.RunSettings(tasks=tasks),
            **{'learn_inner_lrs': False, **options})))
        model._iteration = iteration
        if config in REFERENCE_SECOND_ORDER:
            assert model._second_order() == REFERENCE_SECOND_ORDER[config]
            expected = reference_results(model, task_batch)
        results[tasks] = [evaluate(model, task_batch, train) for train in (True, False)]
        if config in REFERENCE_SECOND_ORDER:
            loss, _, gradients = results[tasks][0]
            torch.testing.assert_close(loss, expected[0], rtol=1e-12, atol=0)
            assert [g is None for g in gradients] == [g is None for g in expected[1]], tasks
            for i, (actual, want) in enumerate(zip(gradients, expected[1], strict=True)):
                if want is not None:
                    torch.testing.assert_close(actual, want, rtol=1e-9, atol=1e-12,
                                               msg=lambda m: f'{tasks}, gradient {i}: {m}')
    num_weights = len(model._meta_parameters)
    for train, loop, batched in zip((True, False), results['loop'], results['batched']):
        assert_same_results(loop, batched)
        assert all((g is not None) == train for g in loop[2][:num_weights])
    assert results['loop'][0][1]['support_per_step'].shape == (2, num_inner_steps + 1)


# ----- bfloat16 autocast -----
def autocast_results(learner, task_batch):
    with learner._autocast():
        loss, _, gradients = evaluate(learner, task_batch, train=True)
    return loss.item(), torch.cat([g.flatten() for g in gradients if g is not None])


@pytest.mark.parametrize('learner', ['ProtoNet', 'MAML 2 steps'])
def test_batched_bf16_is_close_to_float32_as_the_loop_s(tmp_path, omniglot_batch, learner):
    """bfloat16 autocast on the batched path computes in bfloat16 (it differs from float32) and
    is as close to float32 as the loop's bfloat16. A small batch (4 tasks, 5 queries: bfloat16 is
    emulated on the CPU, seconds per step): the gradient's cosine to float32's, 0.99 on this
    batch, falls to 0.97 on others of this size, in both paths alike."""
    task_batch = omniglot_batch(4, 5, 1 if learner == 'MAML 2 steps' else 5, 5, seed=2)
    results = {}
    for amp, tasks in [('none', 'batched'), ('bf16', 'loop'), ('bf16', 'batched')]:
        torch.manual_seed(0)  # the same weights for all
        model = (protonet.ProtoNet(0.001, str(tmp_path), 'cpu', amp=amp, tasks=tasks)
                 if learner == 'ProtoNet' else
                 maml.MAML(5, 2, 0.4, True, 0.001, str(tmp_path), 'cpu',
                           settings=training.RunSettings(amp=amp, tasks=tasks)))
        results[amp, tasks] = autocast_results(model, task_batch)
    loss32, gradient32 = results['none', 'batched']
    for tasks in ('loop', 'batched'):
        loss16, gradient16 = results['bf16', tasks]
        results[tasks] = (abs(loss16 / loss32 - 1),
                          F.cosine_similarity(gradient16, gradient32, dim=0).item())
    loss_error, cosine = results['batched']
    assert 0 < loss_error < 0.02 and cosine > 0.95
    assert loss_error <= 2 * results['loop'][0] + 1e-3
    assert 1 - cosine <= 2 * (1 - results['loop'][1]) + 1e-3


# ----- the flag -----
SCRIPTS = {'protonet.py': (protonet.add_protonet_args, protonet.main),
           'maml.py': (maml.add_maml_args, maml.main)}


def parse(script, *flags):
    parser = argparse.ArgumentParser()
    SCRIPTS[script][0](parser, num_train_iterations=10)
    return parser.parse_args([str(flag) for flag in flags])


@pytest.mark.parametrize('script, flags, names', [
    ('protonet.py', ['--learning_rate', 0.1], ['network_state_dict']),
    ('maml.py', ['--outer_lr', 0.1, '--num_inner_steps', 2, '--mamlpp'],
     ['meta_parameters', 'inner_lrs', 'step_norms']),
])
def test_tasks_flag_trains_to_the_same_checkpoints_both_ways(tmp_path, monkeypatch, script,
                                                             flags, names):
    """Three training steps through the script's main, --tasks loop and --tasks batched, in
    float32: the same parameters in every checkpoint, to within a thousandth of the farthest
    that steps 1 and 2 moved any of them (float32 rounding, which decides ties in max pooling on
    binary images, puts either path's gradients ~1e-3 from exact ones; benchmarks/numerics.py;
    measured here: 6e-5).

    With SGD in place of Adam: Adam's first steps move every weight by about its learning rate
    whatever the size of its gradient, so the float32 rounding noise in gradients that are
    zero in exact arithmetic (biases before batch norm; for ProtoNet, shifts of a latent that
    the distances ignore) would move those weights by a full step, differently in each path.
    """
    monkeypatch.setattr(training, 'SAVE_INTERVAL', 1)
    monkeypatch.setattr(torch.optim, 'Adam', torch.optim.SGD)
    batched = []
    check = training.batched_tasks
    monkeypatch.setattr(training, 'batched_tasks',
                        lambda tasks, device: batched.append(check(tasks, device)) or batched[-1])
    states = {}
    for tasks in ('loop', 'batched'):
        args = parse(script, *flags, '--num_way', 3, '--num_query', 2, '--batch_size', 2,
                     '--num_train_iterations', 3, '--log_dir', tmp_path / tasks, '--tasks', tasks)
        with contextlib.redirect_stdout(io.StringIO()):
            SCRIPTS[script][1](args)
        states[tasks] = [torch.load(tmp_path / tasks / f'state{step}.pt', weights_only=True)
                         for step in (0, 2)]
    assert batched == [False, True]  # the flag reached the learner
    for name in names:
        (loop0, loop2), (batched0, batched2) = (
            [torch.cat([value.flatten() for value in state[name].values()])
             for state in states[tasks]] for tasks in ('loop', 'batched'))
        moved = (loop2 - loop0).abs()  # by steps 1 and 2
        for step, difference in [(0, (batched0 - loop0).abs()), (2, (batched2 - loop2).abs())]:
            assert difference.max() <= 1e-3 * moved.max(), (name, step, difference.max(), moved)


@pytest.mark.parametrize('script', SCRIPTS)
def test_unknown_tasks_value_is_a_one_line_error(capsys, script):
    with pytest.raises(SystemExit) as exit_info:
        util.cli(lambda: SCRIPTS[script][1](parse(script, '--tasks', 'fast')))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: unknown --tasks 'fast'; use one of loop, batched, auto\n")


@pytest.mark.parametrize('cuda, mps, batched', [(True, False, True), (False, True, True),
                                                (False, False, False)])
def test_auto_is_batched_on_the_gpu_that_gpu_finds_and_the_loop_on_the_cpu(monkeypatch, cuda,
                                                                           mps, batched):
    """--device gpu --tasks auto: batched on CUDA and MPS, the loop on the CPU it falls back to."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: mps)
    assert training.batched_tasks('auto', util.get_device('gpu')) is batched


def test_auto_takes_the_loop_on_other_devices_and_help_says_what_it_picks():
    assert set(training.AUTO_TASKS.values()) <= {'loop', 'batched'}
    assert not training.batched_tasks('auto', 'meta')
    assert training.batched_tasks('batched', 'cpu') and not training.batched_tasks('loop', 'cuda')
    assert parse('protonet.py').tasks == parse('maml.py').tasks == 'loop'
    parser = argparse.ArgumentParser()
    training.add_tasks_arg(parser)
    assert ("'auto' picks by device: loop on cpu, batched on cuda, batched on mps, loop "
            'elsewhere' in ' '.join(parser.format_help().split()))

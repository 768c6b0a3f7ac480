"""MAML's numbers, bit for bit: a change to how maml.py is written must not move one of them.

For every configuration (second order, learned inner lrs, first order, 5 inner steps, each
MAML++ option alone and all together), on the loop and the batched path (--tasks), a float64
model takes one training step (MetaLearner._train_step, as the training loop calls it), one
_outer_step in evaluation and one --test pass on fixed seeded tiny tasks (2 tasks, 5-way
1-shot, 2 queries per class, 7x7 random images). Its loss and accuracies, the gradient of
every tensor the optimizer holds and every such tensor after the optimizer's step must equal
those of tests/maml_golden.json. Its gradients, losses and accuracies were first those commit
4406869 (main before issue 26's change) computed; the weights after the step, and the evaluation
after it, were rewritten when main at 7a5a15f was merged in, for its fused Adam (2b36f71), which
rounds the update differently. On 2026-12-07 the whole file was rewritten on an AVX-512 CPU for
new inputs, the code unchanged: weights drawn in float64 (float64_weights) instead of
initialised in float32, whose last bit differs between CPUs; before that, the code (commit
c521e17) reproduced the previous file bit for bit on that file's platform, AVX2.

Rewrite the file (only for a change meant to move the numbers, and say so in its commit):

    python -m tests.test_maml_equality

Losses and accuracies are stored as exact float64 values. A tensor is stored as the sha256 of
its float64 bytes (the tensors themselves would take megabytes) with two float64 sums, which
only show how far a mismatch is. Convolutions and matrix products may sum in another order on
another kind of CPU or another torch, so the bits are compared where the platform is the one
that wrote the file, and elsewhere the losses, accuracies and sums to 1e-9 (relative, or
absolute for sums of rounding noise). `ATEN_CPU_CAPABILITY=avx2` (or `default`) runs another
platform's kernels on this CPU: both pass, and fail on a change of batch norm's eps by 1e-4.
"""
import contextlib
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import maml
import mamlpp
import reference
import training

GOLDEN = Path(__file__).with_name('maml_golden.json')
NUM_WAY, NUM_QUERY, NUM_TASKS, IMAGE_SIZE = 5, 2, 2, 7
PLATFORM = f'torch {torch.__version__.split("+")[0]}, {torch.backends.cpu.get_cpu_capability()}'

# name: (inner steps, MAML's keyword arguments, the training iteration of the step)
CONFIGS = {
    'second order': (1, {}, 0),
    'learned inner lrs': (1, {'learn_inner_lrs': True}, 0),
    'first order': (1, {'first_order': True, 'learn_inner_lrs': True}, 0),
    '5 inner steps': (5, {'learn_inner_lrs': True}, 0),
    'multi-step loss': (2, {'options': mamlpp.Options(msl_iterations=10)}, 3),
    'derivative-order annealing, first order': (
        2, {'options': mamlpp.Options(first_order_iterations=5)}, 2),
    'derivative-order annealing, second order': (
        2, {'options': mamlpp.Options(first_order_iterations=5)}, 5),
    'per-step inner lrs': (2, {'options': mamlpp.Options(per_step_inner_lrs=True)}, 0),
    'per-step batch norm': (2, {'options': mamlpp.Options(per_step_bn=True)}, 0),
    'cosine outer lr': (2, {'options': mamlpp.Options(cosine_iterations=10)}, 4),
    'all of MAML++': (3, {'options': mamlpp.Options(
        msl_iterations=10, first_order_iterations=2, per_step_inner_lrs=True, per_step_bn=True,
        cosine_iterations=10)}, 4),
}
TASKS = ('loop', 'batched')


def tiny_tasks(seed=0):
    """NUM_TASKS tasks (images_support (5, 1, 7, 7), labels_support (5,), images_query
    (10, 1, 7, 7), labels_query (10,)), float64 random images."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_WAY)

    def images(shots):
        return torch.randn(NUM_WAY * shots, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator,
                           dtype=torch.float64)
    return [(images(1), labels, images(NUM_QUERY), labels.repeat_interleave(NUM_QUERY))
            for _ in range(NUM_TASKS)]


def build(config, tasks, log_dir):
    """The configuration's float64 model, seeded, with every inner learning rate different and
    the per-step batch-norm rows away from 1 and 0 (a mix-up of keys, steps or rows shows)."""
    num_inner_steps, options, _ = CONFIGS[config]
    torch.manual_seed(0)
    learner = mamlpp.MAMLpp if 'options' in options else maml.MAML
    model = learner(NUM_WAY, num_inner_steps, 0.4, outer_lr=0.01, log_dir=log_dir,
                      device='cpu', settings=training.RunSettings(tasks=tasks),
                      **{'learn_inner_lrs': False, **options})
    reference.maml_in_float64(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for value in model._meta_parameters.values():
            value.copy_(float64_weights(value.shape, generator))
        for value in model._inner_lrs.values():
            value.add_(0.01 * torch.randn(value.shape, generator=generator, dtype=torch.float64))
        for value in model._step_norms.values() if isinstance(model, mamlpp.MAMLpp) else ():
            value.add_(0.3 * torch.randn(value.shape, generator=generator, dtype=torch.float64))
    return model


def float64_weights(shape, generator):
    """Random float64 weights of a layer's shape, about as large as its initialisation: drawn
    in float64, not initialised in float32 and widened, whose last bit differs between CPUs
    (vectorised or not), which moved the loss at the 8th digit.

    Args:
        shape (torch.Size): (out, in, kernel, kernel) or (out, in) weights, (out,) biases
    """
    fan_in = shape[1:].numel() if len(shape) > 1 else 100
    return torch.randn(shape, generator=generator, dtype=torch.float64) / fan_in ** 0.5


def optimized(model):
    """Every tensor the optimizer holds, in its order (as checkpoints store its state)."""
    return [value for group in model._optimizer.param_groups for value in group['params']]


def fingerprint(tensor):
    """[sha256 of the float64 bytes, the sum, a weighted sum] of a tensor."""
    values = tensor.detach().double().contiguous()
    weights = torch.linspace(-1, 1, values.numel(), dtype=torch.float64).view(values.shape)
    return [hashlib.sha256(values.numpy().tobytes()).hexdigest(), float(values.sum()),
            float((values * weights).sum())]


def results(config, tasks, log_dir):
    """What the configuration computes on tiny_tasks: {name: list of floats or fingerprints}."""
    model = build(config, tasks, log_dir)
    task_batch = tiny_tasks()
    summary = model._train_step(task_batch, step=CONFIGS[config][2])
    gradients = [fingerprint(value.grad) if value.grad is not None else None
                 for value in optimized(model)]
    loss, accuracies_support, accuracy_query = model._outer_step(task_batch, train=False)
    with contextlib.redirect_stdout(io.StringIO()):
        mean, ci95, accuracies = model.test([[task] for task in tiny_tasks(seed=1)])
    return {'train_step': summary.tolist(),
            'outer_lr': model._optimizer.param_groups[0]['lr'],
            'gradients': gradients,
            'after_step': [fingerprint(value) for value in optimized(model)],
            'evaluation': [float(loss), accuracies_support.tolist(), float(accuracy_query)],
            'test': [float(mean), float(ci95), accuracies.tolist()]}


@pytest.fixture(scope='module')
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize('tasks', TASKS)
@pytest.mark.parametrize('config', CONFIGS)
def test_maml_computes_what_it_computed_before_bit_for_bit(golden, tmp_path, config, tasks):
    expected = golden['results'][f'{config}, {tasks}']
    actual = results(config, tasks, str(tmp_path))
    assert list(actual) == list(expected)
    same_platform = golden['platform'] == PLATFORM
    for name in ('train_step', 'outer_lr', 'evaluation', 'test'):
        if same_platform:
            assert actual[name] == expected[name], name
        else:
            assert flat(actual[name]) == pytest.approx(flat(expected[name]), rel=1e-9), name
    for name in ('gradients', 'after_step'):
        assert len(actual[name]) == len(expected[name]), name
        for i, (got, want) in enumerate(zip(actual[name], expected[name])):
            assert (got is None) == (want is None), f'{name} {i}: a gradient appeared or went'
            if want is None:
                continue
            if same_platform:
                assert got == want, f'{name} {i}: sums {got[1:]}, expected {want[1:]}'
            else:  # abs: a bias before batch norm has a gradient of rounding noise, ~1e-11
                assert got[1:] == pytest.approx(want[1:], rel=1e-9, abs=1e-9), f'{name} {i}'


def flat(values):
    """[1.0, [2.0, 3.0], 4.0] -> [1.0, 2.0, 3.0, 4.0]; 5.0 -> [5.0] (a result's floats)."""
    if not isinstance(values, list):
        return [values]
    return [x for value in values for x in flat(value)]


def write():
    """Writes GOLDEN from the current code."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as log_dir:
        golden = {'platform': PLATFORM,
                  'results': {f'{config}, {tasks}': results(config, tasks, log_dir)
                              for config in CONFIGS for tasks in TASKS}}
    lines = [f' {json.dumps(key)}: {json.dumps(value)}' for key, value in golden['results'].items()]
    GOLDEN.write_text(f'{{"platform": {json.dumps(PLATFORM)}, "results": {{\n'
                      + ',\n'.join(lines) + '\n}}\n')
    print(f'wrote {GOLDEN} ({len(golden["results"])} results)', file=sys.stderr)


if __name__ == '__main__':
    write()

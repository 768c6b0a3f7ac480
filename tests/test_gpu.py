"""The GPU path, for whoever has a GPU: `python -m pytest tests/test_gpu.py -q`.

Skipped without CUDA (its MPS cases without Apple's MPS). For every learner (ProtoNet, MAML
second order, learned inner lrs, first order, MAML++, the transfer baseline, the metabolism
network), loop and batched, --amp none and bf16:
- one training step on the GPU against the same step on the CPU in float64 (loss and every
  gradient; TF32 off, as training sets it);
- loop against batched on the GPU;
- no host-device sync in a training step (CUDA's sync debug mode set to raise);
and, through the scripts: the same seed twice gives the same weights; a run saved on the GPU
resumes on the CPU and the other way round; `protonet.py --compile` trains (also through
inductor's max-autotune convolution templates); with two GPUs,
torchrun with 2 processes gives one process's weights (float64, as
tests/test_distributed.py on the CPU); `python -m benchmarks.benchmark --device gpu --quick`
passes its accuracy checks.
"""
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import float64_run
import maml
import mamlpp
import maml_transfer
import metabolism
import omniglot
import protonet
import reference
import run_metabolism
import training
import util

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
MPS = torch.backends.mps.is_available()
pytestmark = pytest.mark.skipif(not (CUDA or MPS), reason='no GPU (neither CUDA nor MPS)')
DEVICES = [pytest.param('cuda', marks=pytest.mark.skipif(not CUDA, reason='no CUDA')),
           pytest.param('mps', marks=pytest.mark.skipif(not MPS, reason='no MPS'))]
only_cuda = pytest.mark.skipif(not CUDA, reason='no CUDA')
AMPS = ('none', 'bf16')
# The error model of a step's loss and gradients against exact arithmetic (float64), relative
# to the loss and to the whole gradient's norm (relative_error). A step rounding with unit
# roundoff u errs by about kappa * u, kappa how much this learner, these weights and this batch
# amplify rounding (second-order MAML, and max pooling's ties on binary images, the most). The
# CPU measures it for each case: the same step there, same precision (autocast casts the same
# operations to bfloat16 on every device), same batch, against float64. A GPU makes the same
# roundings, its sums in another order (cuDNN's), so its error is another draw of the same size:
# within SPREAD times the CPU's. Two orders on the CPU, --tasks loop and batched, gave errors
# within 1.4x of each other (ProtoNet: float32 3.9e-6 and 5.4e-6, bfloat16 0.102 both), and
# differences of 4.4e-6 and 8.7e-3. A CPU error is never taken below FLOOR_ROUNDINGS roundings
# (a CPU that happens to be exact).
UNIT_ROUNDOFF = {'none': 2.0 ** -24, 'bf16': 2.0 ** -8}
SPREAD = 3
FLOOR_ROUNDINGS = 4
WAY, SHOT, QUERY, BATCH = 3, 2, 3, 4
MAMLPP = mamlpp.Options(msl_iterations=10, per_step_inner_lrs=True, per_step_bn=True,
                           cosine_iterations=10)


def skip_where_bf16_is_refused(amp, device):
    """Skips a bfloat16 case on a device that has none (util.bf16_problem: a GPU below compute
    capability 8.0, as the T4 and V100, or MPS before macOS 14), where the scripts refuse
    --amp bf16 and a learner built directly would time or test an emulation."""
    problem = util.bf16_problem(torch.device(device)) if amp == 'bf16' else None
    if problem:
        pytest.skip(problem)


def build(name, device, amp='none', tasks='loop', log_dir='unused'):
    """The learner name on device, with the weights torch.manual_seed(0) gives."""
    torch.manual_seed(0)
    settings = training.RunSettings(amp=amp, tasks=tasks)
    maml_learner = functools.partial(maml.MAML, WAY, 2, 0.4, False, 0.001, log_dir, device,
                                     settings=settings)
    return {
        'protonet': lambda: protonet.ProtoNet(0.001, log_dir, device, amp=amp, tasks=tasks,
                                              num_way=WAY),
        'maml': maml_learner,
        'maml learned lrs': lambda: maml.MAML(WAY, 2, 0.4, True, 0.001, log_dir, device,
                                              settings=settings),
        'maml first order': lambda: maml_learner(first_order=True),
        'maml++': lambda: mamlpp.MAMLpp(WAY, 2, 0.4, False, 0.001, log_dir, device,
                                        options=MAMLPP, settings=settings),
        'transfer': lambda: maml_transfer.TransferLearner(
            0.001, 5, 2.0, log_dir, device, training.RunSettings(amp=amp), num_way=WAY),
        'metabolism': lambda: protonet.ProtoNet(0.001, log_dir, device, amp=amp, tasks=tasks,
                                                num_way=2, learner=run_metabolism.FCNet()),
    }[name]()


LEARNERS = ('protonet', 'maml', 'maml learned lrs', 'maml first order', 'maml++', 'transfer',
            'metabolism')
BATCHED = [name for name in LEARNERS if name != 'transfer']  # transfer has no --tasks


def training_batches(name, device, num_batches=3):
    """A loader of training batches for learner name, on device (a fixed stream)."""
    if name == 'transfer':
        return omniglot.get_image_dataloader('train', 16, 16 * num_batches, device=device)
    if name == 'metabolism':  # random fingerprints: the speed and syncs of the real ones
        rng = np.random.default_rng(0)
        data = {set_name: {'feature': rng.integers(0, 2, (40, 1024)).astype(np.float32),
                           'label': np.arange(40) % 2} for set_name in metabolism.ALL_SETS}
        return metabolism.metabolism_task_loader(data, 'train', BATCH, 2, SHOT, QUERY,
                                                 BATCH * num_batches, device=device)
    return omniglot.get_omniglot_dataloader('train', BATCH, WAY, SHOT, QUERY,
                                            BATCH * num_batches, device=device)


def training_batch(name, device):
    return next(iter(training_batches(name, device)))


def loss_and_gradients(learner, batch):
    learner._optimizer.zero_grad()
    with learner._autocast():
        loss, _ = learner._evaluate(batch, train=True)
    loss.backward()
    parameters = [p for group in learner._optimizer.param_groups for p in group['params']]
    return loss.detach().cpu().double(), [None if p.grad is None else p.grad.cpu().double()
                                          for p in parameters]


def relative_error(result, expected):
    """The larger of the loss's error relative to max(1, |expected loss|) and the largest error
    of a gradient relative to the whole expected gradient's norm.

    Args:
        result, expected: loss_and_gradients' (loss, [gradient or None]), float64 on the CPU,
            the same parameters without a gradient in both
    """
    (loss, gradients), (expected_loss, expected_gradients) = result, expected
    assert [g is None for g in gradients] == [g is None for g in expected_gradients]
    pairs = [(g, e) for g, e in zip(gradients, expected_gradients, strict=True) if e is not None]
    scale = torch.cat([e.flatten() for _, e in pairs]).norm().item()
    return max((loss - expected_loss).abs().item() / max(1.0, expected_loss.abs().item()),
               *((g - e).norm().item() / scale for g, e in pairs))


def on_cpu(batch):
    return [[part.cpu() for part in task] for task in batch]


def float64_step(name, batch):
    """loss_and_gradients of learner name on the CPU in float64, for batch (any device)."""
    learner = reference.maml_in_float64(build(name, 'cpu'))
    return loss_and_gradients(learner, reference.to_float64(on_cpu(batch)))


def tolerance(name, amp, batch, exact):
    """The error model's bound on a GPU's error in learner name's step in amp on batch: SPREAD
    times the CPU's against exact, at least FLOOR_ROUNDINGS roundings."""
    cpu_error = relative_error(loss_and_gradients(build(name, 'cpu', amp), on_cpu(batch)), exact)
    return SPREAD * max(cpu_error, FLOOR_ROUNDINGS * UNIT_ROUNDOFF[amp])


@pytest.fixture(autouse=True)
def deterministic_without_tf32(monkeypatch):
    """As the scripts set CUDA up (make_deterministic, also when a test runs a script's main),
    but a nondeterministic operation is an error here, not a warning."""
    def strictly_deterministic(device, amp):
        make_deterministic(device, amp)
        if device.type == 'cuda':
            torch.use_deterministic_algorithms(True)
    make_deterministic = util.make_deterministic
    monkeypatch.setattr(util, 'make_deterministic', strictly_deterministic)
    if CUDA:
        strictly_deterministic(torch.device('cuda'), 'none')


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('amp', AMPS)
@pytest.mark.parametrize('name', LEARNERS)
def test_a_gpu_step_equals_the_cpu_step_in_float64(name, amp, device):
    skip_where_bf16_is_refused(amp, device)
    batch = training_batch(name, device)
    exact = float64_step(name, batch)
    error = relative_error(loss_and_gradients(build(name, device, amp), batch), exact)
    assert error <= tolerance(name, amp, batch, exact)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('amp', AMPS)
@pytest.mark.parametrize('name', BATCHED)
def test_loop_and_batched_agree_on_the_gpu(name, amp, device):
    skip_where_bf16_is_refused(amp, device)
    batch = training_batch(name, device)
    bound = 2 * tolerance(name, amp, batch, float64_step(name, batch))  # each way's, both ways
    loop = loss_and_gradients(build(name, device, amp, 'loop'), batch)
    batched = loss_and_gradients(build(name, device, amp, 'batched'), batch)
    assert relative_error(batched, loop) <= bound


@only_cuda
@pytest.mark.parametrize('tasks', ('loop', 'batched'))
@pytest.mark.parametrize('amp', AMPS)
@pytest.mark.parametrize('name', LEARNERS)
def test_a_training_step_makes_no_host_device_sync(name, amp, tasks):
    if name == 'transfer' and tasks == 'batched':
        pytest.skip('the transfer baseline has no --tasks')
    skip_where_bf16_is_refused(amp, 'cuda')
    learner = build(name, 'cuda', amp, tasks)
    batches = iter(training_batches(name, 'cuda'))
    learner._train_step(next(batches), 1)  # warm-up: cuDNN, cuBLAS and Adam's state start
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:  # sampling the batch, then the step
        summary = learner._train_step(next(batches), 2)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert summary.is_cuda and torch.isfinite(summary).all()


def synchronize(device):
    (torch.cuda if device == 'cuda' else torch.mps).synchronize()


def median_step_seconds(tasks, device, warmup=2, repeats=5):
    """The median time of MAML 5-way 1-shot training steps (15 queries, a batch of 16) with
    --tasks tasks on device, after warmup steps."""
    torch.manual_seed(0)
    learner = maml.MAML(5, 1, 0.4, False, 0.001, 'unused', device,
                        settings=training.RunSettings(tasks=tasks))
    batches = omniglot.get_omniglot_dataloader('train', 16, 5, 1, 15, 16 * (warmup + repeats),
                                               device=device)
    seconds = []
    for step, batch in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        learner._train_step(batch, step)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds[warmup:]))


@pytest.mark.parametrize('device', DEVICES)
def test_auto_tasks_picks_the_faster_way_on_this_gpu(device, capsys):
    """--tasks auto's choice (training.AUTO_TASKS, set by the operation count until a GPU timed
    both ways) against both timed here. Prints both; fails where the other way is more than 10%
    faster: then flip AUTO_TASKS for this device type and say so in benchmarks/README.md."""
    seconds = {tasks: median_step_seconds(tasks, device) for tasks in ('loop', 'batched')}
    picked = training.AUTO_TASKS.get(device, 'loop')
    with capsys.disabled():
        print(f'\n--tasks on {device}: loop {1e3 * seconds["loop"]:.1f} ms, batched '
              f'{1e3 * seconds["batched"]:.1f} ms per step; auto picks {picked}')
    assert seconds[picked] <= 1.1 * min(seconds.values()), seconds


SCRIPTS = {'protonet': (protonet, ['--num_way', '3', '--num_support', '1', '--num_query', '2',
                                    '--batch_size', '2']),
           'maml': (maml, ['--num_way', '3', '--num_support', '1', '--num_query', '2',
                           '--batch_size', '2', '--learn_inner_lrs']),
           'maml++': (maml, ['--num_way', '3', '--num_support', '1', '--num_query', '2',
                             '--batch_size', '2', '--mamlpp', '--num_inner_steps', '2']),
           'transfer': (maml_transfer, ['--num_way', '3', '--num_support', '1',
                                        '--num_query', '2', '--batch_size', '8',
                                        '--adapt_steps', '5'])}


def train(script, log_dir, device, *flags, iterations=3, checkpoint_step=-1):
    """Runs script's main in this process, a checkpoint every step; returns the last one."""
    module, script_flags = SCRIPTS[script]
    args = module.parse_args([*script_flags, *flags, '--device', device,
                              '--num_train_iterations', str(iterations), '--log_dir',
                              str(log_dir), '--checkpoint_step', str(checkpoint_step)])
    saved = training.SAVE_INTERVAL
    training.SAVE_INTERVAL = 1
    try:
        module.main(args)
    finally:
        training.SAVE_INTERVAL = saved
    return torch.load(Path(log_dir) / f'state{iterations - 1}.pt', map_location='cpu',
                      weights_only=True)


def tensors(state, prefix=''):
    """Every tensor of a checkpoint, {path: tensor}."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {}
    return {path: tensor for key, value in items
            for path, tensor in tensors(value, f'{prefix}/{key}').items()}


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('flags', [('--amp', 'none'), ('--amp', 'bf16'), ('--tasks', 'batched')])
@pytest.mark.parametrize('script', SCRIPTS)
def test_the_same_seed_gives_the_same_weights(script, flags, device, tmp_path):
    if script == 'transfer' and '--tasks' in flags:
        pytest.skip('the transfer baseline has no --tasks')
    skip_where_bf16_is_refused(dict([flags]).get('--amp'), device)
    first = tensors(train(script, tmp_path / 'a', 'gpu', *flags))
    second = tensors(train(script, tmp_path / 'b', 'gpu', *flags))
    assert first.keys() == second.keys()
    for path, tensor in first.items():
        assert torch.equal(tensor, second[path]), path


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('first, then', [('gpu', 'cpu'), ('cpu', 'gpu')])
@pytest.mark.parametrize('script', SCRIPTS)
def test_a_run_saved_on_one_device_resumes_on_the_other(script, first, then, device, tmp_path):
    saved = tensors(train(script, tmp_path, first, iterations=2))
    resumed = train(script, tmp_path, then, iterations=3, checkpoint_step=1)
    steps = [state['step'] for state in resumed['optimizer_state_dict']['state'].values()]
    assert steps and all(step.item() == 3 for step in steps)  # Adam went on counting
    changed = tensors(resumed)
    assert any(not torch.equal(tensor, changed[path]) for path, tensor in saved.items()
               if path.startswith(('/network', '/meta', '/parameters')))


# Inductor's max-autotune with its Triton convolution backward templates: they read the old
# TF32 flag (torch.backends.cudnn.allow_tf32), which raises where it disagrees with the new ones.
MAX_AUTOTUNE = {'TORCHINDUCTOR_MAX_AUTOTUNE': '1',
                'TORCHINDUCTOR_MAX_AUTOTUNE_BWD_WEIGHT_CONV_BACKENDS': 'ATEN,TRITON',
                'TORCHINDUCTOR_MAX_AUTOTUNE_BWD_INPUT_CONV_BACKENDS': 'ATEN,TRITON'}


@only_cuda
@pytest.mark.parametrize('inductor', [{}, MAX_AUTOTUNE], ids=['default', 'max-autotune'])
def test_compiled_protonet_trains(inductor, tmp_path):
    result = subprocess.run([sys.executable, 'protonet.py', '--compile', '--device', 'gpu',
                             '--num_train_iterations', '2', '--batch_size', '2',
                             '--log_dir', str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=900, env={**os.environ, **inductor})
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'Iteration 0: loss' in result.stdout


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason='fewer than 2 GPUs')
@pytest.mark.parametrize('script, flags', [('protonet.py', []), ('maml.py', ['--learn_inner_lrs'])])
def test_two_gpus_under_torchrun_train_as_one(script, flags, tmp_path):
    common = ['--num_way', '3', '--num_support', '1', '--num_query', '2', '--batch_size', '2',
              '--num_train_iterations', '3', '--device', 'gpu', *flags]
    float64_run.run(script, [*common, '--log_dir', str(tmp_path / 'p1')])
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                             '--nproc_per_node=2', 'tests/float64_run.py', script, *common,
                             '--log_dir', str(tmp_path / 'p2')], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = (tensors(torch.load(tmp_path / p / 'state2.pt', map_location='cpu',
                                   weights_only=True)) for p in ('p1', 'p2'))
    for path, tensor in one.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(two[path], tensor, rtol=0, atol=1e-9, msg=path)


@only_cuda
def test_the_quick_benchmark_passes_on_the_gpu():
    result = subprocess.run([sys.executable, '-m', 'benchmarks.benchmark', '--device', 'gpu',
                             '--quick'], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'ok' in result.stdout and torch.cuda.get_device_name() in result.stdout

"""benchmarks/benchmark.py (`python -m benchmarks.benchmark`): the quick mode's accuracy checks
pass and its tables are complete; its operation count skips views, and batched MAML's step
dispatches as many operations at any batch size."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import layers
import omniglot
from benchmarks import benchmark, numerics, time_to_accuracy, timing

ROOT = Path(__file__).resolve().parents[1]

CHECKS = ['ProtoNet 5w5s', 'MAML 5w1s 1 step', 'MAML 5w1s 5 steps',
          'MAML 5w1s 1 step first-order']
BATCHED_ROWS = ['ProtoNet 5w5s: training, s/iter', 'MAML 5w1s 1 step: training, s/iter',
                'MAML 5w1s 5 steps: training, s/iter',
                'MAML 5w1s 1 step first-order: training, s/iter',
                'ProtoNet 5w5s: validation, s/task', 'MAML 5w1s 1 step: validation, s/task']
ROWS = [*BATCHED_ROWS, *(row.replace(':', ' --tasks batched:') for row in BATCHED_ROWS),
        'ProtoNet 5w5s: --test, s/task', 'MAML 5w1s 1 step: --test, s/task',
        'Transfer 5w5s: validation, s/task']
NUMBER = r'[\d.e+-]+'
# Issue 27: MAML 5-way 1-shot, one inner step, --tasks batched dispatched about 830 operations
# per training step (flat in the batch size) before Adam was fused; at most this many.
MAX_BATCHED_MAML_OPERATIONS = 1000


def test_quick_benchmark_checks_accuracy_and_prints_every_row():
    result = subprocess.run([sys.executable, '-m', 'benchmarks.benchmark', '--quick'], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = re.findall(r'^  (.+): ours (\S+), reference (\S+) ok$', result.stdout, re.M)
    assert [name for name, _, _ in checks] == [*CHECKS, *(f'{name} --tasks batched'
                                                          for name in CHECKS)]
    for _, ours, reference in checks:
        assert 0 < float(reference) and float(ours) <= max(
            numerics.RELATIVE_TOLERANCE, numerics.ACCURACY_MARGIN * float(reference))
    assert 'No bf16 columns: --quick on the CPU' in result.stdout
    for row in ROWS:  # bf16 cells empty: --quick on the CPU
        cells = rf'{NUMBER} \| {NUMBER} \| {NUMBER}x \|  \| '
        assert re.search(rf'^\| {re.escape(row)} \| {cells} \|$', result.stdout, re.M), row
    for row in 'Task sampling 5w5s', 'Metabolism sampling 2w5s10q':
        assert re.search(rf'^\| {row}: tasks/s \| {NUMBER} \| {NUMBER} \| {NUMBER}x \|',
                         result.stdout, re.M), row
    for row in BATCHED_ROWS:  # loop, batched and the speed-up in fp32; bf16 empty
        cells = rf'{NUMBER} \| {NUMBER} \| {NUMBER}x \|  \|  \| '
        assert re.search(rf'^\| {re.escape(row)} \| {cells} \|$', result.stdout, re.M), row
    memory_rows = re.findall(r'^\| [^|]+ \| \d+ \| \d+ \| \d* \|$', result.stdout, re.M)
    assert len(memory_rows) == len(ROWS) + 2
    assert 'operations per training step, batch of 2 | loop | batched |' in result.stdout
    for name in CHECKS:
        assert re.search(rf'^\| {name} \| [1-9]\d* \| [1-9]\d* \|$', result.stdout, re.M), name
    speed_ups = speed_up_cells(result.stdout)
    assert len(speed_ups) == len(ROWS) + 2 + len(BATCHED_ROWS)
    for name, reference, ours, speed_up in speed_ups:  # each is the ratio of its two cells
        assert reference > 0 and ours > 0, name
        expected = ours / reference if 'tasks/s' in name else reference / ours
        # the speed-up rounds to 0.1, each cell to 3 digits: both errors add
        assert abs(speed_up - expected) <= 0.05 + 0.01 * expected, (name, speed_up, expected)


class RecordingBench:
    """Stands in for benchmark.Bench on a CUDA GPU: every measurement is Result(1, 1), and the
    --amp of every learner built is recorded in amps."""
    device = torch.device('cuda')
    inner_lrs = {}

    def __init__(self):
        self.amps = []

    def __getattr__(self, name):
        if name in ('course_protonet', 'course_maml'):
            return lambda: (None, None)  # (network or parameters, optimizer)

        def method(*args, **kwargs):
            self.amps += [value for value in (*args, *kwargs.values())
                          if value in benchmark.AMPS]
            return benchmark.Result(1.0, 1.0)
        return method


@pytest.mark.parametrize('capability, timed', [((7, 5), ['none']), ((8, 0), ['none', 'bf16'])])
def test_bf16_is_timed_only_where_the_gpu_has_it(capability, timed, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'a GPU')
    bench = RecordingBench()
    rows = benchmark.measure_rows(bench)
    assert set(bench.amps) == set(timed)
    assert all((ours_bf16 is not None) == ('bf16' in timed and 'sampling' not in name)
               for name, (_, _, ours_bf16) in rows.items())
    lines = benchmark.format_table(rows, {}, 16).splitlines()  # empty bf16 cells, no crash
    loop_against_batched = '| ProtoNet 5w5s: training, s/iter | 1 | 1 | 1.0x |  |  |  |'
    assert (loop_against_batched in lines) == ('bf16' not in timed)


@pytest.mark.parametrize('platform', ['darwin', 'win32'])
def test_memory_is_n_a_where_the_platform_has_no_peak_to_reset(platform, monkeypatch):
    monkeypatch.setattr(timing.sys, 'platform', platform)
    monkeypatch.setattr(timing.ctypes, 'CDLL', lambda name: pytest.fail('glibc is Linux only'))
    result = timing.measure(lambda: None, 0, 1, torch.device('cpu'))
    assert result.value >= 0 and result.memory is None
    rows = {'Task sampling 5w5s: tasks/s': (timing.Result(2.0, 1.0), result, None)}
    assert '| Task sampling 5w5s: tasks/s | 1 | n/a |  |' in benchmark.format_table(rows, {}, 16)


def speed_up_cells(printed):
    """Every 'N.Nx' cell of the benchmark's tables with the two it is the ratio of: the cells
    just before it, or the row's first (the reference) when the one before that is a speed-up
    itself (ours bf16). Returns [(row name, reference, ours, speed-up)] as floats."""
    found = []
    for line in printed.splitlines():
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        for i, cell in enumerate(cells):
            if i >= 3 and re.fullmatch(r'[\d.]+x', cell):
                reference = cells[1] if cells[i - 2].endswith('x') else cells[i - 2]
                found.append((cells[0], float(reference), float(cells[i - 1]), float(cell[:-1])))
    return found


def test_relative_error_catches_a_wrong_gradient_and_tolerates_rounding_noise():
    gradients = [torch.tensor([3.0, 4.0]), torch.tensor([1e-7, -1e-7])]  # the second is noise
    noisy = [gradients[0] * (1 + 1e-6), torch.tensor([-2e-7, 3e-7])]
    loss = torch.tensor(1.5)
    assert numerics.largest_relative_error(loss, loss, noisy, gradients) < 1e-4
    wrong = [gradients[0] * 1.01, gradients[1]]
    assert numerics.largest_relative_error(loss, loss, wrong, gradients) == pytest.approx(0.01)
    assert numerics.largest_relative_error(loss * 1.001, loss, gradients, gradients) > 1e-4


class Widenings(TorchDispatchMode):
    """Counts the conversions of float32 tensors to float64 made outside numerics.exact_copy
    (which copies to the CPU first: Apple's MPS has no float64)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.elsewhere = 0
        self.inside = False
        exact_copy = numerics.exact_copy

        def counted(tensor):
            self.inside = True
            try:
                return exact_copy(tensor)
            finally:
                self.inside = False
        monkeypatch.setattr(numerics, 'exact_copy', counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and kwargs.get('dtype') == torch.float64
                and args[0].dtype == torch.float32 and not self.inside):
            self.elsewhere += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize('check, num_support', [
    (lambda batch, log_dir: numerics.check_protonet(batch, 0, torch.device('cpu'), log_dir), 5),
    (lambda batch, log_dir: numerics.check_maml(batch, 1, False, 0, torch.device('cpu'),
                                                log_dir), 1)], ids=['protonet', 'maml'])
def test_the_float64_references_widen_cpu_copies(check, num_support, monkeypatch, tmp_path):
    """As on Apple's MPS: ours computes without float64 (layers.exact_dtype), the references in
    float64 widen copies on the CPU, and nothing else widens."""
    monkeypatch.setattr(layers, 'DEVICES_WITHOUT_FLOAT64', (*layers.DEVICES_WITHOUT_FLOAT64, 'cpu'))
    batch = next(iter(omniglot.get_omniglot_dataloader('train', 2, 5, num_support, 2, 2)))
    with Widenings(monkeypatch) as widenings:
        ours, theirs = check(batch, str(tmp_path))
    assert widenings.elsewhere == 0
    # 1e-2: where float32 rounding picks the side of a ReLU's or max pooling's tie (Omniglot's
    # images are binary), one pick moves a gradient by ~1e-3 of its norm
    assert all(0 < error < 1e-2 for error in (*ours.values(), theirs))


def test_time_to_accuracy_stops_at_the_first_validation_at_the_target():
    lines = ['Iteration 0: loss: 1.0', 'Validation: loss: 1.0, query accuracy: 0.400',
             'Iteration 50: loss: 0.1', 'Validation: loss: 0.1, query accuracy: 0.990',
             'Iteration 100: loss: 0.1', 'Validation: loss: 0.1, query accuracy: 0.995']
    program = ['-c', f'print({chr(10).join(lines)!r})']
    iteration, seconds = time_to_accuracy.run_until(0.99, program)
    assert iteration == 50 and seconds >= 0
    assert time_to_accuracy.run_until(0.999, program) is None


def test_the_operation_count_skips_views():
    x = torch.ones(3)
    with benchmark.OperationCounter() as counter:
        x.view(3, 1).t()
        (x + 1) * 2
    assert counter.count == 2


def test_batched_maml_dispatches_as_many_operations_per_step_at_any_batch_size(tmp_path):
    def count(batch_size):
        bench = benchmark.Bench(None, dataclasses.replace(benchmark.QUICK, batch_size=batch_size),
                                torch.device('cpu'), str(tmp_path))
        return bench.ours_operations(bench.maml(1, tasks='batched'), 5, 1)
    assert count(2) == count(3) <= MAX_BATCHED_MAML_OPERATIONS

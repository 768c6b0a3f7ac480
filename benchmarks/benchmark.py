"""Speed of ours against a course-style reference, side by side, in one run on one machine.

    python -m benchmarks.benchmark                 # the table of benchmarks/README.md
    python -m benchmarks.benchmark --quick         # CI: a few iterations, the same accuracy checks
    python -m benchmarks.benchmark --device gpu    # the same on CUDA

The reference is the course's way of doing the same work: its data pipeline
(course_pipeline.py: PNG files decoded by a DataLoader with 2 workers) and its steps
(reference.py: nn.Sequential ProtoNet, functional MAML with torch.autograd.grad, one task at a
time). Ours is the project's code, timed through the shared loop's training step
(`_train_step`), `validate` and `test`, so the numbers follow whatever protonet.py and maml.py
implement; each training and validation row of ours is timed with the per-task loop and with
--tasks batched, and a second table sets the two side by side. Before timing, numerics.py
checks that ours, both ways, is as accurate as the reference (exit status 1 otherwise). Each
row runs warm-up iterations, then the median of timed ones (timing.py); ours and the
reference alternate within one process, so a busy machine slows both, but take numbers on an
idle one. A last table counts the operations each training step of ours dispatches
(OperationCounter): on a GPU each is a kernel launch, a host cost that a CPU can measure.
"""
import contextlib
import functools
import io
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import maml
import maml_transfer
import metabolism
import omniglot
import protonet
import reference
import training
import util
from benchmarks.course_pipeline import course_dataloader, write_png_folder
from benchmarks.numerics import BATCHED, LEARNING_RATE, MAML_INNER_LR, MAML_ROWS, check_numerics
from benchmarks.timing import Result, exhaust, measure, memory_mib, reset_peak_memory


@dataclass
class Sizes:
    """How much each row measures: training iterations (warm-up, then timed), passes over the
    validation tasks (at full size batch_size * 4, as the scripts validate) and over the test
    tasks (one warm-up, then timed), batches sampled, the transfer baseline's adaptation steps
    (maml_transfer.py's 100 at full size); the seeds of the weights the accuracy checks draw;
    and the Omniglot tasks' queries per class (the course's 15 at full size)."""
    batch_size: int
    warmup: int
    repeats: int
    eval_passes: int
    val_tasks: int
    test_tasks: int
    sampling_batches: int
    adapt_steps: int
    seeds: tuple
    num_query: int


FULL = Sizes(batch_size=16, warmup=2, repeats=7, eval_passes=3, val_tasks=64, test_tasks=100,
             sampling_batches=30, adapt_steps=100, seeds=(0, 1, 2), num_query=15)
MOST_SHOTS = 5  # the support examples per class of the rows' largest tasks (5-way 5-shot)
# Metabolism tasks as run_bio.sh draws them: batches of 4 tasks, 2-way 5-shot 10-query, from
# data sets of the TDC training sets' sizes (CYP1A2, 3A4, 2D6 Veith; 2C9, 2D6 substrates).
METABOLISM_BATCH, METABOLISM_SHOTS = 4, (5, 10)
METABOLISM_SIZES = (12579, 12328, 13130, 669, 667)
# The quick mode's accuracy checks take the weights of FULL's three seeds: one seed's error
# ratio (ours against the reference, two draws of rounding) can pass 2x by chance. Its rows time
# one iteration without a warm-up (first-call costs included): they check the table, not speed.
# 5 queries per class: the float64 references cost a third of 15's.
QUICK = Sizes(batch_size=2, warmup=0, repeats=1, eval_passes=1, val_tasks=2, test_tasks=2,
              sampling_batches=2, adapt_steps=3, seeds=FULL.seeds, num_query=5)


# ----- what is measured -----
class OperationCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it, backward passes included, views
    (which launch no kernel) excluded: on a GPU, the kernel launches, each a few microseconds
    of host time, counted on any device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


class Bench:
    """Builds ours and the reference for one device and sizes; its methods return Results."""

    def __init__(self, folder, sizes, device, log_dir):
        self.folder = folder
        self.sizes = sizes
        self.device = device
        self.log_dir = log_dir
        self.inner_lrs = dict.fromkeys(reference.MAML_KEYS, MAML_INNER_LR)

    def ours_loader(self, split, batch_size, num_way, num_support, num_tasks):
        return omniglot.get_omniglot_dataloader(split, batch_size, num_way, num_support,
                                                self.sizes.num_query, num_tasks,
                                                device=self.device)

    def course_loader(self, split, batch_size, num_way, num_support, num_tasks):
        return course_dataloader(self.folder, split, batch_size, num_way, num_support,
                                 self.sizes.num_query, num_tasks)

    def num_training_tasks(self):
        return self.sizes.batch_size * (self.sizes.warmup + self.sizes.repeats)

    def measure_training(self, step):
        return measure(step, self.sizes.warmup, self.sizes.repeats, self.device)

    def measure_evaluation(self, step, num_tasks):
        return measure(step, 1, self.sizes.eval_passes, self.device, per=num_tasks)

    # ProtoNet, 5-way 5-shot
    def protonet(self, amp='none', tasks='loop'):
        return protonet.ProtoNet(LEARNING_RATE, self.log_dir, self.device, amp=amp, tasks=tasks)

    def course_protonet(self):
        network = reference.protonet_network().to(self.device)
        return network, torch.optim.Adam(network.parameters(), lr=LEARNING_RATE)

    def ours_train(self, learner, num_way, num_support):
        batches = iter(self.ours_loader('train', self.sizes.batch_size, num_way, num_support,
                                        self.num_training_tasks()))
        return self.measure_training(lambda: learner._train_step(next(batches), 1))

    def course_protonet_train(self):
        network, optimizer = self.course_protonet()
        batches = iter(self.course_loader('train', self.sizes.batch_size, 5, 5,
                                          self.num_training_tasks()))

        def step():
            optimizer.zero_grad()
            loss, _, _ = reference.protonet_step(network, next(batches))
            loss.backward()
            optimizer.step()
            loss.item()
        return self.measure_training(step)

    def ours_operations(self, learner, num_way, num_support):
        """The operations one training step of learner dispatches (OperationCounter), counted
        after a first step that creates Adam's state; drawing the batch is not counted."""
        batches = iter(self.ours_loader('train', self.sizes.batch_size, num_way, num_support,
                                        2 * self.sizes.batch_size))
        learner._train_step(next(batches), 1)
        task_batch = next(batches)
        with OperationCounter() as counter:
            learner._train_step(task_batch, 2)
        return counter.count

    def ours_validate(self, learner, num_way, num_support):
        num_tasks = self.sizes.val_tasks
        loader = self.ours_loader('val', self.sizes.batch_size, num_way, num_support, num_tasks)
        return self.measure_evaluation(lambda: learner.validate(loader), num_tasks)

    def course_validate(self, evaluate, num_way, num_support):
        """evaluate(task_batch) -> loss; one pass over a fresh course loader, as the course."""
        num_tasks = self.sizes.val_tasks
        loader = self.course_loader('val', self.sizes.batch_size, num_way, num_support,
                                    num_tasks)

        def one_pass():
            return [evaluate(task_batch).item() for task_batch in loader]
        return self.measure_evaluation(one_pass, num_tasks)

    def ours_test(self, learner, num_way, num_support):
        loader = self.ours_loader('test', 1, num_way, num_support, self.sizes.test_tasks)

        def test():
            with contextlib.redirect_stdout(io.StringIO()):
                learner.test(loader)
        return self.measure_evaluation(test, self.sizes.test_tasks)

    def course_test(self, evaluate, num_way, num_support):
        loader = self.course_loader('test', 1, num_way, num_support, self.sizes.test_tasks)
        return self.measure_evaluation(
            lambda: [evaluate(task_batch).item() for task_batch in loader], self.sizes.test_tasks)

    # MAML, 5-way 1-shot
    def maml(self, num_inner_steps, first_order=False, amp='none', tasks='loop'):
        return maml.MAML(5, num_inner_steps, MAML_INNER_LR, False, LEARNING_RATE, self.log_dir,
                         self.device, first_order=first_order,
                         settings=training.RunSettings(amp=amp, tasks=tasks))

    def course_maml(self):
        parameters = {key: value.to(self.device).requires_grad_()
                      for key, value in maml.init_parameters(5).items()}
        return parameters, torch.optim.Adam(parameters.values(), lr=LEARNING_RATE)

    def course_maml_train(self, num_inner_steps, first_order):
        parameters, optimizer = self.course_maml()
        batches = iter(self.course_loader('train', self.sizes.batch_size, 5, 1,
                                          self.num_training_tasks()))

        def step():
            optimizer.zero_grad()
            loss, _, _ = reference.maml_outer_step(parameters, self.inner_lrs, next(batches),
                                                   num_inner_steps, not first_order)
            loss.backward()
            optimizer.step()
            loss.item()
        return self.measure_training(step)

    # the transfer baseline's adaptation, 5-way 5-shot: a new linear layer fitted per task
    def transfer(self, amp='none'):
        return maml_transfer.TransferLearner(LEARNING_RATE, self.sizes.adapt_steps, 2.0,
                                             self.log_dir, self.device,
                                             training.RunSettings(amp=amp), num_way=5)

    def reference_transfer_validate(self):
        """reference.transfer_learn, a task at a time, on the tasks ours_validate draws."""
        parameters = {key: value.to(self.device)
                      for key, value in maml.init_parameters(maml_transfer.NUM_CLASSES).items()}
        num_tasks = self.sizes.val_tasks
        loader = self.ours_loader('val', self.sizes.batch_size, 5, 5, num_tasks)

        def one_pass():
            return [reference.transfer_learn(parameters, task, self.sizes.adapt_steps, 2.0)[0]
                    .item() for task_batch in loader for task in task_batch]
        return self.measure_evaluation(one_pass, num_tasks)

    # metabolism task sampling, run_bio.sh's tasks
    def metabolism_data(self):
        """Random fingerprints and labels of the sizes METABOLISM_SIZES, on the device."""
        generator = torch.Generator().manual_seed(0)
        features = [torch.randint(2, (n, metabolism.NUM_BITS), generator=generator)
                    .float().to(self.device) for n in METABOLISM_SIZES]
        labels = [torch.randint(2, (n,), generator=generator) for n in METABOLISM_SIZES]
        return features, labels

    def metabolism_sampling(self, sample):
        """sample(set_idxs) -> tasks, timed over sampling_batches batches; tasks/s."""
        sets = torch.randint(len(METABOLISM_SIZES), (self.sizes.sampling_batches,
                                                     METABOLISM_BATCH))
        result = measure(lambda: [sample(set_idxs) for set_idxs in sets], 1, 1, self.device)
        return Result(sets.numel() / result.value, result.memory)

    def ours_metabolism_sampling(self):
        dataset = metabolism.MetabolismDataset(*self.metabolism_data(), *METABOLISM_SHOTS,
                                               torch.Generator().manual_seed(0))
        return self.metabolism_sampling(dataset.make_tasks)

    def reference_metabolism_sampling(self):
        features, labels = self.metabolism_data()
        class_rows = [[torch.nonzero(y == c).squeeze(1).to(self.device) for c in (0, 1)]
                      for y in labels]
        generator = torch.Generator().manual_seed(0)
        return self.metabolism_sampling(lambda set_idxs: reference.metabolism_tasks(
            features, class_rows, set_idxs, *METABOLISM_SHOTS, generator))

    # task sampling, 5-way 5-shot
    def ours_sampling(self):
        num_batches = self.sizes.sampling_batches
        loader = self.ours_loader('train', self.sizes.batch_size, 5, 5,
                                  self.sizes.batch_size * num_batches)
        result = measure(lambda: exhaust(loader), 1, 1, self.device)
        return Result(self.sizes.batch_size * num_batches / result.value, result.memory)

    def course_sampling(self):
        """Steady state: the workers are started and the first batch is out before timing."""
        num_batches = self.sizes.sampling_batches
        batches = iter(self.course_loader('train', self.sizes.batch_size, 5, 5,
                                          self.sizes.batch_size * (num_batches + 1)))
        next(batches)
        result = measure(lambda: exhaust(batches), 0, 1, self.device)
        return Result(self.sizes.batch_size * num_batches / result.value, result.memory)


# ----- the table -----

AMPS = ('none', 'bf16')


def training_setups(bench):
    """What the training rows measure: {name: (the reference's training step, a callable
    returning its Result; ours(amp, tasks) -> a learner; the tasks' shots)}, all 5-way."""
    setups = {'ProtoNet 5w5s': (bench.course_protonet_train, bench.protonet, 5)}
    for name, num_inner_steps, first_order in MAML_ROWS:
        setups[name] = (functools.partial(bench.course_maml_train, num_inner_steps, first_order),
                        functools.partial(bench.maml, num_inner_steps, first_order), 1)
    return setups


def count_operations(bench):
    """{training row name: (loop, batched)}: the operations one float32 training step of ours
    dispatches on each --tasks path."""
    return {name: tuple(bench.ours_operations(ours('none', tasks), 5, num_support)
                        for tasks in ('loop', 'batched'))
            for name, (_, ours, num_support) in training_setups(bench).items()}


def bf16_skipped(sizes, device):
    """Why the bf16 columns stay empty, or None: a device without bfloat16, where the scripts
    refuse it (util.bf16_problem), or --quick on the CPU, whose bfloat16 is emulated (seconds
    per MAML step here: most of the quick run's time)."""
    if problem := util.bf16_problem(device):
        return problem
    if sizes is QUICK and device.type == 'cpu':
        return '--quick on the CPU, where bfloat16 is emulated (the full run times it)'
    return None


def measure_rows(bench):
    """Every row of the table: {row name: (reference, ours fp32, ours bf16 or None)}. A row of
    ours with --tasks batched follows its loop row and shares its reference measurement. No
    bf16 where bf16_skipped says why."""
    rows = {}
    bf16_problem = bf16_skipped(bench.sizes, bench.device)

    def each_amp(measure_ours):
        """(ours fp32, ours bf16 or None): measure_ours(amp) -> Result for each of AMPS."""
        return tuple(None if amp == 'bf16' and bf16_problem else measure_ours(amp)
                     for amp in AMPS)

    def ours_both_ways(name, reference, measure_ours):
        """measure_ours(amp, tasks) -> Result; the loop row, then the batched one."""
        rows[name] = (reference, *each_amp(lambda amp: measure_ours(amp, 'loop')))
        rows[name.replace(':', f'{BATCHED}:')] = (
            reference, *each_amp(lambda amp: measure_ours(amp, 'batched')))

    for name, (course_train, ours, num_support) in training_setups(bench).items():
        ours_both_ways(f'{name}: training, s/iter', course_train(),
                       lambda amp, tasks: bench.ours_train(ours(amp, tasks), 5, num_support))
    network, _ = bench.course_protonet()

    def course_protonet_eval(task_batch):
        with torch.no_grad():
            return reference.protonet_step(network, task_batch)[0]

    parameters, _ = bench.course_maml()

    def course_maml_eval(task_batch):
        return reference.maml_outer_step(parameters, bench.inner_lrs, task_batch, 1, False)[0]

    for name, learner, course_eval, num_support in [
            ('ProtoNet 5w5s', bench.protonet, course_protonet_eval, 5),
            ('MAML 5w1s 1 step', lambda amp, tasks: bench.maml(1, amp=amp, tasks=tasks),
             course_maml_eval, 1)]:
        ours_both_ways(f'{name}: validation, s/task',
                       bench.course_validate(course_eval, 5, num_support),
                       lambda amp, tasks: bench.ours_validate(learner(amp, tasks), 5,
                                                              num_support))
        rows[f'{name}: --test, s/task'] = (  # one task at a time: nothing to batch
            bench.course_test(course_eval, 5, num_support),
            *each_amp(lambda amp: bench.ours_test(learner(amp, 'loop'), 5, num_support)))
    rows['Transfer 5w5s: validation, s/task'] = (
        bench.reference_transfer_validate(),
        *each_amp(lambda amp: bench.ours_validate(bench.transfer(amp), 5, 5)))
    rows['Task sampling 5w5s: tasks/s'] = (bench.course_sampling(), bench.ours_sampling(), None)
    rows['Metabolism sampling 2w5s10q: tasks/s'] = (bench.reference_metabolism_sampling(),
                                                    bench.ours_metabolism_sampling(), None)
    return rows


def ratio(reference, ours, name):
    """How many times faster ours is: a time ratio, or a throughput ratio for tasks/s."""
    value = ours.value / reference.value if 'tasks/s' in name else reference.value / ours.value
    return f'{value:.1f}x'


def number(value):
    return f'{value:.0f}' if value >= 100 else f'{value:.3g}'


def loop_and_batched(ours_loop, ours_batched, name):
    """The cells loop, batched and speed-up of one --amp; empty where it was not timed."""
    if ours_batched is None:
        return ['', '', '']
    return [number(ours_loop.value), number(ours_batched.value),
            ratio(ours_loop, ours_batched, name)]


def mib(memory):
    """A memory figure in MiB, or n/a where the platform has none (timing.memory_mib)."""
    return 'n/a' if memory is None else f'{memory:.0f}'


def format_table(rows, operations, batch_size):
    """The markdown tables of speed, memory and (operations: count_operations) operations per
    training step of batch_size tasks."""
    lines = ['| | reference | ours fp32 | speed-up | ours bf16 | speed-up |',
             '|---|---:|---:|---:|---:|---:|']
    for name, (theirs, ours, ours_bf16) in rows.items():
        bf16 = ([number(ours_bf16.value), ratio(theirs, ours_bf16, name)] if ours_bf16
                else ['', ''])
        lines.append(f'| {name} | ' + ' | '.join(
            [number(theirs.value), number(ours.value), ratio(theirs, ours, name), *bf16])
            + ' |')
    lines += ['', '| --tasks batched against the loop, s | loop fp32 | batched fp32 | speed-up '
              '| loop bf16 | batched bf16 | speed-up |', '|---|---:|---:|---:|---:|---:|---:|']
    for name, (_, *batched) in rows.items():
        if BATCHED not in name:
            continue
        loop = rows[name.replace(BATCHED, '')][1:]
        lines.append(f'| {name.replace(BATCHED, "")} | ' + ' | '.join(
            cell for pair in zip(loop, batched) for cell in loop_and_batched(*pair, name))
            + ' |')
    lines += ['', '| peak memory, MiB | reference | ours fp32 | ours bf16 |', '|---|---:|---:|---:|']
    for name, results in rows.items():
        lines.append(f'| {name.rsplit(",", 1)[0]} | ' + ' | '.join(
            mib(result.memory) if result else '' for result in results) + ' |')
    lines += ['', f'| operations per training step, batch of {batch_size} | loop | batched |',
              '|---|---:|---:|']
    lines += [f'| {name} | {loop} | {batched} |' for name, (loop, batched) in operations.items()]
    return '\n'.join(lines)


def machine(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return (f'{os.cpu_count()} CPU cores, torch {torch.__version__}, '
            f'{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}')


def main(args):
    device = util.get_device(args.device)
    util.make_deterministic(device, 'none')  # as the scripts train: the numerics without TF32
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, 'omniglot_resized')
        # the images of a character that a task can draw: all 20 at full size, 10 for --quick
        write_png_folder(omniglot.prepare()[:, :MOST_SHOTS + sizes.num_query], folder)
        bench = Bench(folder, sizes, device, os.path.join(work, 'logs'))
        if not check_numerics(sizes.batch_size, sizes.num_query, device, bench.log_dir,
                              sizes.seeds):
            print('error: ours is less accurate than the reference; see above',
                  file=sys.stderr)
            sys.exit(1)
        reset_peak_memory(device)  # frees what the checks left behind
        start_memory = memory_mib(device, peak=False)
        rows = measure_rows(bench)
        operations = count_operations(bench)
    print(f'\nMachine: {machine(device)}; batch of {sizes.batch_size} tasks, {sizes.num_query} queries per '
          f'class; median of {sizes.repeats} iterations after {sizes.warmup} warm-up; this '
          f'process held {mib(start_memory)} MiB before the rows.\n')
    if problem := bf16_skipped(sizes, device):
        print(f'No bf16 columns: {problem}.\n')
    print(format_table(rows, operations, sizes.batch_size))


def parse_args(argv=None):
    parser = util.argument_parser('Benchmark ours against a course-style reference')
    parser.add_argument('--quick', action='store_true', help='a few iterations, for CI')
    parser.add_argument('--device', type=str, default='cpu', help="'cpu' or 'gpu'")
    return parser.parse_args(argv)


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))

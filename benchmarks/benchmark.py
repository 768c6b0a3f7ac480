"""Speed of ours against a course-style reference, side by side, in one run on one machine.

    python benchmarks/benchmark.py                 # the README's table
    python benchmarks/benchmark.py --quick         # CI: a few iterations, the same accuracy checks
    python benchmarks/benchmark.py --device gpu    # the same on CUDA

The reference is the course's way of doing the same work, written out below: a torch DataLoader
with 2 worker processes whose dataset globs a class folder and decodes one PNG per image with
Pillow; for ProtoNet an nn.Sequential with nn.BatchNorm2d, one forward pass per task; for MAML
F.conv2d / F.batch_norm and torch.autograd.grad(create_graph=True), one task at a time. Ours is
the project's code, timed through the shared loop's training step (`_train_step`), `validate`
and `test`, so the numbers follow whatever protonet.py and maml.py implement.

Before timing anything, ours and the reference compute the loss and every gradient in float32 on
one batch with the same weights, and the reference again in float64; if ours is further from
the float64 result than twice the reference's float32 error (and more than 1e-4), the benchmark
exits with status 1.

Timing: each row runs warm-up iterations, then the median of timed ones. Ours and the reference
alternate within one process, so a busy machine slows both; still, take numbers on an idle one.
Memory: the peak resident set size of this process during a row's timed iterations (Linux
VmHWM, reset before each row through /proc/self/clear_refs, after the heap's free memory went
back to the system; on CUDA, the peak of allocated GPU memory). The reference's 2 loader
workers are processes of their own and are not counted.
"""
import argparse
import contextlib
import ctypes
import gc
import glob
import io
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import maml  # noqa: E402  (needs the path above)
import omniglot  # noqa: E402
import protonet  # noqa: E402
import util  # noqa: E402

RELATIVE_TOLERANCE = 1e-4
ACCURACY_MARGIN = 2
MAML_INNER_LR = 0.4
LEARNING_RATE = 0.001


@dataclass
class Sizes:
    """How much each row measures: training iterations (warm-up, then timed), passes over the
    validation tasks and over the test tasks (one warm-up, then timed), batches sampled."""
    batch_size: int
    warmup: int
    repeats: int
    eval_passes: int
    test_tasks: int
    sampling_batches: int


FULL = Sizes(batch_size=16, warmup=2, repeats=7, eval_passes=3, test_tasks=100,
             sampling_batches=30)
QUICK = Sizes(batch_size=2, warmup=1, repeats=1, eval_passes=1, test_tasks=2, sampling_batches=2)
# (name, inner steps, first order) of the MAML configurations trained
MAML_ROWS = [('MAML 5w1s 1 step', 1, False), ('MAML 5w1s 5 steps', 5, False),
             ('MAML 5w1s 1 step first-order', 1, True)]


# ----- the course's data pipeline: PNG files, a Dataset that decodes them, 2 workers -----
def write_png_folder(images, folder):
    """Writes every image as a course-style PNG, black strokes on white, mode '1'.

    Args:
        images (np.ndarray): uint8, strokes = 1, shape (1623, 20, 28, 28)
        folder (str): becomes folder/alphabetAA/characterCCCC/II.png, characters in index order
    """
    for class_idx, character in enumerate(images):
        path = os.path.join(folder, f'alphabet{class_idx // 100:02d}', f'character{class_idx:04d}')
        os.makedirs(path)
        for image_idx, image in enumerate(character):
            Image.fromarray(image == 0).save(os.path.join(path, f'{image_idx:02d}.png'))


def load_image(file_path):
    """The course's load_image: a PNG file -> float32 tensor (1, 28, 28), strokes 1.0."""
    x = np.asarray(Image.open(file_path).convert('L'), dtype=np.float32) / 255.0
    return torch.from_numpy(1.0 - x).reshape(1, omniglot.IMAGE_SIZE, omniglot.IMAGE_SIZE)


class CourseDataset(Dataset):
    """The course's OmniglotDataset: globs and decodes the PNG files of a task's classes."""

    def __init__(self, folder, num_support, num_query):
        self._character_folders = sorted(glob.glob(os.path.join(folder, '*/*/')))
        self._num_support = num_support
        self._num_query = num_query

    def __getitem__(self, class_idxs):
        images_support, images_query, labels_support, labels_query = [], [], [], []
        for label, class_idx in enumerate(class_idxs):
            file_paths = glob.glob(os.path.join(self._character_folders[class_idx], '*.png'))
            sampled = np.random.default_rng().choice(
                file_paths, size=self._num_support + self._num_query, replace=False)
            images = [load_image(file_path) for file_path in sampled]
            images_support.extend(images[:self._num_support])
            images_query.extend(images[self._num_support:])
            labels_support.extend([label] * self._num_support)
            labels_query.extend([label] * self._num_query)
        return (torch.stack(images_support), torch.tensor(labels_support),
                torch.stack(images_query), torch.tensor(labels_query))


class CourseSampler(Sampler):
    """The course's OmniglotSampler: num_way distinct classes of the split per task."""

    def __init__(self, split_idxs, num_way, num_tasks):
        super().__init__()
        self._split_idxs = split_idxs
        self._num_way = num_way
        self._num_tasks = num_tasks

    def __iter__(self):
        return (np.random.default_rng().choice(self._split_idxs, size=self._num_way,
                                               replace=False) for _ in range(self._num_tasks))

    def __len__(self):
        return self._num_tasks


def keep_list(task_batch):
    return task_batch


def course_dataloader(folder, split, batch_size, num_way, num_support, num_query, num_tasks):
    """The course's get_omniglot_dataloader: 2 workers, batches are lists of task tuples."""
    return DataLoader(CourseDataset(folder, num_support, num_query), batch_size=batch_size,
                      sampler=CourseSampler(omniglot.split_classes(split), num_way, num_tasks),
                      num_workers=2, collate_fn=keep_list, drop_last=True,
                      pin_memory=torch.cuda.is_available())


# ----- the course's ProtoNet: a plain network, one task at a time -----
def course_protonet_network():
    """The course's ProtoNetNetwork: 4 x [conv 3x3 -> BatchNorm2d -> ReLU -> max pool 2]."""
    layers, in_channels = [], protonet.NUM_INPUT_CHANNELS
    for _ in range(protonet.NUM_CONV_LAYERS):
        layers += [nn.Conv2d(in_channels, protonet.NUM_HIDDEN_CHANNELS, protonet.KERNEL_SIZE,
                             padding='same'),
                   nn.BatchNorm2d(protonet.NUM_HIDDEN_CHANNELS), nn.ReLU(), nn.MaxPool2d(2)]
        in_channels = protonet.NUM_HIDDEN_CHANNELS
    return nn.Sequential(*layers, nn.Flatten())


def course_protonet_step(network, task_batch, device):
    """The course's ProtoNet._step: mean query loss, mean support and query accuracies."""
    loss_batch, accuracy_support_batch, accuracy_query_batch = [], [], []
    for task in task_batch:
        images_support, labels_support, images_query, labels_query = (t.to(device) for t in task)
        latents_support = network(images_support)
        latents_query = network(images_query)
        prototypes = torch.stack([latents_support[labels_support == label].mean(0)
                                  for label in range(len(labels_support.unique()))])
        logits_support = -((latents_support[:, None] - prototypes[None]) ** 2).sum(-1)
        logits_query = -((latents_query[:, None] - prototypes[None]) ** 2).sum(-1)
        loss_batch.append(F.cross_entropy(logits_query, labels_query))
        accuracy_support_batch.append(util.score(logits_support, labels_support))
        accuracy_query_batch.append(util.score(logits_query, labels_query))
    return (torch.mean(torch.stack(loss_batch)), np.mean(accuracy_support_batch),
            np.mean(accuracy_query_batch))


# ----- the course's MAML: functional forward, autograd.grad inner loop, one task at a time -----
def course_maml_forward(parameters, images):
    """The course's MAML._forward: (n, 1, 28, 28) images -> (n, num_way) logits."""
    x = images
    for i in range(maml.NUM_CONV_LAYERS):
        x = F.conv2d(input=x, weight=parameters[f'conv{i}'], bias=parameters[f'b{i}'],
                     stride=1, padding='same')
        x = F.batch_norm(x, None, None, training=True)
        x = F.relu(x)
    x = torch.mean(x, dim=[2, 3])
    return F.linear(x, parameters[f'w{maml.NUM_CONV_LAYERS}'],
                    parameters[f'b{maml.NUM_CONV_LAYERS}'])


def course_maml_outer_step(parameters, task_batch, num_inner_steps, create_graph, device):
    """The course's MAML._outer_step with its _inner_loop inlined: (mean query loss, support
    accuracies before each step and after the last (one more forward pass), query accuracy),
    the accuracies averaged over tasks."""
    outer_loss_batch, accuracies_support, accuracies_query = [], [], []
    for task in task_batch:
        images_support, labels_support, images_query, labels_query = (t.to(device) for t in task)
        adapted, accuracies = dict(parameters), []
        for _ in range(num_inner_steps):
            logits = course_maml_forward(adapted, images_support)
            accuracies.append(util.score(logits, labels_support))
            gradients = torch.autograd.grad(F.cross_entropy(logits, labels_support),
                                            list(adapted.values()), create_graph=create_graph)
            adapted = {key: value - MAML_INNER_LR * gradient
                       for (key, value), gradient in zip(adapted.items(), gradients)}
        with torch.no_grad():
            accuracies.append(util.score(course_maml_forward(adapted, images_support),
                                         labels_support))
        logits = course_maml_forward(adapted, images_query)
        outer_loss_batch.append(F.cross_entropy(logits, labels_query))
        accuracies_support.append(accuracies)
        accuracies_query.append(util.score(logits, labels_query))
    return (torch.mean(torch.stack(outer_loss_batch)), np.mean(accuracies_support, axis=0),
            np.mean(accuracies_query))


# ----- measuring -----
def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return
    ctypes.CDLL(None).malloc_trim(0)  # glibc: free heap memory back to the system
    with open('/proc/self/clear_refs', 'w') as clear_refs:
        clear_refs.write('5')  # resets VmHWM to the current resident set size


def memory_mib(device, peak=True):
    """The peak (else current) resident set size of this process, or allocated CUDA memory."""
    if device.type == 'cuda':
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(
            device) / 2 ** 20
    field = 'VmHWM:' if peak else 'VmRSS:'
    with open('/proc/self/status') as status:
        line = next(line for line in status if line.startswith(field))
    return int(line.split()[1]) / 1024


def exhaust(iterable):
    for _ in iterable:
        pass


@dataclass
class Result:
    """One cell of the table: a number (seconds or tasks/s) and the peak memory in MiB."""
    value: float
    memory: float


def measure(step, warmup, repeats, device, per=1):
    """Runs step() warmup times, then repeats timed times.

    Returns:
        Result: median seconds of a call divided by per, and the peak memory while timed
    """
    for _ in range(warmup):
        step()
    reset_peak_memory(device)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Result(statistics.median(seconds) / per, memory_mib(device))


# ----- what is measured -----
class Bench:
    """Builds ours and the reference for one device and sizes; its methods return Results."""

    def __init__(self, folder, sizes, device, log_dir):
        self.folder = folder
        self.sizes = sizes
        self.device = device
        self.log_dir = log_dir

    def ours_loader(self, split, batch_size, num_way, num_support, num_tasks):
        return omniglot.get_omniglot_dataloader(split, batch_size, num_way, num_support, 15,
                                                num_tasks, device=self.device)

    def course_loader(self, split, batch_size, num_way, num_support, num_tasks):
        return course_dataloader(self.folder, split, batch_size, num_way, num_support, 15,
                                 num_tasks)

    def num_training_tasks(self):
        return self.sizes.batch_size * (self.sizes.warmup + self.sizes.repeats)

    def measure_training(self, step):
        return measure(step, self.sizes.warmup, self.sizes.repeats, self.device)

    def measure_evaluation(self, step, num_tasks):
        return measure(step, 1, self.sizes.eval_passes, self.device, per=num_tasks)

    # ProtoNet, 5-way 5-shot
    def protonet(self, amp='none'):
        learner = protonet.ProtoNet(LEARNING_RATE, self.log_dir, self.device)
        learner.amp = amp
        return learner

    def course_protonet(self):
        network = course_protonet_network().to(self.device)
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
            loss, _, _ = course_protonet_step(network, next(batches), self.device)
            loss.backward()
            optimizer.step()
            loss.item()
        return self.measure_training(step)

    def ours_validate(self, learner, num_way, num_support):
        num_tasks = self.sizes.batch_size * 4
        loader = self.ours_loader('val', self.sizes.batch_size, num_way, num_support, num_tasks)
        return self.measure_evaluation(lambda: learner.validate(loader), num_tasks)

    def course_validate(self, evaluate, num_way, num_support):
        """evaluate(task_batch) -> loss; one pass over a fresh course loader, as the course."""
        num_tasks = self.sizes.batch_size * 4
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
    def maml(self, num_inner_steps, first_order=False, amp='none'):
        learner = maml.MAML(5, num_inner_steps, MAML_INNER_LR, False, LEARNING_RATE,
                            self.log_dir, self.device, first_order=first_order)
        learner.amp = amp
        return learner

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
            loss, _, _ = course_maml_outer_step(parameters, next(batches), num_inner_steps,
                                                not first_order, self.device)
            loss.backward()
            optimizer.step()
            loss.item()
        return self.measure_training(step)

    # task sampling, 5-way 5-shot 15-query
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


# ----- numerics: ours as accurate as the reference -----
def largest_relative_error(loss, expected_loss, gradients, expected_gradients):
    """The largest of |loss - expected| / |expected| and ||a - b|| / ||b|| over gradient pairs.

    A gradient whose norm is below 1e-3 of the largest one (the bias of a convolution followed
    by batch norm: zero in exact arithmetic, float32 rounding noise in practice) is compared
    relative to the norm of the whole gradient instead.

    Args:
        loss, expected_loss (Tensor): 0-dim
        gradients, expected_gradients (list of Tensor): pairwise the same shapes
    """
    norms = [b.norm().item() for b in expected_gradients]
    whole = float(np.linalg.norm(norms))
    errors = [((a.double() - b).norm() / (norm if norm >= 1e-3 * max(norms) else whole)).item()
              for a, b, norm in zip(gradients, expected_gradients, norms, strict=True)]
    return max([((loss.double() - expected_loss).abs() / expected_loss.abs()).item(), *errors])


def in_float64(task_batch):
    return [tuple(t.double() if t.is_floating_point() else t for t in task) for task in task_batch]


def loss_and_gradients(loss, parameters):
    loss.backward()
    return loss.detach(), [p.grad for p in parameters]


def error_against(result, exact):
    """result, exact: (loss, gradients) pairs -> the largest relative error of result."""
    (loss, gradients), (expected_loss, expected_gradients) = result, exact
    return largest_relative_error(loss, expected_loss, gradients, expected_gradients)


def check_protonet(task_batch, device, log_dir):
    """Errors of ProtoNet._step and of the course's step against the course's step in float64,
    same weights and batch.

    Returns:
        (ours, reference): each the largest relative error of the loss or any gradient
    """
    learner = protonet.ProtoNet(LEARNING_RATE, log_dir, device)
    ours = [p for conv, norm in zip(learner._network.convs, learner._network.norms)
            for p in (*conv.parameters(), *norm.parameters())]
    reference, exact_reference = (course_protonet_network().to(device) for _ in range(2))
    exact_reference.double()
    with torch.no_grad():
        for network in (reference, exact_reference):
            for theirs, mine in zip(network.parameters(), ours, strict=True):
                theirs.copy_(mine)

    def course_step(network, batch):
        return loss_and_gradients(course_protonet_step(network, batch, device)[0],
                                  network.parameters())
    exact = course_step(exact_reference, in_float64(task_batch))
    return (error_against(loss_and_gradients(learner._step(task_batch)[0], ours), exact),
            error_against(course_step(reference, task_batch), exact))


def check_maml(task_batch, num_inner_steps, first_order, device, log_dir):
    """Errors of MAML._outer_step and of the course's outer step against the course's in
    float64, same weights and batch.

    Returns:
        (ours, reference): each the largest relative error of the loss or any meta-gradient
    """
    learner = maml.MAML(5, num_inner_steps, MAML_INNER_LR, False, LEARNING_RATE, log_dir, device,
                        first_order=first_order)
    ours = list(learner._meta_parameters.values())
    float32, float64 = ([value.detach().to(dtype).requires_grad_() for value in ours]
                        for dtype in (torch.float32, torch.float64))

    def course_step(parameters, batch):
        return loss_and_gradients(course_maml_outer_step(
            dict(zip(learner._meta_parameters, parameters)), batch, num_inner_steps,
            not first_order, device)[0], parameters)
    exact = course_step(float64, in_float64(task_batch))
    return (error_against(loss_and_gradients(learner._outer_step(task_batch, train=True)[0], ours),
                          exact),
            error_against(course_step(float32, task_batch), exact))


def check_numerics(bench, seeds=(0, 1, 2)):
    """Every accuracy check on one seeded batch, for weights drawn with each seed; prints them;
    True if all pass.

    Ours passes when its float32 loss and gradients are as close to the float64 result as the
    reference's float32 ones: its largest error over the seeds within ACCURACY_MARGIN times the
    reference's largest, or within RELATIVE_TOLERANCE. Comparing ours with the reference
    directly would fail any change of summation order: second-order MAML in float32 is itself
    ~1e-2 from float64, and on Omniglot's binary images rounding decides ties in max pooling,
    so the float32 error of either side varies 100-fold with the weights.
    """
    batch_size = bench.sizes.batch_size

    def task_batch(num_support):
        return next(iter(omniglot.get_omniglot_dataloader('train', batch_size, 5, num_support,
                                                          15, batch_size, device=bench.device)))

    def largest_errors(check, *args):
        errors = []
        for seed in seeds:
            torch.manual_seed(seed)
            errors.append(check(*args, bench.device, bench.log_dir))
        return np.max(errors, axis=0)
    errors = {'ProtoNet 5w5s': largest_errors(check_protonet, task_batch(5))}
    for name, num_inner_steps, first_order in MAML_ROWS:
        errors[name] = largest_errors(check_maml, task_batch(1), num_inner_steps, first_order)
    print(f'Float32 loss and gradients against the reference in float64, same batch of '
          f'{batch_size} tasks: largest relative error over weights drawn with seeds {seeds}')
    passed = True
    for name, (ours, reference) in errors.items():
        ok = ours <= max(RELATIVE_TOLERANCE, ACCURACY_MARGIN * reference)
        passed &= ok
        print(f'  {name}: ours {ours:.1e}, reference {reference:.1e} {"ok" if ok else "FAILED"}')
    return passed


# ----- the table -----

def measure_rows(bench):
    """Every row of the table: {row name: (reference, ours fp32, ours bf16 or None)}."""
    rows = {}
    rows['ProtoNet 5w5s: training, s/iter'] = (
        bench.course_protonet_train(),
        *(bench.ours_train(bench.protonet(amp), 5, 5) for amp in ('none', 'bf16')))
    for name, num_inner_steps, first_order in MAML_ROWS:
        rows[f'{name}: training, s/iter'] = (
            bench.course_maml_train(num_inner_steps, first_order),
            *(bench.ours_train(bench.maml(num_inner_steps, first_order, amp), 5, 1)
              for amp in ('none', 'bf16')))
    network, _ = bench.course_protonet()

    def course_protonet_eval(task_batch):
        with torch.no_grad():
            return course_protonet_step(network, task_batch, bench.device)[0]

    parameters, _ = bench.course_maml()

    def course_maml_eval(task_batch):
        return course_maml_outer_step(parameters, task_batch, 1, False, bench.device)[0]

    for name, learner, course_eval, num_support in [
            ('ProtoNet 5w5s', bench.protonet, course_protonet_eval, 5),
            ('MAML 5w1s 1 step', lambda amp: bench.maml(1, amp=amp), course_maml_eval, 1)]:
        rows[f'{name}: validation, s/task'] = (
            bench.course_validate(course_eval, 5, num_support),
            *(bench.ours_validate(learner(amp), 5, num_support) for amp in ('none', 'bf16')))
        rows[f'{name}: --test, s/task'] = (
            bench.course_test(course_eval, 5, num_support),
            *(bench.ours_test(learner(amp), 5, num_support) for amp in ('none', 'bf16')))
    rows['Task sampling 5w5s: tasks/s'] = (bench.course_sampling(), bench.ours_sampling(), None)
    return rows


def ratio(reference, ours, name):
    """How many times faster ours is: a time ratio, or a throughput ratio for tasks/s."""
    value = ours.value / reference.value if 'tasks/s' in name else reference.value / ours.value
    return f'{value:.1f}x'


def number(value):
    return f'{value:.0f}' if value >= 100 else f'{value:.3g}'


def format_table(rows):
    """The markdown tables of speed and memory."""
    lines = ['| | reference | ours fp32 | speed-up | ours bf16 | speed-up |',
             '|---|---:|---:|---:|---:|---:|']
    for name, (reference, ours, ours_bf16) in rows.items():
        bf16 = ([number(ours_bf16.value), ratio(reference, ours_bf16, name)] if ours_bf16
                else ['', ''])
        lines.append(f'| {name} | ' + ' | '.join(
            [number(reference.value), number(ours.value), ratio(reference, ours, name), *bf16])
            + ' |')
    lines += ['', '| peak memory, MiB | reference | ours fp32 | ours bf16 |', '|---|---:|---:|---:|']
    for name, results in rows.items():
        lines.append(f'| {name.rsplit(",", 1)[0]} | ' + ' | '.join(
            f'{result.memory:.0f}' if result else '' for result in results) + ' |')
    return '\n'.join(lines)


def machine(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return (f'{os.cpu_count()} CPU cores, torch {torch.__version__}, '
            f'{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}')


def main(args):
    device = util.get_device(args.device)
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, 'omniglot_resized')
        write_png_folder(omniglot.prepare(), folder)
        bench = Bench(folder, sizes, device, os.path.join(work, 'logs'))
        if not check_numerics(bench):
            print('error: ours is less accurate than the reference; see above',
                  file=sys.stderr)
            sys.exit(1)
        reset_peak_memory(device)  # frees what the checks left behind
        start_memory = memory_mib(device, peak=False)
        rows = measure_rows(bench)
    print(f'\nMachine: {machine(device)}; batch of {sizes.batch_size} tasks, 15 queries per '
          f'class; median of {sizes.repeats} iterations after {sizes.warmup} warm-up; this '
          f'process held {start_memory:.0f} MiB before the rows.\n')
    print(format_table(rows))


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Benchmark ours against a course-style reference')
    parser.add_argument('--quick', action='store_true', help='a few iterations, for CI')
    parser.add_argument('--device', type=str, default='cpu', help="'cpu' or 'gpu'")
    util.cli(lambda: main(parser.parse_args()))

"""The one training loop, validation, test, checkpointing and main body that every script shares.

A learner (ProtoNet, MAML, ...) subclasses MetaLearner and supplies only
    METRICS            ordered {key: printed label}; 'loss' first, then per-task accuracies
    TRAIN_METRICS      the same for training, where it measures other things (default METRICS)
    TEST_METRIC        the key whose per-task values `test` averages (a query accuracy)
    architecture       a string naming what the parameters are, checked when a checkpoint loads
    _evaluate(task_batch, train) -> (loss, metrics)
                       loss: mean query loss over the tasks, a 0-dim tensor (with grad if train)
                       metrics: {key: tensor of shape (num_tasks,) on the training device}
                       for every METRICS (with train, TRAIN_METRICS) key but 'loss'
    _checkpoint_state() / _load_checkpoint_state(state)
                       the learner's own checkpoint keys (parameters and optimizer state)
and an Adam optimizer in self._optimizer (run here with the device's fused kernel:
use_adam_kernels). Everything else lives here, once, including the
opt-in reduced precision (`amp`, from --amp): bfloat16 autocast around every `_evaluate`.
A script's main() checks its flags, then calls `main` below with its data set's task source
(sampling.py) and a function that builds its learner. Launched by torchrun, every process runs
the same loop on the same batches, each on its share of them (distributed.py).

On a GPU the host never waits for the device in a training step between log steps: a step's
loss and metrics stay on the device, and the host reads them every LOG_INTERVAL steps and
before every checkpoint, where a non-finite loss of any step since the last read stops
training before a checkpoint can hold it. Before the first step on a GPU, one line says so
where what a batch keeps for its backward pass would not fit in the device's free memory, with
the batch size that may (_check_memory).

A run survives being stopped: SIGTERM, SIGINT or SIGUSR1 (util.STOP_SIGNALS) ends training
after the step in progress, whose checkpoint is written first (util.Stopped: one line and exit
status 128 + the signal's number); a second signal ends it at once, the last whole checkpoint
kept. `--resume` continues from the newest checkpoint that loads, by itself, as torchrun's
restarts (--max-restarts) need.
"""
import dataclasses
import datetime
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import numpy as np
import torch

import distributed
import util

LOG_INTERVAL = 10
VAL_INTERVAL = 50
SAVE_INTERVAL = 100
NUM_TEST_TASKS = 600
FLAGS_FILE = 'flags.json'  # how a run was made, written as training starts
EVENTS_PREFIX = 'events.out.tfevents'  # how TensorBoard's SummaryWriter names its files
AMP_CHOICES = ('none', 'bf16')
TASKS_CHOICES = ('loop', 'batched', 'auto')
# What --tasks auto picks per device type; elsewhere the loop. The CPU: the loop, measured the
# faster in benchmarks/README.md's batched rows. CUDA and MPS: batched, chosen by the operation
# count until a GPU times both (benchmarks/README.md): a GPU step is bound by its kernel
# launches, and batched MAML 5-way 1-shot dispatches about a tenth of the loop's operations per
# step at 16 tasks, as many at any batch size.
AUTO_TASKS = {'cpu': 'loop', 'cuda': 'batched', 'mps': 'batched'}
# Where Adam runs fused: one kernel per step for all parameters, where the plain Adam launches
# about ten per parameter. torch has the fused kernel on these device types (foreach kernels,
# the other way to batch the update, it has on CUDA only: none on MPS); elsewhere Adam is
# torch's default.
FUSED_ADAM_DEVICES = ('cpu', 'cuda', 'mps')


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How a learner runs, apart from what it learns: what every learner hands to the loop.

    Attributes:
        val_interval, save_interval (int): steps between validations / checkpoints; None:
            VAL_INTERVAL, SAVE_INTERVAL
        val_ci95 (bool): validation also reports the 95% interval of TEST_METRIC
        amp (str): 'bf16' runs every _evaluate under bfloat16 autocast (--amp); 'none' float32
        tasks (str): how _evaluate runs a batch's tasks (batched_tasks, --tasks): 'loop',
            'batched' or 'auto'
    """
    val_interval: int = None
    save_interval: int = None
    val_ci95: bool = False
    amp: str = 'none'
    tasks: str = 'loop'


class MetaLearner:
    METRICS = {}
    TRAIN_METRICS = None
    TEST_METRIC = None
    architecture = None

    def __init__(self, log_dir, device, settings=RunSettings()):
        """
        Args:
            log_dir (str): where checkpoints (and, through main, TensorBoard logs) go
            device (str or torch.device): device to train and test on
            settings (RunSettings): intervals, amp and tasks; the learner reads self._batched
        """
        self._log_dir = log_dir
        self._device = device
        self._val_interval = settings.val_interval or VAL_INTERVAL
        self._save_interval = settings.save_interval or SAVE_INTERVAL
        self._val_ci95 = settings.val_ci95
        self._amp = settings.amp
        self._batched = batched_tasks(settings.tasks, device)
        self._start_train_step = 0
        self._loader_states = None
        self._unread = []  # (step, _train_step's summary on the device) not yet read
        self._signal = 0  # the stop signal received during training, 0 before one

    @property
    def _optimizer(self):
        """The learner's Adam, as its subclass sets it, run with the device's kernels."""
        return self._adam

    @_optimizer.setter
    def _optimizer(self, optimizer):
        self._adam = use_adam_kernels(optimizer, self._device)

    # ----- what subclasses implement -----
    def _evaluate(self, task_batch, train):
        raise NotImplementedError

    def _checkpoint_state(self):
        raise NotImplementedError

    def _load_checkpoint_state(self, state):
        raise NotImplementedError

    def _log_extra(self, writer, step):
        """Hook for learner-specific TensorBoard scalars (e.g. learned inner learning rates)."""

    def _autocast(self):
        """bfloat16 autocast when amp is 'bf16', else nothing: it runs convolutions and matrix
        products in bfloat16 and keeps cross-entropy in float32; gradients reach the float32
        parameters in float32."""
        return torch.autocast(torch.device(self._device).type, dtype=torch.bfloat16,
                              enabled=self._amp == 'bf16')

    def _share(self, task_batch):
        """This process's part of a training batch (distributed.share; all of it without
        torchrun); learners whose batches are not lists of tasks override it."""
        return distributed.share(task_batch)

    # ----- the loop -----
    def train(self, dataloader_train, dataloader_val, writer):
        """Trains from self._start_train_step until dataloader_train runs out. Under torchrun
        every process runs this loop on the same batches, each on its share (distributed.py);
        rank 0 alone saves (and alone prints and logs: training.main sees to that).

        Args:
            dataloader_train (TaskLoader): yields batches of training tasks
            dataloader_val (TaskLoader): yields batches of validation tasks
            writer (SummaryWriter): TensorBoard logger
        """
        print(f'Starting training at iteration {self._start_train_step}.')
        if self._loader_states is not None:
            dataloader_train.load_state_dict(self._loader_states['train'])
            dataloader_val.load_state_dict(self._loader_states['val'])
        step = self._start_train_step
        loaders = {'train': dataloader_train, 'val': dataloader_val}
        with util.on_stop_signals(self._on_signal):
            for step, task_batch in enumerate(dataloader_train, start=self._start_train_step):
                if step == self._start_train_step:
                    self._check_memory(task_batch)
                self._unread.append((step, self._train_step(task_batch, step)))
                if step % LOG_INTERVAL == 0:
                    metrics = self._read_training()
                    print(f'Iteration {step}: {self._format(metrics)}')
                    self._log(writer, 'train', metrics, step)
                    self._log_extra(writer, step)
                if step % self._val_interval == 0:
                    metrics = self.validate(dataloader_val)
                    print(f'Validation: {self._format(metrics)}')
                    self._log(writer, 'val', metrics, step)
                if step % self._save_interval == 0:
                    self._save_step(step, loaders)
                signum = distributed.largest(self._signal)  # every process stops at one step
                if signum:
                    self._stop(step, signum, loaders)
        self._read_training()
        writer.flush()
        return step

    def _check_memory(self, task_batch):
        """Before the first step on a GPU: one line (memory_warning) where what this process's
        tasks of task_batch keep for the backward pass would not fit in the device's free
        memory, rather than an out-of-memory error in the step. The estimate: the saved tensors
        of one task's training forward pass (graph_bytes), times the tasks; not on the CPU.
        """
        device = torch.device(self._device)
        free = free_memory(device)
        if free is None:
            return
        tasks = self._share(task_batch)
        with self._autocast():
            per_task = graph_bytes(self._evaluate(tasks[:1], train=True)[0])
        warning = memory_warning(per_task, len(tasks), free, device)
        if warning:
            print(warning)

    def _on_signal(self, signum):
        """A stop signal during training: the first one is noted, and train stops after this
        step (_stop); a second one raises KeyboardInterrupt wherever the process is, so that
        a checkpoint being written goes (atomic_file) and the last whole one stays."""
        if self._signal:
            raise KeyboardInterrupt
        self._signal = signum

    def _save_step(self, step, loaders):
        """Rank 0 saves step's checkpoint, after reading its training summaries (a non-finite
        loss stops training first); loaders: {'train': TaskLoader, 'val': TaskLoader}."""
        if distributed.is_main():
            self._read_training()
            self._save(step, {split: loader.state_dict() for split, loader in loaders.items()})

    def _stop(self, step, signum, loaders):
        """Saves step's checkpoint (if this step saved none) and raises util.Stopped."""
        if step % self._save_interval:
            self._save_step(step, loaders)
        raise util.Stopped(f'Stopped by {signal.Signals(signum).name} after iteration {step}, '
                           f'saved in {self._checkpoint_path(step)}; continue with: '
                           f'{resume_command()}', signum)

    def _train_metric_keys(self):
        return list(self.TRAIN_METRICS or self.METRICS)

    def _train_step(self, task_batch, step):
        """One optimizer step on a batch; returns its summary, a tensor on the device holding
        the batch's mean loss and mean metrics in _train_metric_keys order (averaged over the
        processes under torchrun). Nothing here waits for the device."""
        self._optimizer.zero_grad()
        with self._autocast():
            loss, metrics = self._evaluate(self._share(task_batch), train=True)
        loss.backward()
        loss = loss.detach()
        summary = torch.stack([loss] + [metrics[key].to(loss.dtype).mean()
                                        for key in self._train_metric_keys()[1:]])
        summary = distributed.average_gradients(
            [p for group in self._optimizer.param_groups for p in group['params']], summary)
        self._optimizer.step()
        return summary

    def _read_training(self):
        """Reads the training summaries not yet read, in one copy to the host, and returns the
        last as {key: float}; {} if none. A non-finite loss among them (the same on every
        process, whose losses are averaged) stops training with a UserError naming its step."""
        if not self._unread:
            return {}
        steps, summaries = zip(*self._unread)
        self._unread = []
        values = torch.stack(summaries).cpu()
        finite = torch.isfinite(values[:, 0])
        if not finite.all():
            first = int((~finite).nonzero()[0])
            raise util.UserError(
                f'the training loss became {float(values[first, 0])} at iteration '
                f'{steps[first]}; training stopped and the checkpoints in {self._log_dir} are '
                'the last good ones. Resume from one with --checkpoint_step, or lower the '
                'learning rate')
        return dict(zip(self._train_metric_keys(), values[-1].tolist()))

    def validate(self, dataloader_val):
        """Mean loss and metrics over one pass of dataloader_val (fresh tasks every call)."""
        loss, metrics = self._evaluate_pass(dataloader_val)
        summary = self._summarize(loss, metrics, self.METRICS)
        if self._val_ci95:
            summary['ci95'] = util.mean_and_ci95(metrics[self.TEST_METRIC])[1]
        return summary

    def test(self, dataloader_test):
        """Evaluates every task of dataloader_test; prints the mean and its 95% interval."""
        accuracies = self._evaluate_pass(dataloader_test)[1][self.TEST_METRIC]
        mean, ci95 = util.mean_and_ci95(accuracies)
        print(f'Accuracy over {len(accuracies)} test tasks: mean {mean:.3f}, '
              f'95% confidence interval {ci95:.3f}')
        return mean, ci95, accuracies

    def _evaluate_pass(self, dataloader):
        """Evaluates every task of one pass of dataloader; under torchrun each process its
        share of the tasks (distributed.share), all of them drawn by every process.

        Returns:
            the mean query loss over the tasks (a float; the mean of the batches' means, since
            the batches are the same size), and {metric key: numpy array, one row per task, in
            the loader's order}
        """
        loss_sums, per_task, first = [], [], 0
        for task_batch in dataloader:
            tasks = distributed.share(task_batch, first)
            first += len(task_batch)
            if tasks:
                with self._autocast():
                    loss, metrics = self._evaluate(tasks, train=False)
                loss_sums.append(loss * len(tasks))
                per_task.append(metrics)
        if per_task:  # the host reads the pass once
            loss_sum = float(torch.stack(loss_sums).sum())
            per_task = [{key: util.to_host(torch.cat([metrics[key] for metrics in per_task]))
                         for key in per_task[0]}]
        else:
            loss_sum = 0.0
        loss_sums, per_process = zip(*distributed.gather((loss_sum, per_task)))
        metrics = merge_per_task(per_process)
        return sum(loss_sums) / len(next(iter(metrics.values()))), metrics

    # ----- metrics -----
    @staticmethod
    def _summarize(loss, metrics, keys):
        summary = {'loss': float(loss)}
        summary.update({key: float(np.mean(metrics[key])) for key in keys if key != 'loss'})
        return summary

    def _format(self, summary):
        labels = dict(self.METRICS, **(self.TRAIN_METRICS or {}), ci95='Ci95')
        return ', '.join(f'{labels[key]}: {value:.3f}' for key, value in summary.items())

    @staticmethod
    def _log(writer, split, summary, step):
        for key, value in summary.items():
            writer.add_scalar(scalar_tag(split, key), value, step)

    # ----- checkpoints -----
    def _checkpoint_path(self, checkpoint_step):
        return os.path.join(self._log_dir, f'state{checkpoint_step}.pt')

    def _save(self, checkpoint_step, loader_states=None):
        """Writes {log_dir}/state{checkpoint_step}.pt atomically."""
        state = self._checkpoint_state()
        state.update(architecture=self.architecture, step=checkpoint_step,
                     loader_states=loader_states)
        util.atomic_save(state, self._checkpoint_path(checkpoint_step))

    def load(self, checkpoint_step):
        """Loads {log_dir}/state{checkpoint_step}.pt; training then resumes at the next step.
        A file that does not load (truncated, corrupt) raises DamagedCheckpoint."""
        path = self._checkpoint_path(checkpoint_step)
        if not os.path.isfile(path):
            raise util.UserError(f'no checkpoint at {path}; check --log_dir and --checkpoint_step')
        try:
            # On the CPU: the learner copies tensors into its own; Adam's step counts go where
            # its kernels take them (use_adam_kernels).
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as error:
            raise DamagedCheckpoint(path, error) from None
        if not isinstance(state, dict) or state.get('architecture') != self.architecture:
            found = state.get('architecture') if isinstance(state, dict) else type(state).__name__
            raise util.UserError(
                f'checkpoint {path} holds a {found} model, but these flags build a '
                f'{self.architecture} model; use the flags it was trained with or another --log_dir')
        self._load_checkpoint_state(state)
        self._start_train_step = checkpoint_step + 1
        self._loader_states = state.get('loader_states')
        print(f'Loaded checkpoint iteration {checkpoint_step}.')

    def resume(self):
        """Loads the newest checkpoint in the log dir that loads, saying so in one line for
        each damaged one passed over; returns its step, or -1 (and says so) if there is none.
        Under torchrun every process reads the same files, so loads the same one."""
        for step in sorted(checkpoint_steps(self._log_dir), reverse=True):
            try:
                self.load(step)
                return step
            except DamagedCheckpoint as damaged:
                print(f'Checkpoint {damaged.path} is damaged ({damaged.reason}); '
                      'trying the one before it.')
        print(f'No checkpoint in {self._log_dir} to resume from; starting fresh.')
        return -1


class DamagedCheckpoint(util.UserError):
    """A checkpoint file that exists but does not load: truncated (a full disk, a killed
    copy) or corrupt."""

    def __init__(self, path, error):
        self.path, self.reason = path, type(error).__name__
        super().__init__(f'checkpoint {path} is corrupt or unreadable ({self.reason}); '
                         'pick another --checkpoint_step, or --resume to take the newest '
                         'one that loads')


def checkpoint_steps(log_dir):
    """The steps of the checkpoints state{step}.pt in log_dir (none if it is missing); the
    temp files a killed save leaves (.tmp_*) are not checkpoints."""
    names = os.listdir(log_dir) if os.path.isdir(log_dir) else []
    return [int(match[1]) for name in names if (match := re.fullmatch(r'state(\d+)\.pt', name))]


def resume_command():
    """This run's command line with --resume for any --checkpoint_step: what continues it
    (a torchrun line with as many processes under torchrun)."""
    argv = sys.argv[1:]
    kept = [arg for i, arg in enumerate(argv) if not arg.startswith('--checkpoint_step')
            and not (i and argv[i - 1] == '--checkpoint_step')]
    launcher = (['torchrun', f'--nproc_per_node={distributed.world_size()}']
                if distributed.launched() else ['python'])
    resume = [] if '--resume' in kept else ['--resume']
    return shlex.join([*launcher, sys.argv[0], *kept, *resume])


def scalar_tag(split, key):
    """The TensorBoard tag of one logged metric: 'loss/{split}', else '{split}_accuracy/{key}'
    (split 'train' or 'val'; key a METRICS key, or 'ci95')."""
    return f'loss/{split}' if key == 'loss' else f'{split}_accuracy/{key}'


def merge_per_task(per_process):
    """The processes' per-task metrics as one set, in the order of the whole batch or pass.

    Args:
        per_process (list of list of dict): in rank order (distributed.gather), each process's
            _evaluate metrics, one dict per batch, {key: numpy array, one row per task}; an
            empty list for a process that evaluated no task
    """
    shares = [{key: np.concatenate([m[key] for m in batches]) for key in batches[0]}
              for batches in per_process if batches]
    return {key: distributed.interleave([share[key] for share in shares]) for key in shares[0]}


# ----- the command line every script shares -----
def add_common_args(parser, num_train_iterations, batch='tasks per outer-loop update',
                    iteration='outer-loop update'):
    """The assignment's flags that every script takes; batch and iteration say what a batch
    holds and what one training iteration is, for --help."""
    parser.add_argument('--log_dir', type=str, default=None,
                        help='directory to save to or load from')
    parser.add_argument('--num_way', type=int, default=5, help='number of classes in a task')
    parser.add_argument('--num_support', type=int, default=1,
                        help='number of support examples per class in a task')
    parser.add_argument('--num_query', type=int, default=15,
                        help='number of query examples per class in a task')
    parser.add_argument('--batch_size', type=int, default=16, help=f'number of {batch}')
    parser.add_argument('--num_train_iterations', type=int, default=num_train_iterations,
                        help=f'number of {iteration}s to train for')
    parser.add_argument('--test', default=False, action='store_true', help='train or test')
    parser.add_argument('--checkpoint_step', type=int, default=-1,
                        help=('checkpoint iteration to load for resuming '
                              'training, or for evaluation (-1 is ignore)'))
    parser.add_argument('--resume', action='store_true',
                        help='continue from the newest checkpoint in the log dir that loads '
                             '(start fresh if there is none)')
    parser.add_argument('--num_workers', type=int, default=2,
                        help='accepted for compatibility; tasks are sampled in memory')
    parser.add_argument('--cache', action='store_true', help='only prepare the data set, then exit')
    parser.add_argument('--device', type=str, default='cpu',
                        help="'cpu', or 'gpu' for CUDA (or Apple MPS)")
    parser.add_argument('--num_test_tasks', type=int, default=NUM_TEST_TASKS,
                        help='tasks --test evaluates (the course: 600)')
    parser.add_argument('--seed', type=int, default=0,
                        help='same seed, same initial weights and tasks')
    parser.add_argument('--amp', type=str, default='none', choices=AMP_CHOICES,
                        help="reduced precision: 'bf16' runs the forward pass under bfloat16 "
                             "autocast (faster on CPUs with AMX and on recent GPUs)")


def add_tasks_arg(parser):
    """--tasks, for the learners that can batch their tasks (ProtoNet, MAML)."""
    picks = ', '.join(f'{tasks} on {device}' for device, tasks in AUTO_TASKS.items())
    parser.add_argument('--tasks', type=str, default='loop',
                        help="'loop' runs a batch's tasks one at a time, 'batched' all at once "
                             "(torch.func.vmap; the same numbers), 'auto' picks by device: "
                             f'{picks}, loop elsewhere')


# The task shape, as every default log dir starts: (name in the log dir, flag).
TASK_FIELDS = (('way', 'num_way'), ('support', 'num_support'), ('query', 'num_query'))
# What a --test result is of, as its file name says: the task shape, then the inner steps of a
# script that has the flag (maml.py's gradient steps of adaptation).
TEST_FIELDS = (*TASK_FIELDS, ('inner_steps', 'num_inner_steps'))


def default_log_dir(learner, dataset, args, fields, options=()):
    """Where a run logs without --log_dir: ./logs/{learner}/{dataset}, then .{name}_{value} for
    each (name, flag) of fields and .{option}_True for each option flag that is set, so that
    runs with other flags land apart.

    Args:
        learner, dataset (str): the first two parts, e.g. 'maml' and 'omniglot'
        args (argparse.Namespace): the flags
        fields (tuple of (str, str)): (name in the log dir, flag), in order
        options (tuple of str): boolean flags named only when set
    """
    log_dir = f'./logs/{learner}/{dataset}' + ''.join(
        f'.{name}_{getattr(args, flag)}' for name, flag in fields)
    return log_dir + ''.join(f'.{option}_True' for option in options if getattr(args, option))


def per_task(function, batched):
    """function, of one task's tensors, as a function of a batch of tasks: all at once under
    torch.func.vmap (batched), or one task at a time, its results stacked. Either way batch
    norm in it uses each task's own statistics.

    Args:
        function (callable): tensors of one task -> a tensor or a tuple of tensors
        batched (bool): vmap over the tasks, or a loop

    Returns:
        a function of the same tensors with a leading task dimension (num_tasks, ...) -> its
        results with a leading task dimension
    """
    if batched:
        return torch.func.vmap(function)

    def loop(*inputs):
        results = [function(*task) for task in zip(*inputs)]
        if isinstance(results[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*results))
        return torch.stack(results)
    return loop


def graph_bytes(tensor):
    """Bytes of the tensors saved for the backward pass in tensor's autograd graph (each
    storage once), read from its nodes' saved values (the `_saved_*` attributes; hooks on
    saving do not run under torch.func.grad). A training step holds them from its forward pass
    into its backward pass: a lower bound of its memory.

    Args:
        tensor (Tensor): the result of a forward pass, with a grad_fn
    """
    storages, seen, nodes = {}, set(), [tensor.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith('_saved_'):
                values = getattr(node, name)
                for value in values if isinstance(values, (tuple, list)) else [values]:
                    if isinstance(value, torch.Tensor):
                        storage = value.untyped_storage()
                        storages[storage.data_ptr()] = storage.nbytes()
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def free_memory(device):
    """Bytes a GPU can still allocate: on CUDA, its free memory (torch.cuda.mem_get_info) and
    what PyTorch's cache holds unused; on MPS, the recommended working set less what is
    allocated; None elsewhere (the CPU: not checked)."""
    if device.type == 'cuda':
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    if device.type == 'mps':
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    return None


def memory_warning(per_task, num_tasks, free, device):
    """The line saying that num_tasks tasks of per_task bytes each exceed free bytes on device,
    with the largest --batch_size that may fit (this process's tasks times the processes);
    None where they fit."""
    if per_task * num_tasks <= free:
        return None
    fits = free // per_task * distributed.world_size()
    advice = (f'--batch_size {fits} at most fits' if fits else
              'not even one task fits: use fewer ways, shots, queries or inner steps')
    return (f'Warning: a batch of {num_tasks * distributed.world_size()} tasks keeps about '
            f'{per_task * num_tasks / 2 ** 30:.1f} GiB for its backward pass '
            f'({per_task / 2 ** 20:.0f} MiB a task), more than the {free / 2 ** 30:.1f} GiB '
            f'free on {device.type}; {advice}.')


def adam_kernels(device):
    """Adam's implementation flags for a device (str or torch.device): fused on
    FUSED_ADAM_DEVICES, else torch's default (both None)."""
    if torch.device(device).type in FUSED_ADAM_DEVICES:
        return {'fused': True, 'foreach': False}
    return {'fused': None, 'foreach': None}


def use_adam_kernels(optimizer, device):
    """optimizer (an Adam) with adam_kernels(device), now and after it loads a state: a
    checkpoint's groups carry the flags of the machine that wrote it, which load_state_dict
    would take, and they decide where it puts the step counts (fused: on the device).

    Returns:
        optimizer
    """
    kernels = adam_kernels(device)
    for group in optimizer.param_groups:
        group.update(kernels)
    optimizer.register_load_state_dict_pre_hook(lambda _, state: dict(
        state, param_groups=[dict(group, **kernels) for group in state['param_groups']]))
    return optimizer


def batched_tasks(tasks, device):
    """Whether a learner runs a batch's tasks all at once: --tasks 'batched', or 'auto' where
    AUTO_TASKS says batched for the device's type; 'loop' and other devices: one by one."""
    check_tasks(tasks)
    if tasks == 'auto':
        tasks = AUTO_TASKS.get(torch.device(device).type, 'loop')
    return tasks == 'batched'


def check_tasks(tasks):
    if tasks not in TASKS_CHOICES:
        raise util.UserError(f"unknown --tasks '{tasks}'; use one of {', '.join(TASKS_CHOICES)}")


def check_common_args(args):
    """One-line errors for flag values no run can use."""
    util.check_positive(batch_size=args.batch_size,
                        num_train_iterations=args.num_train_iterations,
                        num_test_tasks=args.num_test_tasks)
    if args.checkpoint_step < -1:
        raise util.UserError(f'--checkpoint_step must be -1 (start fresh) or a saved step, '
                             f'got {args.checkpoint_step}')
    if args.resume and (args.test or args.checkpoint_step > -1):
        raise util.UserError('--resume continues training from the newest checkpoint; it '
                             'takes neither --checkpoint_step nor --test')
    if not args.test:
        distributed.check_divides(args.batch_size)
    if args.test and args.checkpoint_step == -1:
        print('Warning: --test without --checkpoint_step evaluates an untrained model.')


def check_log_dir(args, log_dir):
    """One-line errors before anything is written: a training run's log dir that cannot be
    created, or a new run (no --resume, --checkpoint_step or --test) into a log dir that holds
    another run's checkpoints or TensorBoard events, which it would replace or mix with its own.
    """
    if args.test:
        return  # reads a checkpoint: Learner.load names a missing one
    nearest = Path(log_dir).absolute()  # what creating it would write into; nothing made yet
    while not nearest.exists():
        nearest = nearest.parent
    if not (nearest.is_dir() and os.access(nearest, os.W_OK | os.X_OK)):
        raise util.UserError(f'cannot create --log_dir {log_dir} ({nearest} is not a folder '
                             'you can write in); pick another --log_dir')
    if args.resume or args.checkpoint_step > -1 or not os.path.isdir(log_dir):
        return
    if checkpoint_steps(log_dir) or any(name.startswith(EVENTS_PREFIX)
                                        for name in os.listdir(log_dir)):
        raise util.UserError(f'{log_dir} holds another run\'s checkpoints or TensorBoard '
                             'events; continue that run with --resume or --checkpoint_step, '
                             'or give this one a new --log_dir')


def main(args, task_source, build_learner, default_log_dir, num_val_tasks=None):
    """The body of every script's main(): data, log dir, seed, learner, then train or test.

    Args:
        args (argparse.Namespace): flags parsed with add_common_args (and the script's own),
            already checked
        task_source: the data set's task source, with prepare() and loader(split, batch_size,
            num_tasks, device) (sampling.py)
        build_learner (callable): (log_dir, device) -> MetaLearner
        default_log_dir (str): the log dir named after the flags, used without --log_dir
        num_val_tasks (int): tasks per validation; default batch_size * 4, as the course
    """
    device = util.get_device(args.device)
    util.check_amp(device, args.amp)
    util.make_deterministic(device, args.amp)
    device = distributed.setup(device)
    log_dir = args.log_dir or default_log_dir
    if not args.cache:
        check_log_dir(args, log_dir)  # every process, before the first writes anything
    with distributed.local_main_first():
        ready = task_source.prepare()
    if args.cache:
        print(ready)
        return None
    print(f'log_dir: {log_dir}')
    util.seed_everything(args.seed)
    learner = build_learner(log_dir, device)
    start = args.checkpoint_step  # the checkpoint loaded, -1 for none
    if args.resume:
        start = learner.resume()
    elif start > -1:
        learner.load(start)
    else:
        print('Checkpoint loading skipped.')
    if args.test:
        result = learner.test(task_source.loader('test', 1, args.num_test_tasks, device))
        if distributed.is_main():
            write_test_result(args, log_dir, *result)
        return result
    num_training_tasks = args.batch_size * max(0, args.num_train_iterations - start - 1)
    dataloader_train = task_source.loader('train', args.batch_size, num_training_tasks, device)
    dataloader_val = task_source.loader('val', args.batch_size,
                                        num_val_tasks or args.batch_size * 4, device)
    if distributed.is_main():  # the loaders have checked the task shape: the run is on
        util.atomic_write_json(run_record(args), os.path.join(log_dir, FLAGS_FILE))
    from torch.utils.tensorboard import SummaryWriter  # slow import; training only
    if not distributed.is_main():  # rank 0 alone logs
        return learner.train(dataloader_train, dataloader_val, distributed.NullWriter())
    with SummaryWriter(log_dir=log_dir) as writer:
        log_hparams(writer, args, scalar_tag('val', learner.TEST_METRIC))
        return learner.train(dataloader_train, dataloader_val, writer)


def run_record(args):
    """How a run was made: its script, command line, every flag's value, the date, and the
    code's git commit (None outside a git checkout)."""
    return {'script': os.path.basename(sys.argv[0]), 'argv': sys.argv[1:], 'flags': vars(args),
            'date': datetime.datetime.now().isoformat(timespec='seconds'),
            'commit': util.git_commit()}


def log_hparams(writer, args, metric):
    """The flags as TensorBoard hparams of this run (its HPARAMS tab), against metric."""
    from torch.utils.tensorboard.summary import hparams
    flags = {key: value for key, value in vars(args).items()
             if isinstance(value, (bool, int, float, str))}
    for summary in hparams(flags, {metric: 0.0}):  # the metric's values: its logged scalars
        writer.file_writer.add_summary(summary)


def test_fields(args):
    """{name: value} of the TEST_FIELDS among a script's flags, in order."""
    return {name: getattr(args, flag) for name, flag in TEST_FIELDS if flag in vars(args)}


def test_result_path(args, log_dir):
    """{log_dir}/test.way_W.support_K.query_Q[.inner_steps_L].step_S.json."""
    fields = ''.join(f'.{name}_{value}' for name, value in test_fields(args).items())
    return os.path.join(log_dir, f'test{fields}.step_{args.checkpoint_step}.json')


def write_test_result(args, log_dir, mean, ci95, accuracies):
    """The --test result as JSON beside the checkpoints: the printed mean and interval, every
    task's accuracy, the task shape and the checkpoint, and how the run was made."""
    util.atomic_write_json(dict(
        run_record(args), mean=float(mean), ci95=float(ci95),
        accuracies=[float(a) for a in accuracies], num_tasks=len(accuracies),
        way=args.num_way, shot=args.num_support, query=args.num_query,
        inner_steps=test_fields(args).get('inner_steps'),
        checkpoint_step=args.checkpoint_step), test_result_path(args, log_dir))

"""The one training loop, validation, test, checkpointing and main body that every script shares.

A learner (ProtoNet, MAML, ...) subclasses MetaLearner and supplies only
    METRICS            ordered {key: printed label}; 'loss' first, then per-task accuracies
    TRAIN_METRICS      the same for training, where it measures other things (default METRICS)
    TEST_METRIC        the key whose per-task values `test` averages (a query accuracy)
    architecture       a string naming what the parameters are, checked when a checkpoint loads
    _evaluate(task_batch, train) -> (loss, metrics)
                       loss: mean query loss over the tasks, a 0-dim tensor (with grad if train)
                       metrics: {key: numpy array of shape (num_tasks,)} for every METRICS
                       (with train, TRAIN_METRICS) key but 'loss'
    _checkpoint_state() / _load_checkpoint_state(state)
                       the learner's own checkpoint keys (parameters and optimizer state)
and an Adam optimizer in self._optimizer. Everything else lives here, once, including the
opt-in reduced precision (`amp`, from --amp): bfloat16 autocast around every `_evaluate`.
A script's main() checks its flags, then calls `main` below with its data set's task source
(tasks.py) and a function that builds its learner.
"""
import datetime
import os
import sys

import numpy as np
import torch

import util

LOG_INTERVAL = 10
VAL_INTERVAL = 50
SAVE_INTERVAL = 100
NUM_TEST_TASKS = 600
FLAGS_FILE = 'flags.json'  # how a run was made, written as training starts
AMP_CHOICES = ('none', 'bf16')


class MetaLearner:
    METRICS = {}
    TRAIN_METRICS = None
    TEST_METRIC = None
    architecture = None

    def __init__(self, log_dir, device, val_interval=None, save_interval=None, val_ci95=False,
                 amp='none'):
        """
        Args:
            log_dir (str): where checkpoints (and, through main, TensorBoard logs) go
            device (str or torch.device): device to train and test on
            val_interval, save_interval (int): steps between validations / checkpoints
            val_ci95 (bool): validation also reports the 95% interval of TEST_METRIC
            amp (str): 'bf16' runs every _evaluate under bfloat16 autocast; 'none' float32
        """
        self._log_dir = log_dir
        self._device = device
        self._val_interval = val_interval or VAL_INTERVAL
        self._save_interval = save_interval or SAVE_INTERVAL
        self._val_ci95 = val_ci95
        self._amp = amp
        self._start_train_step = 0
        self._loader_states = None

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

    # ----- the loop -----
    def train(self, dataloader_train, dataloader_val, writer):
        """Trains from self._start_train_step until dataloader_train runs out.

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
        for step, task_batch in enumerate(dataloader_train, start=self._start_train_step):
            metrics = self._train_step(task_batch, step)
            if step % LOG_INTERVAL == 0:
                print(f'Iteration {step}: {self._format(metrics)}')
                self._log(writer, 'train', metrics, step)
                self._log_extra(writer, step)
            if step % self._val_interval == 0:
                metrics = self.validate(dataloader_val)
                print(f'Validation: {self._format(metrics)}')
                self._log(writer, 'val', metrics, step)
            if step % self._save_interval == 0:
                self._save(step, {'train': dataloader_train.state_dict(),
                                  'val': dataloader_val.state_dict()})
        writer.flush()
        return step

    def _train_step(self, task_batch, step):
        self._optimizer.zero_grad()
        with self._autocast():
            loss, metrics = self._evaluate(task_batch, train=True)
        if not torch.isfinite(loss):
            raise util.UserError(
                f'the training loss became {loss.item()} at iteration {step}; training stopped '
                f'and the checkpoints in {self._log_dir} are the last good ones. Resume from one '
                'with --checkpoint_step, or lower the learning rate')
        loss.backward()
        self._optimizer.step()
        return self._summarize(loss.item(), metrics, self.TRAIN_METRICS or self.METRICS)

    def validate(self, dataloader_val):
        """Mean loss and metrics over one pass of dataloader_val (fresh tasks every call)."""
        losses, per_task = [], []
        for task_batch in dataloader_val:
            with self._autocast():
                loss, metrics = self._evaluate(task_batch, train=False)
            losses.append(loss.item())
            per_task.append(metrics)
        metrics = {key: np.concatenate([m[key] for m in per_task]) for key in per_task[0]}
        summary = self._summarize(np.mean(losses), metrics, self.METRICS)
        if self._val_ci95:
            summary['ci95'] = util.mean_and_ci95(metrics[self.TEST_METRIC])[1]
        return summary

    def test(self, dataloader_test):
        """Evaluates every task of dataloader_test; prints the mean and its 95% interval."""
        with self._autocast():
            accuracies = np.concatenate([
                self._evaluate(task_batch, train=False)[1][self.TEST_METRIC]
                for task_batch in dataloader_test])
        mean, ci95 = util.mean_and_ci95(accuracies)
        print(f'Accuracy over {len(accuracies)} test tasks: mean {mean:.3f}, '
              f'95% confidence interval {ci95:.3f}')
        return mean, ci95, accuracies

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
            tag = f'loss/{split}' if key == 'loss' else f'{split}_accuracy/{key}'
            writer.add_scalar(tag, value, step)

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
        """Loads {log_dir}/state{checkpoint_step}.pt; training then resumes at the next step."""
        path = self._checkpoint_path(checkpoint_step)
        if not os.path.isfile(path):
            raise util.UserError(f'no checkpoint at {path}; check --log_dir and --checkpoint_step')
        try:
            state = torch.load(path, map_location=self._device, weights_only=True)
        except Exception as error:
            raise util.UserError(f'checkpoint {path} is corrupt or unreadable '
                                 f'({type(error).__name__}); '
                                 'pick another --checkpoint_step') from None
        if not isinstance(state, dict) or state.get('architecture') != self.architecture:
            found = state.get('architecture') if isinstance(state, dict) else type(state).__name__
            raise util.UserError(
                f'checkpoint {path} holds a {found} model, but these flags build a '
                f'{self.architecture} model; use the flags it was trained with or another --log_dir')
        self._load_checkpoint_state(state)
        self._start_train_step = checkpoint_step + 1
        self._loader_states = state.get('loader_states')
        print(f'Loaded checkpoint iteration {checkpoint_step}.')


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


def check_common_args(args):
    """One-line errors for flag values no run can use."""
    util.check_positive(batch_size=args.batch_size,
                        num_train_iterations=args.num_train_iterations,
                        num_test_tasks=args.num_test_tasks)
    if args.checkpoint_step < -1:
        raise util.UserError(f'--checkpoint_step must be -1 (start fresh) or a saved step, '
                             f'got {args.checkpoint_step}')
    if args.test and args.checkpoint_step == -1:
        print('Warning: --test without --checkpoint_step evaluates an untrained model.')


def main(args, task_source, build_learner, default_log_dir, num_val_tasks=None):
    """The body of every script's main(): data, log dir, seed, learner, then train or test.

    Args:
        args (argparse.Namespace): flags parsed with add_common_args (and the script's own),
            already checked
        task_source: the data set's task source, with prepare() and loader(split, batch_size,
            num_tasks, device) (tasks.py)
        build_learner (callable): (log_dir, device) -> MetaLearner
        default_log_dir (str): the log dir named after the flags, used without --log_dir
        num_val_tasks (int): tasks per validation; default batch_size * 4, as the course
    """
    device = util.get_device(args.device)
    ready = task_source.prepare()
    if args.cache:
        print(ready)
        return None
    log_dir = args.log_dir or default_log_dir
    print(f'log_dir: {log_dir}')
    util.seed_everything(args.seed)
    learner = build_learner(log_dir, device)
    if args.checkpoint_step > -1:
        learner.load(args.checkpoint_step)
    else:
        print('Checkpoint loading skipped.')
    if args.test:
        result = learner.test(task_source.loader('test', 1, args.num_test_tasks, device))
        write_test_result(args, log_dir, *result)
        return result
    util.atomic_write_json(run_record(args), os.path.join(log_dir, FLAGS_FILE))
    num_training_tasks = args.batch_size * (args.num_train_iterations - args.checkpoint_step - 1)
    dataloader_train = task_source.loader('train', args.batch_size, num_training_tasks, device)
    dataloader_val = task_source.loader('val', args.batch_size,
                                        num_val_tasks or args.batch_size * 4, device)
    from torch.utils.tensorboard import SummaryWriter  # slow import; training only
    with SummaryWriter(log_dir=log_dir) as writer:
        log_hparams(writer, args, f'val_accuracy/{learner.TEST_METRIC}')
        return learner.train(dataloader_train, dataloader_val, writer)


def run_record(args):
    """How a run was made: its script, command line, every flag's value, and the date."""
    return {'script': os.path.basename(sys.argv[0]), 'argv': sys.argv[1:], 'flags': vars(args),
            'date': datetime.datetime.now().isoformat(timespec='seconds')}


def log_hparams(writer, args, metric):
    """The flags as TensorBoard hparams of this run (its HPARAMS tab), against metric."""
    from torch.utils.tensorboard.summary import hparams
    flags = {key: value for key, value in vars(args).items()
             if isinstance(value, (bool, int, float, str))}
    for summary in hparams(flags, {metric: 0.0}):  # the metric's values: its logged scalars
        writer.file_writer.add_summary(summary)


def test_result_path(args, log_dir):
    """{log_dir}/test.way_W.support_K.query_Q[.inner_steps_L].step_S.json."""
    inner_steps = (f'.inner_steps_{args.num_inner_steps}'
                   if hasattr(args, 'num_inner_steps') else '')
    return os.path.join(log_dir, f'test.way_{args.num_way}.support_{args.num_support}'
                                 f'.query_{args.num_query}{inner_steps}'
                                 f'.step_{args.checkpoint_step}.json')


def write_test_result(args, log_dir, mean, ci95, accuracies):
    """The --test result as JSON beside the checkpoints: the printed mean and interval, every
    task's accuracy, the task shape and the checkpoint, and how the run was made."""
    util.atomic_write_json(dict(
        run_record(args), mean=float(mean), ci95=float(ci95),
        accuracies=[float(a) for a in accuracies], num_tasks=len(accuracies),
        way=args.num_way, shot=args.num_support, query=args.num_query,
        inner_steps=getattr(args, 'num_inner_steps', None),
        checkpoint_step=args.checkpoint_step), test_result_path(args, log_dir))

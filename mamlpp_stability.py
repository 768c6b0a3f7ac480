"""MAML against MAML++ where plain MAML can train unstably (several inner steps with a large
inner learning rate): validation curves over several seeds, in one command and one figure (the
second handout's extra credit).

    python mamlpp_stability.py                                          # full length (15000)
    python mamlpp_stability.py -- --num_train_iterations 201 --batch_size 4   # shortened

For each seed it runs maml.py with SETTING (and any maml.py flags given after --), once plain
and once with --mamlpp, each in its own log dir under --log_dir. A run whose last validation is
logged is skipped, and a stopped one resumes from its latest checkpoint, so the command can be
stopped and started again. Then it reads every run's validation post-adaptation query accuracy
from its TensorBoard event files, draws each seed's curve and the mean per method into
--figure, and prints the last validation of each run.
"""
import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

import training
import util

ROOT = Path(__file__).resolve().parent
SETTING = ['--num_way', '5', '--num_support', '1', '--num_inner_steps', '5', '--inner_lr', '0.4']
METHODS = {'MAML': [], 'MAML++': ['--mamlpp']}
TAG = 'val_accuracy/post_adapt_query'


def validation_curve(log_dir):
    """(steps, accuracies) of a run's validations, sorted by step, empty for a run not yet
    started; a step logged twice (a resumed run) keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    if not Path(log_dir).is_dir():
        return [], []
    events = EventAccumulator(str(log_dir), size_guidance={'scalars': 0})
    events.Reload()
    if TAG not in events.Tags()['scalars']:
        return [], []
    by_step = {event.step: event.value for event in events.Scalars(TAG)}
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def latest_checkpoint(log_dir):
    """The step of the newest state{step}.pt in log_dir, or -1."""
    return max((int(path.stem.removeprefix('state')) for path in Path(log_dir).glob('state*.pt')),
               default=-1)


def run(log_dir, flags, num_train_iterations):
    """Runs (or resumes, or skips) one maml.py training run; returns its validation_curve."""
    last_validation = (num_train_iterations - 1) // training.VAL_INTERVAL * training.VAL_INTERVAL
    curve = validation_curve(log_dir)
    if last_validation in curve[0]:
        print(f'{log_dir}: done, skipped')
        return curve
    resume = latest_checkpoint(log_dir)
    command = [sys.executable, str(ROOT / 'maml.py'), *flags, '--log_dir', str(log_dir),
               '--checkpoint_step', str(resume)]
    print(' '.join(command[1:]), flush=True)
    if subprocess.run(command, stdout=subprocess.DEVNULL).returncode:
        raise util.UserError(f'maml.py failed for {log_dir} (its error is above); fix its flags '
                             'and run again: finished runs are kept')
    return validation_curve(log_dir)


def draw(curves, figure, caption):
    """curves: {method: [(steps, accuracies) of each seed]} -> a PNG at figure."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, runs), color in zip(curves.items(), ('tab:blue', 'tab:orange')):
        for steps, accuracies in runs:
            ax.plot(steps, accuracies, color=color, alpha=0.35, linewidth=1)
        length = min(len(steps) for steps, _ in runs)
        mean = np.mean([accuracies[:length] for _, accuracies in runs], axis=0)
        ax.plot(runs[0][0][:length], mean, color=color, linewidth=2.5, marker='o', markersize=4,
                label=f'{method}: mean of {len(runs)} seeds (thin: each seed)')
    ax.set_xlabel('training iteration')
    ax.set_ylabel('validation post-adaptation query accuracy')
    ax.set_title('MAML vs MAML++: training stability', fontsize=11)
    ax.legend(loc='lower right', fontsize=8)
    ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, caption, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(figure, dpi=120)
    plt.close(fig)


def main(args):
    util.check_positive(num_seeds=len(args.seeds))
    maml_args = maml_parser().parse_args(SETTING + args.maml_flags)
    curves = {}
    for method, method_flags in METHODS.items():
        curves[method] = []
        for seed in args.seeds:
            log_dir = Path(args.log_dir) / f'{method}.seed_{seed}'
            curves[method].append(run(log_dir, SETTING + args.maml_flags + method_flags
                                      + ['--seed', str(seed)], maml_args.num_train_iterations))
            print(f'{method} seed {seed}: last validation accuracy '
                  f'{curves[method][-1][1][-1]:.3f} at iteration {curves[method][-1][0][-1]}')
    caption = (f"maml.py {' '.join(SETTING + args.maml_flags)}; {maml_args.num_train_iterations} "
               f'iterations, batch of {maml_args.batch_size} tasks, validation on '
               f'{maml_args.batch_size * 4} tasks every {training.VAL_INTERVAL}')
    draw(curves, args.figure, caption)
    print(f'Wrote {args.figure}.')


def maml_parser():
    import maml  # the flags and their defaults, to read the run's length
    parser = argparse.ArgumentParser()
    maml.add_maml_args(parser, num_train_iterations=15000)
    return parser


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--log_dir', default='./logs/mamlpp_stability',
                        help='one log dir per method and seed goes under it')
    parser.add_argument('--figure', default='mamlpp_stability.png', help='the PNG to write')
    parser.add_argument('maml_flags', nargs='*', help='maml.py flags, after --')
    return parser.parse_args(argv)


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))

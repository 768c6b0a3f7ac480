"""Training speed of one process against several on the same cores, side by side:

    python -m benchmarks.torchrun_speed             # P = 1 with 1 and 2 threads, P = 2 with 1 each
    python -m benchmarks.torchrun_speed --cores 4   # P = 1 with 1 and 4 threads, P = 4 with 1 each

Each row times the shared loop's training step (`_train_step`, distributed.py's gradient
averaging included) on batches of 16 tasks: one process with one thread, one process with a
thread per core (`python`), and a process of one thread per core (torchrun, gloo). The runs
alternate, --rounds times, so that a busy machine slows all alike; each run reports the median
of its timed iterations after warm-up, and the table the median over the rounds.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import distributed
import maml
import omniglot
import protonet
import util
from benchmarks.timing import measure

ROOT = Path(__file__).resolve().parents[1]

BATCH_SIZE = 16
WARMUP, REPEATS = 2, 7
# row: (label, task shape (way, support, query), builder of the learner: (log_dir, device) -> it)
ROWS = {
    'protonet': ('ProtoNet 5w5s', (5, 5, 15),
                 lambda log_dir, device: protonet.ProtoNet(0.001, log_dir, device)),
    'maml': ('MAML 5w1s 1 step', (5, 1, 15),
             lambda log_dir, device: maml.MAML(5, 1, 0.4, False, 0.001, log_dir, device)),
}


def time_training(row):
    """In this process (one of torchrun's, or alone): seconds per training iteration, the
    median of REPEATS after WARMUP; rank 0 prints it as JSON."""
    _, shape, build = ROWS[row]
    device = distributed.setup(util.get_device('cpu'))
    util.seed_everything(0)
    with tempfile.TemporaryDirectory() as log_dir:
        learner = build(log_dir, device)
        loader = omniglot.OmniglotTasks(*shape).loader(
            'train', BATCH_SIZE, BATCH_SIZE * (WARMUP + REPEATS), device)
        batches = iter(loader)
        seconds = measure(lambda: learner._train_step(next(batches), 1), WARMUP, REPEATS,
                          device).value
    print(json.dumps({'seconds': seconds}))


def run(row, processes, threads):
    """Seconds per iteration of row with processes processes of threads threads each."""
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                 f'--nproc_per_node={processes}'])
    result = subprocess.run([*launcher, '-m', __spec__.name, '--time', row], cwd=ROOT, check=True,
                            capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return json.loads(result.stdout.splitlines()[-1])['seconds']


def main(args):
    settings = [(1, 1), (1, args.cores), (args.cores, 1)]  # (processes, threads each)
    print(f'{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}; batch of '
          f'{BATCH_SIZE} tasks; median of {REPEATS} iterations after {WARMUP}, median of '
          f'{args.rounds} alternating rounds\n')
    print(f'| training, iterations/s | P = 1 (1 thread) | P = 1 ({args.cores} threads) | '
          f'P = {args.cores} (1 thread each) | P = {args.cores} / P = 1 ({args.cores} threads) |')
    print('|---|---:|---:|---:|---:|')
    for row in args.rows:
        seconds = {setting: [] for setting in settings}
        for _ in range(args.rounds):
            for setting in settings:
                seconds[setting].append(run(row, *setting))
        rates = [1 / statistics.median(seconds[setting]) for setting in settings]
        cells = ' | '.join(f'{rate:.2f}' for rate in rates)
        print(f'| {ROWS[row][0]} | {cells} | {rates[2] / rates[1]:.2f}x |', flush=True)


def parse_args(argv=None):
    parser = util.argument_parser('Training speed of one process against several')
    parser.add_argument('--cores', type=int, default=2,
                        help='threads of the single process, and processes of one thread each')
    parser.add_argument('--rounds', type=int, default=3, help='alternating rounds per row')
    parser.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS),
                        help='the rows to measure')
    parser.add_argument('--time', choices=list(ROWS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == '__main__':
    args = parse_args()
    if args.time:
        util.cli(lambda: time_training(args.time))
    else:
        main(args)

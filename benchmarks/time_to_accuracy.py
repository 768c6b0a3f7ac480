"""Wall time of a training run until its validation query accuracy first reaches a target.

    python -m benchmarks.time_to_accuracy --target 0.99 -- --num_support 5 --seed 0
    python -m benchmarks.time_to_accuracy --target 0.99 -- --num_support 5 --seed 0 --amp bf16
    python -m benchmarks.time_to_accuracy --target 0.99 --reference -- --seed 0

Runs `python protonet.py <flags after -->` from scratch in a fresh log folder, timestamps every
line it prints, and stops it at the first `Validation:` line whose query accuracy is at least
the target (validation runs every 50 iterations, so this is a bound to within 50 iterations).
Prints every validation line with its wall time, then the result. With --reference it runs the
course-style loop of benchmarks/course_protonet.py instead, on a PNG folder written before the
clock starts.
"""
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import omniglot
import util
from benchmarks.course_pipeline import write_png_folder

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = re.compile(r'^Validation: .*query accuracy: ([\d.]+)')
ITERATION = re.compile(r'^Iteration (\d+):')


def run_until(target, arguments):
    """Runs `python -u <arguments>`; returns (iteration, seconds) of its first validation at or
    above target, else None."""
    command = [sys.executable, '-u', *arguments]
    print(' '.join(command[1:]), flush=True)
    start = time.perf_counter()
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as process:
        iteration = None
        for line in process.stdout:
            seconds = time.perf_counter() - start
            if match := ITERATION.match(line):
                iteration = int(match[1])
            elif match := VALIDATION.match(line):
                print(f'{seconds:8.1f} s  iteration {iteration}: {line.strip()}', flush=True)
                if float(match[1]) >= target:
                    process.terminate()
                    return iteration, seconds
    return None


def parse_args(argv=None):
    parser = util.argument_parser(description=__doc__.split('\n')[0])
    parser.add_argument('--target', type=float, default=0.99,
                        help='validation query accuracy to reach')
    parser.add_argument('--reference', action='store_true',
                        help="train the course's implementation (benchmarks/course_protonet.py)")
    parser.add_argument('flags', nargs='*', default=[], help='protonet.py flags, after --')
    return parser.parse_args(argv)


def main(args):
    with tempfile.TemporaryDirectory() as work:
        if args.reference:
            folder = str(Path(work) / 'omniglot_resized')
            write_png_folder(omniglot.prepare(), folder)
            arguments = ['-m', 'benchmarks.course_protonet', '--folder', folder]
        else:
            arguments = ['protonet.py', '--log_dir', work]
        result = run_until(args.target, arguments + args.flags)
    if result is None:
        print(f'The run ended before validation query accuracy reached {args.target}.')
        sys.exit(1)
    iteration, seconds = result
    print(f'Validation query accuracy first reached {args.target} at iteration {iteration}, '
          f'after {seconds:.0f} s of wall time (start-up included).')


if __name__ == '__main__':
    main(parse_args())

"""Runs a training script in float64, with a checkpoint every step and validation every
VAL_INTERVAL steps, for tests/test_distributed.py; in-process (`run`) or as a program:

    python -m torch.distributed.run --nproc_per_node=2 tests/float64_run.py protonet.py FLAGS...

Several commands in one launch (one start of the processes and their process group), each
printed after a line `=== i ===`: separate them by `+++`; a command starting `--float32`
runs its script as `python script FLAGS...` does (float32, the script's own intervals):

    ... tests/float64_run.py protonet.py FLAGS... +++ --float32 maml.py --test FLAGS...

Why float64: one process and two compute the same batch gradient in different summation
orders. In float32 those roundings differ by ~1e-7, and Adam turns them into steps of the full
learning rate on weights whose gradient is zero in exact arithmetic (a convolution bias that
batch norm cancels), so float32 runs drift apart within a few steps, as runs with 1 and 2
threads do. In float64 the rounding is ~1e-16, far below Adam's epsilon, and the runs agree
to ~1e-9: what remains is the scheme itself.
"""
import contextlib
import importlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import distributed  # noqa: E402  (needs the path above)
import training  # noqa: E402
import util  # noqa: E402

SEPARATOR = '+++'

VAL_INTERVAL = 2


@contextlib.contextmanager
def float64():
    """torch's default dtype float64 (the weights, and the images: omniglot.py) in the block."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def run(script, flags):
    """Runs `python script flags...` in this process, in float64, with a checkpoint every step
    and validation every VAL_INTERVAL steps."""
    saved = training.SAVE_INTERVAL, training.VAL_INTERVAL
    training.SAVE_INTERVAL, training.VAL_INTERVAL = 1, VAL_INTERVAL
    try:
        with float64():
            run_main(script, flags)
    finally:
        training.SAVE_INTERVAL, training.VAL_INTERVAL = saved


def run_main(script, flags):
    """Runs `python script flags...` in this process: what its `__main__` block runs, through
    the imported module, so that a test's patches of the module hold."""
    module = importlib.import_module(Path(script).stem)
    saved = sys.argv
    sys.argv = [str(ROOT / script), *flags]
    try:
        util.cli(lambda: module.main(module.parse_args()))
    finally:
        sys.argv = saved


def commands(argv):
    """argv split at SEPARATOR: [(float32, script, flags)]."""
    found, current = [], []
    for word in [*argv, SEPARATOR]:
        if word != SEPARATOR:
            current.append(word)
            continue
        float32 = current[0] == '--float32'
        script, *flags = current[float32:]
        found.append((float32, script, flags))
        current = []
    return found


def main(argv):
    """Runs each command; under torchrun the processes join their group once, for all."""
    import torch.distributed as dist
    setup = distributed.setup
    distributed.setup = lambda device: device if dist.is_initialized() else setup(device)
    stdout = sys.stdout
    for i, (float32, script, flags) in enumerate(commands(argv)):
        if os.environ.get('RANK', '0') == '0':
            print(f'=== {i} ===', file=stdout, flush=True)
        (run_main if float32 else run)(script, flags)
        sys.stdout.flush()


if __name__ == '__main__':
    main(sys.argv[1:])

"""Runs a training script in float64, with a checkpoint every step and validation every
VAL_INTERVAL steps, for tests/test_distributed.py; in-process (`run`) or as a program:

    python -m torch.distributed.run --nproc_per_node=2 tests/float64_run.py protonet.py FLAGS...

Why float64: one process and two compute the same batch gradient in different summation
orders. In float32 those roundings differ by ~1e-7, and Adam turns them into steps of the full
learning rate on weights whose gradient is zero in exact arithmetic (a convolution bias that
batch norm cancels), so float32 runs drift apart within a few steps, as runs with 1 and 2
threads do. In float64 the rounding is ~1e-16, far below Adam's epsilon, and the runs agree
to ~1e-9: what remains is the scheme itself.
"""
import contextlib
import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import training  # noqa: E402  (needs the path above)

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
    saved = sys.argv, training.SAVE_INTERVAL, training.VAL_INTERVAL
    sys.argv = [script, *flags]
    training.SAVE_INTERVAL, training.VAL_INTERVAL = 1, VAL_INTERVAL
    try:
        with float64():
            runpy.run_path(str(ROOT / script), run_name='__main__')
    finally:
        sys.argv, training.SAVE_INTERVAL, training.VAL_INTERVAL = saved


if __name__ == '__main__':
    run(sys.argv[1], sys.argv[2:])

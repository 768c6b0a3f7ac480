"""Data-parallel training across the processes that torchrun starts (torch.distributed: gloo on
the CPU, NCCL on CUDA). A plain `python script.py` never gets here past `launched()`: one
process, no process group, and every function below trivial.

The scheme, the same computation as one process's (up to the order of floating-point sums):
- Every process draws the same batches from the same seeded loaders (sampling is cheap), so a
  loader's state, and the checkpoint that holds it, does not depend on the number of processes
  P: a run saved with P = 2 resumes with P = 1 and the other way round.
- Item i of a batch (a task, or an image of a pre-training batch), or task i of an evaluation
  pass, belongs to process i % P (`share`); `interleave` puts the gathered items back in the
  order of one process, so the printed metrics cover every task exactly once, in P = 1's order.
- Training needs P to divide the batch: each process's loss is then the mean over the same
  number of items, and the mean of the processes' gradients is the gradient of the whole
  batch's mean loss (`average_gradients`).
- Initial weights are the same everywhere because every process seeds torch with --seed and
  the learners build their weights on the CPU before moving them; a resumed run loads the same
  checkpoint everywhere. Nothing is broadcast.
"""
import atexit
import contextlib
import datetime
import functools
import os

import numpy as np
import torch
import torch.distributed as dist

import util

TORCHRUN_VARIABLES = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')
# How long the other processes wait for each machine's first one to download and build the
# data (local_main_first); training's collectives keep the backend's own timeout.
DATA_TIMEOUT = datetime.timedelta(hours=1)


def launched():
    """Whether torchrun started this process (it sets these variables for every process)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def rank():
    return int(os.environ['RANK']) if launched() else 0


def world_size():
    return int(os.environ['WORLD_SIZE']) if launched() else 1


def is_main():
    """Whether this process prints, logs and saves: rank 0, or the only process."""
    return rank() == 0


def setup(device):
    """Joins torchrun's process group, if torchrun started this process; returns the device to
    use. On CUDA each process takes the GPU of its LOCAL_RANK and NCCL; on the CPU, gloo. The
    group is torn down at exit. (util.cli has sent the other processes' stdout to /dev/null.)

    Args:
        device (torch.device): what --device picked (util.get_device)
    """
    if not launched():
        return device
    if device.type == 'cuda':
        local_rank = int(os.environ['LOCAL_RANK'])
        if local_rank >= torch.cuda.device_count():
            raise util.UserError(f'torchrun started more processes on this machine than its '
                                 f'{torch.cuda.device_count()} GPUs; use --nproc_per_node '
                                 f'{torch.cuda.device_count()} or fewer')
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    elif device.type != 'cpu':
        raise util.UserError(f'torchrun runs on CUDA (NCCL) or the CPU (gloo), not on '
                             f'{device.type}; use --device cpu')
    if device.type == 'cuda':  # NCCL binds this process's GPU now, not at a first guess
        dist.init_process_group('nccl', device_id=device)
    else:
        dist.init_process_group('gloo')
    atexit.register(dist.destroy_process_group)
    return device


def check_divides(batch_size):
    """One-line error unless the processes split a training batch evenly."""
    if batch_size % world_size():
        raise util.UserError(f'--batch_size {batch_size} does not split evenly over the '
                             f'{world_size()} processes torchrun started; use a multiple of '
                             f'{world_size()} or another --nproc_per_node')


@contextlib.contextmanager
def local_main_first():
    """Runs the block in each machine's first process (LOCAL_RANK 0) before the others, so that
    one process per machine downloads and caches the data and the others read its cache. They
    wait on a CPU group of their own, for up to DATA_TIMEOUT (a download can outlast NCCL's
    default timeout). If the first fails, torchrun stops the ones waiting."""
    if not launched():
        yield
        return
    first = int(os.environ['LOCAL_RANK']) == 0
    group = dist.new_group(backend='gloo', timeout=DATA_TIMEOUT)
    if not first:
        dist.barrier(group=group)
    yield
    if first:
        dist.barrier(group=group)


def share(items, start=0):
    """This process's items of a sequence (a batch of tasks, or a tensor of images): item i,
    counting from start, belongs to process i % P.

    Args:
        items: a sampling.TaskBatch (its share is one too, of its tensors' slices), a list, or
            a tensor whose first dimension indexes the items
        start (int): the index of items[0] in the whole sequence (an evaluation pass)
    """
    return items[(rank() - start) % world_size()::world_size()]


def gather(value):
    """Every process's value (any picklable object), in rank order; [value] without torchrun."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def largest(value):
    """The largest of the processes' values of a Python int; value itself without torchrun.

    Training asks this after every step (has any process had a stop signal, and which?), so
    it runs on the host: a MAX all_reduce of one CPU integer over gloo, the training group on
    the CPU, a gloo group of its own under NCCL. The processes' host threads meet once per step
    (tens of microseconds on one machine) but never wait for a GPU, whereas a flag carried in
    average_gradients' device buffer would have to be read back from the device every step."""
    if world_size() == 1:
        return value
    value = torch.tensor([value])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group())
    return int(value)


@functools.cache
def _host_group():
    """The process group for host-side collectives: the default one when it is gloo (every
    process calls this first at the same point, as new_group needs)."""
    return None if dist.get_backend() == 'gloo' else dist.new_group(backend='gloo')


def interleave(shares):
    """Undoes `share`: the processes' arrays, in rank order, as one array of every item in the
    order of the whole sequence.

    Args:
        shares (list of np.ndarray): process r's items r, r + P, r + 2P, ... along the first
            axis; processes without items (the last ones, when P exceeds the items) left out
    """
    items = np.concatenate(shares)
    positions = np.concatenate([np.arange(r, len(items), world_size())
                                for r in range(len(shares))])
    ordered = np.empty_like(items)
    ordered[positions] = items
    return ordered


def average_gradients(parameters, values):
    """Replaces each gradient by its mean over the processes; returns the mean of values.

    One all_reduce of one flat buffer holding every gradient and the values; nothing waits
    for the device (the caller reads the result when it needs it). Not
    DistributedDataParallel: it wraps an nn.Module and hooks its forward and backward, but
    MAML's weights are a dict of tensors used through functional calls and differentiated
    through in its inner loop, and the transfer baseline's too; one explicit reduction after
    backward serves every learner the same way. (DDP's overlap of communication with backward
    matters little for networks this small.)

    Args:
        parameters (iterable of Tensor): the optimizer's parameters; those without a gradient
            (not trained) are skipped, the same ones in every process
        values (Tensor): 1-d, this process's mean loss and metrics over its equal share of
            the batch (their means over the processes are the whole batch's)
    """
    if world_size() == 1:
        return values
    gradients = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.flatten() for g in gradients] + [values.to(gradients[0].dtype)])
    dist.all_reduce(flat)
    flat /= world_size()
    *means, mean_values = flat.split([g.numel() for g in gradients] + [len(values)])
    for gradient, mean in zip(gradients, means):
        gradient.copy_(mean.view_as(gradient))
    return mean_values.to(values.dtype)


class NullWriter:
    """What the processes other than rank 0 log to: a SummaryWriter that writes nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

"""What a training step asks of a GPU, watched on the CPU: every learner's step, loop and
batched, under a TorchDispatchMode that records each operation that would make the host wait
for the device (a scalar read: `.item()`, `float()`, `bool()` of a tensor; an operation whose
output size depends on the data, such as `unique` or `nonzero`; a copy to the host through
`.cpu()`, `.numpy()` or `.tolist()`) and each float64 result, with the CPU taken for a device
without float64 (as Apple's MPS).

A step between log steps must make no such wait: the counts of two runs of the same script,
3 and 5 iterations long, are equal (steps 3 and 4 are not log steps; everything else the runs
do, step 0's log, validation and checkpoint, the final read, is the same in both). The task
loaders (host-side sampling with CPU generators) and the optimizer's step (Adam reads its step
count, a CPU tensor, on the host) are not watched. No float64 result anywhere in a run.
"""
import contextlib
from collections import Counter

import numpy as np
import pytest
import torch
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import layers
import maml
import maml_transfer
import metabolism
import omniglot
import protonet
import run_metabolism
import sampling
import training

# Operations whose result the host must wait for: a scalar, or a data-dependent size.
WAITS = {'_local_scalar_dense', 'nonzero', '_unique', '_unique2', 'unique_dim',
         'unique_consecutive', 'masked_select', 'equal', 'is_nonzero'}
HOST_COPIES = ('cpu', 'numpy', 'tolist')


class DevicePath(TorchDispatchMode):
    """Counts, while watching, the waits (WAITS and HOST_COPIES) and the float64 results."""

    def __init__(self):
        super().__init__()
        self.waits, self.float64 = Counter(), Counter()
        self.watching = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.watching:
            name = func.overloadpacket.__name__
            if name in WAITS:
                self.waits[name] += 1
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64
                   for t in tree_leaves(out)):
                self.float64[name] += 1
        return out

    @contextlib.contextmanager
    def paused(self):
        watching, self.watching = self.watching, False
        try:
            yield
        finally:
            self.watching = watching


@contextlib.contextmanager
def watched():
    """A DevicePath on for the block, off in the task loaders and the optimizer's step."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from watching(DevicePath(), monkeypatch)


def watching(recorder, monkeypatch):
    monkeypatch.setattr(layers, 'DEVICES_WITHOUT_FLOAT64', ('cpu',))
    for method in HOST_COPIES:
        def recording(self, *args, _original=getattr(torch.Tensor, method), _name=method,
                      **kwargs):
            if recorder.watching:
                recorder.waits[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, recording)
    iterate = sampling.TaskLoader.__iter__

    def unwatched_batches(loader):
        batches = iterate(loader)
        while True:
            with recorder.paused():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch
    monkeypatch.setattr(sampling.TaskLoader, '__iter__', unwatched_batches)
    hooks = [register_optimizer_step_pre_hook(lambda *_: setattr(recorder, 'watching', False)),
             register_optimizer_step_post_hook(lambda *_: setattr(recorder, 'watching', True))]
    try:
        with recorder:
            yield recorder
    finally:
        for hook in hooks:
            hook.remove()


OMNIGLOT = ['--num_way', '3', '--num_support', '1', '--num_query', '2', '--batch_size', '2']
LEARNERS = {
    'protonet': (protonet, OMNIGLOT),
    'protonet batched': (protonet, OMNIGLOT + ['--tasks', 'batched']),
    'maml': (maml, OMNIGLOT),
    'maml batched': (maml, OMNIGLOT + ['--tasks', 'batched']),
    'maml learned lrs': (maml, OMNIGLOT + ['--learn_inner_lrs']),
    'maml first order': (maml, OMNIGLOT + ['--first_order', '--tasks', 'batched']),
    'maml++': (maml, OMNIGLOT + ['--mamlpp', '--num_inner_steps', '2']),
    'maml++ batched': (maml, OMNIGLOT + ['--mamlpp', '--num_inner_steps', '2',
                                          '--tasks', 'batched']),
    'transfer': (maml_transfer, ['--num_way', '3', '--num_support', '1', '--num_query', '2',
                                 '--batch_size', '4', '--adapt_steps', '3']),
    'metabolism': (run_metabolism, ['--num_support', '2', '--num_query', '3',
                                    '--batch_size', '2']),
    'metabolism batched': (run_metabolism, ['--num_support', '2', '--num_query', '3',
                                            '--batch_size', '2', '--tasks', 'batched']),
}


def run(module, flags, iterations, log_dir):
    """The script's main for iterations steps; returns its DevicePath."""
    args = module.parse_args(flags + ['--num_train_iterations', str(iterations),
                                      '--log_dir', str(log_dir)])
    with watched() as recorder:
        module.main(args)
    return recorder


@pytest.mark.parametrize('name', LEARNERS)
def test_a_step_between_log_steps_makes_the_host_wait_for_nothing(name, tmp_path, monkeypatch,
                                                                  one_thread, request):
    module, flags = LEARNERS[name]
    if module is run_metabolism:
        flags = flags + ['--datadir', str(request.getfixturevalue('built')[0])]
        monkeypatch.setattr(run_metabolism, 'NUM_VAL_TASKS', 8)
    monkeypatch.setattr(training, 'LOG_INTERVAL', 1000)
    monkeypatch.setattr(training, 'SAVE_INTERVAL', 1000)
    monkeypatch.setattr(training, 'VAL_INTERVAL', 1000)
    short = run(module, flags, 3, tmp_path / 'short')
    long = run(module, flags, 5, tmp_path / 'long')
    assert long.waits == short.waits, f'two more steps waited for {long.waits - short.waits}'
    assert short.waits, 'the log step, validation and final read must have been seen'
    assert not long.float64, f'float64 results on a device without float64: {long.float64}'


class HostCopies(TorchDispatchMode):
    """Records each copy to another device as (device type, non_blocking)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ == '_to_copy' and 'device' in kwargs:
            self.copies.append((kwargs['device'].type, kwargs.get('non_blocking', False)))
        return func(*args, **kwargs)


def test_samplers_copy_host_temporaries_without_waiting_only_on_cuda():
    """A sampler's rows are a temporary on the host: a non-blocking copy of it to MPS may read
    freed memory. On a device that is not CUDA (the meta device here, shapes only) every copy
    the samplers make completes before the temporary can go."""
    meta = torch.device('meta')
    images = torch.zeros(omniglot.NUM_CLASSES, omniglot.NUM_SAMPLES_PER_CLASS, 28, 28,
                         dtype=torch.uint8, device=meta)
    generator = torch.Generator().manual_seed(0)
    labels = [torch.tensor([0, 1] * 10), torch.tensor([1, 0] * 10)]
    datasets = {
        'omniglot tasks': (omniglot.OmniglotDataset(1, 2, images, generator),
                           torch.tensor([[0, 1, 2], [3, 4, 5]])),
        'omniglot images': (omniglot.ClassifierImages(images, np.arange(10)),
                            torch.tensor([0, 21, 42])),
        'metabolism': (metabolism.MetabolismDataset(
            [torch.zeros(20, 1024, device=meta)] * 2, labels, 2, 3, generator),
            torch.tensor([0, 1])),
    }
    for name, (dataset, idxs) in datasets.items():
        with HostCopies() as recorder:
            dataset.make_tasks(idxs)
        to_device = [blocking for device, blocking in recorder.copies if device == 'meta']
        assert to_device and not any(to_device), (name, recorder.copies)

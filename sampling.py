"""Task sampling shared by the data sets (Omniglot, TDC Metabolism): seeded generators and the
loader that batches tasks.

The contract, which omniglot.py and metabolism.py both follow:
- A dataset has `make_tasks(idxs)`: idxs is an int64 tensor with one row per task (Omniglot: the
  task's class indices, shape (num_tasks, num_way); Metabolism: the task's data set index,
  shape (num_tasks,)); it returns a TaskBatch of num_tasks tasks (support inputs, support
  labels, query inputs, query labels), class-major, labels 0..num_way-1. (Pre-training images
  for the transfer baseline, omniglot.ClassifierImages, are one task per batch: idxs are
  images, and the list holds one (images, labels) tuple.)
- A sampler has `sample(num_tasks)`: the idxs of num_tasks fresh tasks.
- Both draw from one torch.Generator per (seed, split), so a TaskLoader's state (the
  generator's) is all a checkpoint needs to draw the same tasks again after a resume.
- A task source is what the one main body (training.main) asks of a data set:
  `prepare()` fetches and caches it and returns the line `--cache` prints, and
  `loader(split, batch_size, num_tasks, device)` returns a TaskLoader of that split's tasks.
"""
from collections.abc import Sequence

import numpy as np
import torch

SPLIT_NUMBERS = {'train': 0, 'val': 1, 'test': 2}


def split_generator(seed, split):
    """An independent CPU generator for each (seed, split): same seed, same tasks, any device."""
    state = np.random.SeedSequence([seed, SPLIT_NUMBERS.get(split, 99)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def generator_from_torch_seed():
    """A CPU generator seeded from torch's global one: repeatable after torch.manual_seed."""
    return torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))


class UniformSampler:
    """Draws indices uniformly, with replacement, from range(num_items): the data set of each
    metabolism task, or the images of a pre-training batch."""

    def __init__(self, num_items, generator):
        self._num_items = num_items
        self._generator = generator

    def sample(self, num):
        """num int64 indices, shape (num,)."""
        return torch.randint(self._num_items, (num,), generator=self._generator)


class TaskBatch(Sequence):
    """A batch of tasks kept as four tensors, each with a leading task dimension, from the
    sampler to the step: support inputs (num_tasks, N*K, ...), support labels (num_tasks, N*K),
    query inputs (num_tasks, N*Q, ...), query labels (num_tasks, N*Q).

    To the assignment's code it is its list of task tuples: len, task i as a tuple, iteration.
    A slice (distributed.share) is a TaskBatch of the tensors' slices, and `stacked` hands the
    tensors themselves to a step: no task is split off and stacked again."""

    def __init__(self, *parts):
        self.parts = parts

    def __len__(self):
        return len(self.parts[0])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TaskBatch(*(part[index] for part in self.parts))
        return tuple(part[index] for part in self.parts)


def stacked(task_batch, device=None):
    """The parts of a batch of tasks as tensors with a leading task dimension, on device (where
    given): a TaskBatch's own tensors, or the assignment's list of task tuples stacked.

    Returns:
        list of 4 tensors: (num_tasks, N*K, ...), (num_tasks, N*K), (num_tasks, N*Q, ...),
        (num_tasks, N*Q)
    """
    parts = (task_batch.parts if isinstance(task_batch, TaskBatch) else
             [torch.stack(part) for part in zip(*task_batch)])
    return [part.to(device) for part in parts] if device is not None else list(parts)


class TaskLoader:
    """Batches of tasks: a batch is a TaskBatch of batch_size tasks (to the assignment's code,
    the list of task tuples its DataLoader with an identity collate gives).

    Args:
        dataset: has make_tasks(idxs), as above
        sampler: has sample(num_tasks), as above
        batch_size (int): tasks per batch
        num_batches (int): batches per pass
        generator (torch.Generator): the generator dataset and sampler draw from
    """

    def __init__(self, dataset, sampler, batch_size, num_batches, generator):
        self._dataset = dataset
        self._sampler = sampler
        self._batch_size = batch_size
        self._num_batches = num_batches
        self._generator = generator

    def __iter__(self):
        for _ in range(self._num_batches):
            yield self._dataset.make_tasks(self._sampler.sample(self._batch_size))

    def __len__(self):
        return self._num_batches

    def state_dict(self):
        return {'generator': self._generator.get_state()}

    def load_state_dict(self, state):
        self._generator.set_state(state['generator'].cpu())

"""Implementation of prototypical networks for Omniglot."""
import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import omniglot
import training
import util

NUM_INPUT_CHANNELS = 1
NUM_HIDDEN_CHANNELS = 64
KERNEL_SIZE = 3
NUM_CONV_LAYERS = 4


class TaskBatchNorm(nn.Module):
    """Batch norm that uses the statistics of each task separately (no running statistics).

    Equal to nn.BatchNorm in train mode applied to one task at a time, so that a batch of tasks
    can go through the network in one call without mixing their statistics.
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.eps = eps

    def forward(self, x):
        """x: (num_tasks, examples, channels, *spatial) -> same shape, normalised per task."""
        dims = (1, *range(3, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        shape = (-1,) + (1,) * (x.dim() - 3)
        scale = self.weight.view(shape) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.view(shape)


class ProtoNetNetwork(nn.Module):
    """Container for ProtoNet weights and image-to-latent computation.

    4 blocks of [conv 3x3 -> batch norm -> ReLU -> max pool 2]: 28 -> 14 -> 7 -> 3 -> 1.
    """

    def __init__(self):
        super().__init__()
        channels = [NUM_INPUT_CHANNELS] + [NUM_HIDDEN_CHANNELS] * NUM_CONV_LAYERS
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, KERNEL_SIZE, padding='same')
                                   for c_in, c_out in zip(channels, channels[1:]))
        self.norms = nn.ModuleList(TaskBatchNorm(c) for c in channels[1:])

    def forward(self, images):
        """Computes the latent representation of a batch of tasks' images.

        Args:
            images (Tensor): shape (num_tasks, examples, channels, height, width)

        Returns:
            a Tensor of shape (num_tasks, examples, latents)
        """
        num_tasks, examples = images.shape[:2]
        x = images.flatten(0, 1)
        for conv, norm in zip(self.convs, self.norms):
            x = norm(conv(x).unflatten(0, (num_tasks, examples))).flatten(0, 1)
            x = F.max_pool2d(F.relu(x), 2)
        return x.reshape(num_tasks, examples, -1)


def prototype_logits(latents_support, labels_support, latents_query, num_way):
    """Logits = minus squared Euclidean distances to the class prototypes (support means).

    Args:
        latents_support (Tensor): shape (num_tasks, num_way * num_support, latents)
        labels_support (Tensor): int64, shape (num_tasks, num_way * num_support)
        latents_query (Tensor): shape (num_tasks, examples, latents)
        num_way (int): number of classes per task

    Returns:
        logits of shape (num_tasks, examples, num_way)
    """
    one_hot = F.one_hot(labels_support, num_way).to(latents_support.dtype)
    prototypes = one_hot.transpose(1, 2) @ latents_support / one_hot.sum(1).unsqueeze(-1)
    return -(latents_query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)


def accuracy_per_task(logits, labels):
    """logits (num_tasks, examples, classes), labels (num_tasks, examples) -> numpy (num_tasks,)."""
    return (logits.argmax(-1) == labels).double().mean(-1).cpu().numpy()


class ProtoNet(training.MetaLearner):
    """Trains and assesses a prototypical network."""
    METRICS = {'loss': 'loss', 'support': 'support accuracy', 'query': 'query accuracy'}
    TEST_METRIC = 'query'

    def __init__(self, learning_rate, log_dir, device, compile=False, backend=None, learner=None,
                 val_interval=None, save_interval=None, bio=False):
        """Inits ProtoNet.

        Args:
            learning_rate (float): learning rate for the Adam optimizer
            log_dir (str): path to logging directory
            device (torch.device): device to train and test on
            compile (bool): whether to torch.compile the network
            backend (str): torch.compile backend
            learner (nn.Module): replaces the conv network; maps (num_tasks, examples, ...)
                to (num_tasks, examples, latents) with per-task batch statistics
            val_interval, save_interval (int): steps between validations / checkpoints
            bio (bool): molecule data: validation also reports its 95% interval
        """
        super().__init__(log_dir, device, val_interval, save_interval, val_ci95=bio)
        self._network = (learner or ProtoNetNetwork()).to(device)
        self.architecture = f'protonet/{type(self._network).__name__}'
        self._forward = (torch.compile(self._network, backend=backend or 'inductor')
                         if compile else self._network)
        self._optimizer = torch.optim.Adam(self._network.parameters(), lr=learning_rate)

    def _evaluate(self, task_batch, train):
        images_support, labels_support, images_query, labels_query = (
            torch.stack(part).to(self._device) for part in zip(*task_batch))
        num_way = len(labels_support[0].unique())
        with torch.set_grad_enabled(train):
            latents_support = self._forward(images_support)
            latents_query = self._forward(images_query)
            logits_support = prototype_logits(latents_support, labels_support, latents_support,
                                              num_way)
            logits_query = prototype_logits(latents_support, labels_support, latents_query,
                                            num_way)
            loss = F.cross_entropy(logits_query.flatten(0, 1), labels_query.flatten())
        return loss, {'support': accuracy_per_task(logits_support, labels_support),
                      'query': accuracy_per_task(logits_query, labels_query)}

    def _step(self, task_batch):
        """Computes ProtoNet mean loss (and accuracy) on a batch of tasks.

        Args:
            task_batch (list of tuple): each tuple is (images_support (N*K, 1, 28, 28),
                labels_support (N*K,), images_query (N*Q, 1, 28, 28), labels_query (N*Q,))

        Returns:
            a Tensor containing mean ProtoNet loss over the batch; shape ()
            mean support accuracy over the batch (numpy float64)
            mean query accuracy over the batch (numpy float64)
        """
        loss, metrics = self._evaluate(task_batch, train=torch.is_grad_enabled())
        return loss, np.mean(metrics['support']), np.mean(metrics['query'])

    def _checkpoint_state(self):
        return {'network_state_dict': self._network.state_dict(),
                'optimizer_state_dict': self._optimizer.state_dict()}

    def _load_checkpoint_state(self, state):
        self._network.load_state_dict(state['network_state_dict'])
        self._optimizer.load_state_dict(state['optimizer_state_dict'])


def default_log_dir(args, dataset='omniglot'):
    return (f'./logs/protonet/{dataset}.way_{args.num_way}.support_{args.num_support}'
            f'.query_{args.num_query}.lr_{args.learning_rate}.batch_size_{args.batch_size}')


def add_protonet_args(parser, num_train_iterations):
    training.add_common_args(parser, num_train_iterations)
    parser.add_argument('--learning_rate', type=float, default=0.001,
                        help='learning rate for the network')
    parser.add_argument('--compile', action='store_true', help='torch.compile the network')
    parser.add_argument('--backend', type=str, default='inductor',
                        choices=['inductor', 'aot_eager', 'cudagraphs'],
                        help='torch.compile backend')


def main(args):
    training.check_common_args(args)
    util.check_positive(learning_rate=args.learning_rate)
    device = util.get_device(args.device)
    if args.cache:
        omniglot.prepare()
        print(f'Omniglot is ready in {omniglot.DATA_DIR}.')
        return
    log_dir = args.log_dir or default_log_dir(args)
    print(f'log_dir: {log_dir}')
    util.seed_everything(args.seed)
    protonet = ProtoNet(args.learning_rate, log_dir, device, args.compile, args.backend)

    def get_dataloader(split, batch_size, num_tasks):
        return omniglot.get_omniglot_dataloader(split, batch_size, args.num_way, args.num_support,
                                                args.num_query, num_tasks, seed=args.seed,
                                                device=device)

    training.run(args, protonet, get_dataloader)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Train a ProtoNet!')
    add_protonet_args(parser, num_train_iterations=5000)
    util.cli(lambda: main(parser.parse_args()))

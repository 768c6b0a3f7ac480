"""Implementation of prototypical networks for Omniglot."""

import torch
import torch.nn.functional as F
from torch import nn

import layers
import omniglot
import sampling
import training
import util

NUM_INPUT_CHANNELS = 1
NUM_HIDDEN_CHANNELS = 64
KERNEL_SIZE = 3
NUM_CONV_LAYERS = 4


class ProtoNetNetwork(nn.Module):
    """Container for ProtoNet weights and image-to-latent computation.

    4 blocks of [conv 3x3 -> batch norm -> ReLU -> max pool 2]: 28 -> 14 -> 7 -> 3 -> 1.
    A function of one task's images, so batch norm uses that task's statistics; ProtoNet runs
    it on a batch's tasks one at a time or all at once (training.per_task).
    """

    def __init__(self):
        super().__init__()
        channels = [NUM_INPUT_CHANNELS] + [NUM_HIDDEN_CHANNELS] * NUM_CONV_LAYERS
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, KERNEL_SIZE, padding='same')
                                   for c_in, c_out in zip(channels, channels[1:]))
        self.norms = nn.ModuleList(layers.TaskBatchNorm(c) for c in channels[1:])

    def forward(self, images):
        """One task's images (examples, channels, height, width) -> latents (examples, 64).

        The first convolution and its batch norm are one matrix product (layers.py), whose
        output is channels_last, where CPU max pooling is fast; the later layers run in NCHW,
        where CPU batch norm sums accurately. Max pooling runs before the
        ReLU: both are monotone, so the values (and the gradient, max pooling's first index
        included) are the same as ReLU then pooling, for a quarter of the ReLU's work.
        """
        (first_conv, first_norm), *rest = zip(self.convs, self.norms)
        x = layers.conv_batch_norm(images, first_conv.weight, first_conv.bias,
                                   first_norm.weight, first_norm.bias, first_norm.eps)
        x = F.relu(F.max_pool2d(x, 2))
        x = layers.hidden_layers_format(x)
        for conv, norm in rest:
            x = F.conv2d(*layers.autocast_inputs(x, conv.weight, conv.bias), padding='same')
            x = F.relu(F.max_pool2d(norm(x), 2))
        return x.flatten(1)


def prototype_logits(latents_support, labels_support, latents_query, num_way):
    """Logits = minus squared Euclidean distances to the class prototypes (support means).

    Args:
        latents_support (Tensor): shape (num_tasks, num_way * num_support, latents)
        labels_support (Tensor): int64, shape (num_tasks, num_way * num_support)
        latents_query (Tensor): shape (num_tasks, examples, latents)
        num_way (int): number of classes per task

    Returns:
        logits of shape (num_tasks, examples, num_way)

    Elementwise products and sums only, no matrix product: float32 latents stay float32 under
    bfloat16 autocast, whose 8-bit mantissa would round squared distances of ~100 by ~0.5.
    """
    ### START CODE HERE ###
    one_hot = layers.one_hot(labels_support, num_way, latents_support.dtype)
    sums = (one_hot.unsqueeze(-1) * latents_support.unsqueeze(2)).sum(1)
    prototypes = sums / one_hot.sum(1).unsqueeze(-1)
    return -(latents_query.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)
    ### END CODE HERE ###


class ProtoNet(training.MetaLearner):
    """Trains and assesses a prototypical network."""
    METRICS = {'loss': 'loss', 'support': 'support accuracy', 'query': 'query accuracy'}
    TEST_METRIC = 'query'

    def __init__(self, learning_rate, log_dir, device, compile=False, backend=None, learner=None,
                 val_interval=None, save_interval=None, bio=False, amp='none', tasks='loop',
                 num_way=None):
        """Inits ProtoNet.

        Args:
            learning_rate (float): learning rate for the Adam optimizer
            log_dir (str): path to logging directory
            device (torch.device): device to train and test on
            compile (bool): whether to torch.compile the network
            backend (str): torch.compile backend
            learner (nn.Module): replaces the conv network; maps one task's inputs
                (examples, ...) to latents (examples, latents)
            val_interval, save_interval (int): steps between validations / checkpoints
            bio (bool): the assignment's name (run_metabolism.py passes it) for: validation
                also reports the 95% interval of its query accuracy (RunSettings.val_ci95)
            amp (str): 'bf16' for bfloat16 autocast (--amp), 'none' for float32
            tasks (str): 'loop', 'batched' or 'auto' (--tasks; training.batched_tasks)
            num_way (int): classes per task; None: counted in each batch's labels, which makes
                the host wait for the device once per batch
        """
        super().__init__(log_dir, device, training.RunSettings(val_interval, save_interval,
                                                               val_ci95=bio, amp=amp, tasks=tasks))
        self._num_way = num_way
        self._network = (learner or ProtoNetNetwork()).to(device)
        self.architecture = f'protonet/{type(self._network).__name__}'
        self._forward = training.per_task(self._network, self._batched)
        if compile:
            self._forward = torch.compile(self._forward, backend=backend or 'inductor')
        self._optimizer = torch.optim.Adam(self._network.parameters(), lr=learning_rate)

    def _step(self, task_batch, per_task=False):
        """Computes ProtoNet mean loss (and accuracy) on a batch of tasks.

        Per task: the support and the query images are embedded in separate passes (each its
        own batch statistics); the prototypes are the per-class means of the support latents;
        the logits of a latent are minus its squared Euclidean distances to them; the loss is
        the cross-entropy of the query logits, and the support is scored against the same
        prototypes. The tasks run one at a time or all at once (--tasks, training.per_task).

        Args:
            task_batch (list of tuple): each tuple is (images_support (N*K, 1, 28, 28),
                labels_support (N*K,), images_query (N*Q, 1, 28, 28), labels_query (N*Q,));
                or a sampling.TaskBatch, the same as tensors of all the tasks
            per_task (bool): return each task's accuracies as tensors of shape (num_tasks,)
                on the device, {'support': ..., 'query': ...}, as the training loop reads them
                (_evaluate: the host does not wait for the device), instead of their means

        Returns:
            a Tensor containing mean ProtoNet loss over the batch; shape ()
            mean support accuracy over the batch (numpy float64)
            mean query accuracy over the batch (numpy float64)
        """
        images_support, labels_support, images_query, labels_query = sampling.stacked(
            task_batch, self._device)
        num_way = self._num_way or len(labels_support[0].unique())
        ### START CODE HERE ###
        latents_support = layers.at_least_float32(self._forward(images_support))
        latents_query = layers.at_least_float32(self._forward(images_query))
        logits_support = prototype_logits(latents_support, labels_support, latents_support,
                                          num_way)
        logits_query = prototype_logits(latents_support, labels_support, latents_query, num_way)
        loss = F.cross_entropy(logits_query.flatten(0, 1), labels_query.flatten())
        ### END CODE HERE ###
        accuracies = {'support': util.accuracy_per_task(logits_support, labels_support),
                      'query': util.accuracy_per_task(logits_query, labels_query)}
        if per_task:
            return loss, accuracies
        return loss, *(util.to_host(accuracies[key]).mean() for key in ('support', 'query'))

    def _evaluate(self, task_batch, train):
        """The training loop's call: _step's loss and per-task accuracies, with gradients only
        when train."""
        with torch.set_grad_enabled(train):
            return self._step(task_batch, per_task=True)

    def _checkpoint_state(self):
        return {'network_state_dict': self._network.state_dict(),
                'optimizer_state_dict': self._optimizer.state_dict()}

    def _load_checkpoint_state(self, state):
        self._network.load_state_dict(state['network_state_dict'])
        self._optimizer.load_state_dict(state['optimizer_state_dict'])


def default_log_dir(args, dataset='omniglot'):
    return training.default_log_dir('protonet', dataset, args, training.TASK_FIELDS + (
        ('lr', 'learning_rate'), ('batch_size', 'batch_size')))


def add_protonet_args(parser, num_train_iterations):
    training.add_common_args(parser, num_train_iterations)
    training.add_tasks_arg(parser)
    parser.add_argument('--learning_rate', type=float, default=0.001,
                        help='learning rate for the network')
    parser.add_argument('--compile', action='store_true', help='torch.compile the network')
    parser.add_argument('--backend', type=str, default='inductor',
                        choices=['inductor', 'aot_eager', 'cudagraphs'],
                        help='torch.compile backend')


def main(args):
    training.check_common_args(args)
    training.check_tasks(args.tasks)
    util.check_positive(learning_rate=args.learning_rate)
    training.main(args, omniglot.OmniglotTasks(args.num_way, args.num_support, args.num_query,
                                               args.seed),
                  lambda log_dir, device: ProtoNet(args.learning_rate, log_dir, device,
                                                   args.compile, args.backend, amp=args.amp,
                                                   tasks=args.tasks, num_way=args.num_way),
                  default_log_dir(args))


def parse_args(argv=None):
    parser = util.argument_parser('Train a ProtoNet!')
    add_protonet_args(parser, num_train_iterations=5000)
    return parser.parse_args(argv)


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))

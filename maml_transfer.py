"""Transfer learning vs meta-learning (the second handout): pre-train maml.py's convolutional
network as an ordinary classifier on all 1100 meta-train characters; then, for each few-shot
task, freeze its convolutional layers, replace its classifier by a new num_way-way linear layer,
fit that layer on the support set with a few gradient steps, and score the query set.

Pre-training runs on the shared loop of training.py: a training batch is batch_size images of
the meta-train characters (one 1100-way task, omniglot.ClassifierImages); validation and
`--test` are few-shot tasks of the val and test characters, adapted by `transfer_learn`.
"""
import functools

import torch
import torch.nn.functional as F

import distributed
import layers
import maml
import omniglot
import training
import util

NUM_CLASSES = omniglot.NUM_TRAIN_CLASSES


def transfer_learn(parameters, task_batch, num_steps, learning_rate, batched=False):
    """Fits a new linear classifier on the frozen convolutional layers to each task's support
    set with num_steps steps of gradient descent from zero, and scores its query set; all the
    batch's tasks at once.

    A step's gradient of the mean cross-entropy is written out (softmax minus one-hot, over
    the number of examples), so that one step is two batched matrix products for every task
    together, where a task at a time with autograd launches several small kernels per step
    and task (reference.transfer_learn; benchmarks/README.md measures both).

    Args:
        parameters (dict[str, Tensor]): pre-trained weights, keys as maml.init_parameters;
            only the convolutional ones are used, and they receive no gradient
        task_batch (list of tuple): each (images_support (N*K, 1, 28, 28), labels_support
            (N*K,), images_query (N*Q, 1, 28, 28), labels_query (N*Q,)), labels 0..N-1
        num_steps (int): gradient steps on the support loss
        learning_rate (float): their step size
        batched (bool): embed the tasks all at once (torch.func.vmap) or one at a time, each
            with its own batch statistics (training.per_task)

    Returns:
        query losses, support accuracies and query accuracies after adaptation, each a tensor
        of shape (num_tasks,)
    """
    ### START CODE HERE ###
    images_support, labels_support, images_query, labels_query = (
        torch.stack(part) for part in zip(*task_batch))
    parameters = {key: value.detach() for key, value in parameters.items()}
    embed = training.per_task(functools.partial(maml.embed, parameters), batched)
    with torch.no_grad():
        inputs_support = with_ones(layers.at_least_float32(embed(images_support)))
        inputs_query = with_ones(layers.at_least_float32(embed(images_query)))
        num_way = int(labels_support.max()) + 1
        targets = layers.one_hot(labels_support, num_way, inputs_support.dtype)
        # [weight | bias] of each task's classifier, shape (num_tasks, num_way, features + 1)
        head = inputs_support.new_zeros(len(task_batch), num_way, inputs_support.shape[-1])
        step_size = learning_rate / targets.shape[1]  # the loss is a mean over the examples
        for _ in range(num_steps):
            probabilities = (inputs_support @ head.mT).softmax(-1)
            head = head - step_size * (probabilities - targets).mT @ inputs_support
        logits_query = inputs_query @ head.mT
        losses = F.cross_entropy(logits_query.flatten(0, 1), labels_query.flatten(),
                                 reduction='none').view(labels_query.shape).mean(1)
        return (losses, util.accuracy_per_task(inputs_support @ head.mT, labels_support),
                util.accuracy_per_task(logits_query, labels_query))
    ### END CODE HERE ###


def with_ones(features):
    """features (num_tasks, examples, features) with a last column of ones (for the bias)."""
    return torch.cat([features, torch.ones_like(features[..., :1])], -1)


class TransferLearner(training.MetaLearner):
    """Pre-trains the network of maml.py as a classifier; adapts it by transfer_learn."""
    TRAIN_METRICS = {'loss': 'loss', 'accuracy': 'classification accuracy'}
    METRICS = {'loss': 'loss',
               'post_adapt_support': 'post-adaptation support accuracy',
               'post_adapt_query': 'post-adaptation query accuracy'}
    TEST_METRIC = 'post_adapt_query'
    architecture = (f'transfer/conv{maml.NUM_CONV_LAYERS}x{maml.NUM_HIDDEN_CHANNELS}'
                    f'/{NUM_CLASSES}-way')

    def __init__(self, learning_rate, adapt_steps, adapt_lr, log_dir, device,
                 settings=training.RunSettings()):
        """
        Args:
            learning_rate (float): Adam's learning rate for pre-training
            adapt_steps (int): gradient steps fitting a task's new linear layer
            adapt_lr (float): their step size
            log_dir, device, settings: as training.MetaLearner takes them (settings.tasks
                decides how transfer_learn embeds an evaluation batch's tasks)
        """
        super().__init__(log_dir, device, settings)
        self._parameters = {key: value.to(device).requires_grad_()
                            for key, value in maml.init_parameters(NUM_CLASSES).items()}
        self._adapt_steps = adapt_steps
        self._adapt_lr = adapt_lr
        self._optimizer = torch.optim.Adam(self._parameters.values(), lr=learning_rate)

    def _share(self, task_batch):
        """This process's images of a pre-training batch [(images, labels)] (distributed.share).
        Batch norm then uses the statistics of each process's batch_size / P images, as
        DistributedDataParallel does without SyncBatchNorm: with P processes pre-training is
        not the same as with one, where validation and --test are."""
        (images, labels), = task_batch
        return [(distributed.share(images), distributed.share(labels))]

    def _evaluate(self, task_batch, train):
        """Training: task_batch is [(images (B, 1, 28, 28), labels (B,))] of the meta-train
        characters, and the loss is the 1100-way cross-entropy. Evaluation: few-shot task
        tuples, each adapted by transfer_learn. Returns (loss, {metric: per-task array})."""
        if train:
            (images, labels), = task_batch
            images, labels = images.to(self._device), labels.to(self._device)
            logits = maml.forward(self._parameters, images)
            return (F.cross_entropy(logits, labels),
                    {'accuracy': util.accuracy_per_task(logits[None], labels[None])})
        task_batch = [[part.to(self._device) for part in task] for task in task_batch]
        losses, support, query = transfer_learn(self._parameters, task_batch, self._adapt_steps,
                                                self._adapt_lr, self._batched)
        return losses.mean(), {'post_adapt_support': support, 'post_adapt_query': query}

    def _checkpoint_state(self):
        return {'parameters': {key: value.detach() for key, value in self._parameters.items()},
                'optimizer_state_dict': self._optimizer.state_dict()}

    def _load_checkpoint_state(self, state):
        util.copy_into(self._parameters, state['parameters'])
        self._optimizer.load_state_dict(state['optimizer_state_dict'])


class PretrainingTasks(omniglot.OmniglotTasks):
    """Omniglot for transfer learning: training batches are images of the meta-train
    characters; validation and test batches are few-shot tasks, as for the meta-learners."""

    def loader(self, split, batch_size, num_tasks, device):
        if split != 'train':
            return super().loader(split, batch_size, num_tasks, device)
        return omniglot.get_image_dataloader(split, batch_size, num_tasks, self._seed, device)


def default_log_dir(args):
    return training.default_log_dir('transfer', 'omniglot', args, training.TASK_FIELDS + (
        ('lr', 'learning_rate'), ('batch_size', 'batch_size'), ('adapt_steps', 'adapt_steps'),
        ('adapt_lr', 'adapt_lr')))


def parse_args(argv=None):
    parser = util.argument_parser('Pre-train a classifier and transfer it to few-shot tasks!')
    training.add_common_args(parser, num_train_iterations=5000,
                             batch='images per pre-training step (validation draws 4 times as '
                                   'many tasks)', iteration='pre-training step')
    parser.set_defaults(num_support=5, batch_size=64)  # the handout: 5-way 5-shot
    parser.add_argument('--learning_rate', type=float, default=0.001,
                        help='pre-training learning rate (Adam)')
    parser.add_argument('--adapt_steps', type=int, default=100,
                        help="gradient steps fitting a task's new linear layer on its support "
                             'set (chosen on validation tasks: 20 steps fit it less well)')
    parser.add_argument('--adapt_lr', type=float, default=2.0,
                        help='step size of those gradient steps (chosen among 0.5, 2 and 8 on '
                             'validation tasks)')
    return parser.parse_args(argv)


def main(args):
    training.check_common_args(args)
    util.check_positive(learning_rate=args.learning_rate, adapt_lr=args.adapt_lr)
    if args.adapt_steps < 0:
        raise util.UserError(f'--adapt_steps must be 0 or more, got {args.adapt_steps}')
    training.main(args, PretrainingTasks(args.num_way, args.num_support, args.num_query,
                                         args.seed),
                  lambda log_dir, device: TransferLearner(args.learning_rate, args.adapt_steps,
                                                          args.adapt_lr, log_dir, device,
                                                          training.RunSettings(amp=args.amp)),
                  default_log_dir(args))


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))

"""Transfer learning vs meta-learning (the second handout): pre-train maml.py's convolutional
network as an ordinary classifier on all 1100 meta-train characters; then, for each few-shot
task, freeze its convolutional layers, replace its classifier by a new num_way-way linear layer,
fit that layer on the support set with a few gradient steps, and score the query set.

Pre-training runs on the shared loop of training.py: a training batch is batch_size images of
the meta-train characters (one 1100-way task, omniglot.ClassifierImages); validation and
`--test` are few-shot tasks of the val and test characters, adapted by `transfer_learn`.
"""

import torch
import torch.nn.functional as F

import distributed
import layers
import maml
import omniglot
import sampling
import training
import util

NUM_CLASSES = omniglot.NUM_TRAIN_CLASSES


def transfer_learn(parameters, task_batch, num_way, num_steps, learning_rate, batched=False):
    """The transfer baseline on each task of a batch: a new num_way-way linear layer on the
    pre-trained network's frozen convolutional features, adapted to the task's support set by
    num_steps steps of gradient descent from zero, then validated on its query set.

    Args:
        parameters (dict[str, Tensor]): pre-trained weights, keys as maml.init_parameters;
            only the convolutional ones are used, and they receive no gradient
        task_batch (list of tuple): each (images_support (N*K, 1, 28, 28), labels_support
            (N*K,), images_query (N*Q, 1, 28, 28), labels_query (N*Q,)), labels 0..N-1; or a
            sampling.TaskBatch, the same as tensors of all the tasks
        num_way (int): N, the classes of a task (given, not read from the labels: reading
            them would make the host wait for the device)
        num_steps (int): gradient steps on the support loss
        learning_rate (float): their step size
        batched (bool): embed the tasks all at once (torch.func.vmap) or one at a time, each
            with its own batch statistics (training.per_task)

    Returns:
        query losses, support accuracies and query accuracies after adaptation, each a tensor
        of shape (num_tasks,)
    """
    images_support, labels_support, images_query, labels_query = sampling.stacked(task_batch)
    ### START CODE HERE ###
    features = frozen_features(parameters, batched)
    with torch.no_grad():
        features_support, features_query = features(images_support), features(images_query)
        # the new layer of each task, [weight | bias]: (num_tasks, num_way, features + 1)
        layer = features_support.new_zeros(len(task_batch), num_way, features_support.shape[-1])
        targets = layers.one_hot(labels_support, num_way, features_support.dtype)
        for _ in range(num_steps):  # adapt it to the support set
            layer = gradient_step(layer, features_support, targets, learning_rate)
        logits_query = features_query @ layer.mT  # validate it on the query set
        losses = F.cross_entropy(logits_query.flatten(0, 1), labels_query.flatten(),
                                 reduction='none').view(labels_query.shape).mean(1)
        return (losses, util.accuracy_per_task(features_support @ layer.mT, labels_support),
                util.accuracy_per_task(logits_query, labels_query))
    ### END CODE HERE ###


def frozen_features(parameters, batched):
    """The pre-trained network without its classifier, its weights detached (frozen).

    Returns:
        a function of a batch of tasks' images (num_tasks, examples, 1, 28, 28) -> features
        (num_tasks, examples, 33): maml.embed's 32 and a last column of ones, the input of
        the new layer's bias
    """
    parameters = {key: value.detach() for key, value in parameters.items()}
    embed = training.per_task(lambda images: maml.embed(images, parameters), batched)

    def features(images):
        latents = layers.at_least_float32(embed(images))
        return torch.cat([latents, torch.ones_like(latents[..., :1])], -1)
    return features


def gradient_step(layer, features, targets, learning_rate):
    """One step of gradient descent on each task's mean cross-entropy of a linear layer.

    The gradient is written out, (softmax - one-hot)^T features / examples, so that a step is
    two batched matrix products for every task together, where autograd a task at a time
    launches several small kernels per step and task (reference.transfer_learn, the same
    numbers; benchmarks/README.md measures both).

    Args:
        layer (Tensor): [weight | bias] of each task, shape (num_tasks, num_way, features + 1)
        features (Tensor): inputs with a column of ones, shape (num_tasks, examples,
            features + 1)
        targets (Tensor): one-hot labels, shape (num_tasks, examples, num_way)
        learning_rate (float): the step size

    Returns:
        the layer after the step, shape as layer
    """
    probabilities = (features @ layer.mT).softmax(-1)
    return layer - learning_rate / targets.shape[1] * (probabilities - targets).mT @ features


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
                 settings=training.RunSettings(), *, num_way):
        """
        Args:
            learning_rate (float): Adam's learning rate for pre-training
            adapt_steps (int): gradient steps fitting a task's new linear layer
            adapt_lr (float): their step size
            num_way (int): classes of a validation or test task, the new layer's outputs
            log_dir, device, settings: as training.MetaLearner takes them (settings.tasks
                decides how transfer_learn embeds an evaluation batch's tasks)
        """
        super().__init__(log_dir, device, settings)
        self._parameters = {key: value.to(device).requires_grad_()
                            for key, value in maml.init_parameters(NUM_CLASSES).items()}
        self._adapt_steps = adapt_steps
        self._adapt_lr = adapt_lr
        self._num_way = num_way
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
            logits = maml.forward(images, self._parameters)
            return (F.cross_entropy(logits, labels),
                    {'accuracy': util.accuracy_per_task(logits[None], labels[None])})
        task_batch = sampling.TaskBatch(*sampling.stacked(task_batch, self._device))
        losses, support, query = transfer_learn(self._parameters, task_batch, self._num_way,
                                                self._adapt_steps, self._adapt_lr, self._batched)
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
                                                          training.RunSettings(amp=args.amp),
                                                          num_way=args.num_way),
                  default_log_dir(args))


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))

"""Implementation of model-agnostic meta-learning (MAML) for Omniglot.

The MAML class is the assignment's: training, validation and --test run `_outer_step` on each
batch, which runs `_inner_loop` on each task, which runs `_forward`. The inner loop takes its
gradients with torch.func.grad, so that with --tasks batched torch.func.vmap maps the same
per-task code over the batch (as in the torch.func MAML example).

First-order MAML (--first_order) differentiates phi = theta - alpha * g with the inner gradients
g treated as constants: the meta-gradient w.r.t. theta is then the query-loss gradient at the
adapted parameters (as in the second handout), and learned inner learning rates still get the
gradient of their own term, d phi^L / d alpha_k = -(sum over steps of g_k), as first-order
Meta-SGD does.

mamlpp.py extends this MAML with MAML++'s options; `python maml.py` takes its flags too.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

import layers
import omniglot
import sampling
import training
import util

NUM_INPUT_CHANNELS = 1
NUM_HIDDEN_CHANNELS = 32
KERNEL_SIZE = 3
NUM_CONV_LAYERS = 4
INNER_LR_TAG = 'inner_lrs'  # TensorBoard tags of learned inner lrs: inner_lrs/{key}


# ----- the math: pure functions of (parameters, data) -----
def init_parameters(num_outputs):
    """The network's initial weights, on the CPU (so a seed gives the same weights anywhere).

    Returns:
        dict in the order conv0, b0, ..., conv3, b3, w4, b4: conv{i} (32, in, 3, 3) Xavier-uniform
        with in = 1 for conv0 and 32 after, b{i} (32,) zeros, w4 (num_outputs, 32) Xavier-uniform,
        b4 (num_outputs,) zeros
    """
    parameters = {}
    in_channels = NUM_INPUT_CHANNELS
    for i in range(NUM_CONV_LAYERS):
        parameters[f'conv{i}'] = nn.init.xavier_uniform_(
            torch.empty(NUM_HIDDEN_CHANNELS, in_channels, KERNEL_SIZE, KERNEL_SIZE))
        parameters[f'b{i}'] = torch.zeros(NUM_HIDDEN_CHANNELS)
        in_channels = NUM_HIDDEN_CHANNELS
    parameters[f'w{NUM_CONV_LAYERS}'] = nn.init.xavier_uniform_(
        torch.empty(num_outputs, NUM_HIDDEN_CHANNELS))
    parameters[f'b{NUM_CONV_LAYERS}'] = torch.zeros(num_outputs)
    return parameters


def embed(images, parameters, norms=None):
    """The network up to its linear layer: 4x [conv 3x3 'same' -> batch norm (batch
    statistics) -> ReLU], then the mean over positions.

    Args:
        images (Tensor): shape (examples, 1, height, width); any height and width
        parameters (dict[str, Tensor]): network weights, keys and shapes as init_parameters
            (the linear layer's are not used)
        norms (dict[str, Tensor] or None): batch norm's weight 'gamma{i}' and bias 'beta{i}' of
            each layer i, shape (32,) (mamlpp.py learns them); None: no affine

    Returns:
        features, shape (examples, 32)
    """
    x = images
    for i in range(NUM_CONV_LAYERS):
        x = F.conv2d(*layers.autocast_inputs(x, parameters[f'conv{i}'], parameters[f'b{i}']),
                     stride=1, padding='same')
        weight, bias = (norms[f'gamma{i}'], norms[f'beta{i}']) if norms else (None, None)
        x = F.batch_norm(x, None, None, *layers.in_dtype_of(x, weight, bias), training=True)
        x = F.relu(x)
    return x.mean(dim=(2, 3))


def forward(images, parameters, norms=None):
    """Computes logits: embed's features, then the linear layer w4, b4.

    Args:
        images, parameters, norms: as embed takes them

    Returns:
        logits, shape (examples, num_outputs)
    """
    return F.linear(*layers.autocast_inputs(embed(images, parameters, norms),
                                            parameters[f'w{NUM_CONV_LAYERS}'],
                                            parameters[f'b{NUM_CONV_LAYERS}']))


def cross_entropy(logits, labels):
    """Cross-entropy of logits (examples, classes) against labels (examples,), a 0-dim Tensor:
    float32 under autocast, as autocast itself runs it (not reached under vmap)."""
    return F.cross_entropy(layers.at_least_float32(logits), labels)


class MAML(training.MetaLearner):
    """Trains and assesses a MAML."""
    METRICS = {'loss': 'loss',
               'pre_adapt_support': 'pre-adaptation support accuracy',
               'post_adapt_support': 'post-adaptation support accuracy',
               'post_adapt_query': 'post-adaptation query accuracy'}
    TEST_METRIC = 'post_adapt_query'

    def __init__(self, num_outputs, num_inner_steps, inner_lr, learn_inner_lrs, outer_lr,
                 log_dir, device, first_order=False, settings=training.RunSettings()):
        """Inits MAML.

        The network's weights are stored as a dict of leaf tensors, `_meta_parameters`, and the
        per-parameter inner learning rates as `_inner_lrs` (same keys, 0-dim). One Adam
        optimizer updates both (the learning rates only when learned).

        Args:
            num_outputs (int): dimensionality of output, i.e. number of classes in a task
            num_inner_steps (int): number of inner-loop optimization steps
            inner_lr (float): learning rate for inner-loop optimization
                If learn_inner_lrs=True, inner_lr serves as the initialization
                of the learning rates.
            learn_inner_lrs (bool): whether to learn the above
            outer_lr (float): learning rate for outer-loop optimization
            log_dir (str): path to logging directory
            device (str or torch.device): device to be used
            first_order (bool): first-order MAML: no gradient through the inner gradients
            settings (training.RunSettings): intervals, --amp and --tasks
        """
        super().__init__(log_dir, device, settings)
        self._meta_parameters = {key: value.to(device).requires_grad_()
                                 for key, value in init_parameters(num_outputs).items()}
        self._learn_inner_lrs = learn_inner_lrs
        self._inner_lrs = {key: torch.tensor(float(inner_lr), device=device,
                                             requires_grad=learn_inner_lrs)
                           for key in self._meta_parameters}
        self._num_inner_steps = num_inner_steps
        self._first_order = first_order
        self._optimizer = torch.optim.Adam(
            [*self._meta_parameters.values(), *self._inner_lrs.values()], lr=outer_lr)
        # Parameter shapes depend on num_outputs only: shots and inner steps may change at test.
        self.architecture = f'maml/conv{NUM_CONV_LAYERS}x{NUM_HIDDEN_CHANNELS}/{num_outputs}-way'

    def _forward(self, images, parameters, step=-1):
        """Computes logits of images with the given parameters.

        Args:
            images (Tensor): shape (num_images, 1, height, width)
            parameters (dict[str, Tensor]): network weights, as _meta_parameters
            step (int): the inner step the weights serve, -1 after the last (one network
                serves them all here; a subclass may keep per-step parameters)

        Returns:
            logits, shape (num_images, num_outputs)
        """
        return forward(images, parameters)

    def _inner_loop(self, images, labels, train, every_step=False):
        """Computes the adapted network parameters via the MAML inner loop: num_inner_steps
        steps p <- p - lr[key] * grad of the support loss, from the meta-parameters.

        The gradients are torch.func.grad's, so that torch.func.vmap can map this over a batch
        of tasks (_outer_step); second order, the outer backward differentiates through them;
        first order (--first_order), they are constants of it.

        Args:
            images (Tensor): task support set inputs
                shape (num_images, channels, height, width)
            labels (Tensor): task support set outputs
                shape (num_images,)
            train (bool): whether we are training or evaluating
            every_step (bool): return the parameters after every step (a list of
                num_inner_steps dicts, for a loss on each) instead of the last

        Returns:
            parameters (dict[str, Tensor]): adapted network parameters, same shapes as
                _meta_parameters; differentiable w.r.t. the meta-parameters (and learned inner
                lrs) only when train
            accuracies (list[Tensor]): support set accuracy over the course of
                the inner loop, length num_inner_steps + 1, each a 0-dim float32 tensor on
                the device (the host reads them only when it needs them)
            gradients (tuple[Tensor]): the gradients of the last inner step, one per parameter
                in _meta_parameters order (empty for zero inner steps); they require grad only
                when train and second order
        """
        second_order = train and self._second_order()
        with torch.set_grad_enabled(train):
            parameters = {key: value if train else value.detach()
                          for key, value in self._meta_parameters.items()}
            ### START CODE HERE ###
            trajectory, accuracies, gradients = [], [], {}
            for step in range(self._num_inner_steps):
                gradients, logits = torch.func.grad(self._support_loss, has_aux=True)(
                    parameters, images, labels, step)
                if not second_order:
                    gradients = {key: value.detach() for key, value in gradients.items()}
                accuracies.append(util.accuracy_per_task(logits, labels))
                learning_rates = self._step_inner_lrs(step)
                parameters = {key: value - learning_rates[key] * gradients[key]
                              for key, value in parameters.items()}
                trajectory.append(parameters)
            with torch.no_grad():
                accuracies.append(util.accuracy_per_task(self._forward(images, parameters),
                                                         labels))
            ### END CODE HERE ###
        return trajectory if every_step else parameters, accuracies, tuple(gradients.values())

    def _support_loss(self, parameters, images, labels, step):
        """The loss that inner step step descends, and its logits (num_images, num_outputs)."""
        logits = self._forward(images, parameters, step)
        return cross_entropy(logits, labels), logits

    def _outer_step(self, task_batch, train, per_task=False):
        """Computes the MAML loss and metrics on a batch of tasks: each task adapts to its
        support set (_inner_loop), then is scored on its query set (_task). In the loop path
        (--tasks loop) the tasks run one at a time; batched, torch.func.vmap maps the same
        per-task code over them.

        Args:
            task_batch (list of tuple): each tuple is (images_support (N*K, 1, 28, 28),
                labels_support (N*K,), images_query (N*Q, 1, 28, 28), labels_query (N*Q,));
                or a sampling.TaskBatch, the same as tensors of all the tasks
            train (bool): whether we are training or evaluating
            per_task (bool): return each task's metrics, on the device, as the training loop
                reads them (MetaLearner._evaluate), instead of the assignment's means

        Returns:
            outer_loss (Tensor): mean MAML loss over the batch, shape ()
            accuracies_support (ndarray): support set accuracy over the
                course of the inner loop, averaged over the task batch
                shape (num_inner_steps + 1,)
            accuracy_query (float64): query set accuracy of the adapted
                parameters, averaged over the task batch
            With per_task: outer_loss, and {metric key: Tensor}: 'support_per_step' of shape
            (num_tasks, num_inner_steps + 1), and the METRICS keys of shape (num_tasks,)
        """
        tasks = sampling.stacked(task_batch, self._device)
        with torch.set_grad_enabled(train):
            losses, accuracies_support, accuracies_query = training.per_task(
                functools.partial(self._task, train=train), self._batched)(*tasks)
        if not per_task:
            return (losses.mean(), util.to_host(accuracies_support).mean(axis=0),
                    util.to_host(accuracies_query).mean())
        return losses.mean(), {'support_per_step': accuracies_support,
                               'pre_adapt_support': accuracies_support[:, 0],
                               'post_adapt_support': accuracies_support[:, -1],
                               'post_adapt_query': accuracies_query}

    def _task(self, images_support, labels_support, images_query, labels_query, train):
        """One task of _outer_step: _inner_loop on the support set, then the query loss.

        Returns:
            query loss (0-dim Tensor), support accuracies (num_inner_steps + 1,), query
            accuracy (0-dim)
        """
        ### START CODE HERE ###
        parameters, accuracies, _ = self._inner_loop(images_support, labels_support, train)
        logits = self._forward(images_query, parameters)
        return (cross_entropy(logits, labels_query), torch.stack(accuracies),
                util.accuracy_per_task(logits, labels_query))
        ### END CODE HERE ###

    def _evaluate(self, task_batch, train):
        """The training loop's interface to _outer_step: its per-task metrics."""
        return self._outer_step(task_batch, train, per_task=True)

    def _second_order(self):
        """Second order unless --first_order."""
        return not self._first_order

    def _step_inner_lrs(self, step):
        """{key: the inner learning rate of step}: here the same for every step."""
        return self._inner_lrs

    def _log_extra(self, writer, step):
        if self._learn_inner_lrs:
            for key, value in self._inner_lrs.items():
                writer.add_scalar(f'{INNER_LR_TAG}/{key}', value.item(), step)

    def _checkpoint_state(self):
        return {'meta_parameters': detached(self._meta_parameters),
                'inner_lrs': detached(self._inner_lrs),
                'optimizer_state_dict': self._optimizer.state_dict()}

    def _load_checkpoint_state(self, state):
        util.copy_into(self._meta_parameters, state['meta_parameters'])
        util.copy_into(self._inner_lrs, state['inner_lrs'])
        self._optimizer.load_state_dict(state['optimizer_state_dict'])


def detached(tensors):
    """{key: tensor detached} of a dict of tensors."""
    return {key: value.detach() for key, value in tensors.items()}


import mamlpp  # noqa: E402  (MAMLpp extends MAML, defined above)


def default_log_dir(args):
    return training.default_log_dir(
        'maml', 'omniglot', args, training.TASK_FIELDS + (
            ('inner_steps', 'num_inner_steps'), ('inner_lr', 'inner_lr'),
            ('learn_inner_lrs', 'learn_inner_lrs'), ('outer_lr', 'outer_lr'),
            ('batch_size', 'batch_size')), options=('first_order', 'mamlpp', *mamlpp.FLAGS))


def add_maml_args(parser, num_train_iterations):
    training.add_common_args(parser, num_train_iterations)
    training.add_tasks_arg(parser)
    parser.add_argument('--num_inner_steps', type=int, default=1,
                        help='number of inner-loop updates')
    parser.add_argument('--inner_lr', type=float, default=0.4,
                        help='inner-loop learning rate initialization')
    parser.add_argument('--learn_inner_lrs', default=False, action='store_true',
                        help='learn inner-loop learning rates')
    parser.add_argument('--outer_lr', type=float, default=0.001,
                        help='outer-loop learning rate')
    parser.add_argument('--first_order', default=False, action='store_true',
                        help='first-order MAML: no gradient through the inner gradients')
    mamlpp.add_args(parser)


def main(args):
    training.check_common_args(args)
    training.check_tasks(args.tasks)
    if args.num_inner_steps < 0:
        raise util.UserError(f'--num_inner_steps must be 0 or more, got {args.num_inner_steps}')
    util.check_positive(inner_lr=args.inner_lr, outer_lr=args.outer_lr)
    options = mamlpp.options(args)

    def build(log_dir, device):
        """MAML, or MAMLpp where a MAML++ flag is on."""
        arguments = (args.num_way, args.num_inner_steps, args.inner_lr, args.learn_inner_lrs,
                     args.outer_lr, log_dir, device, args.first_order)
        settings = training.RunSettings(amp=args.amp, tasks=args.tasks)
        if options:
            return mamlpp.MAMLpp(*arguments, options, settings)
        return MAML(*arguments, settings)
    training.main(args, omniglot.OmniglotTasks(args.num_way, args.num_support, args.num_query,
                                               args.seed), build, default_log_dir(args))


def parse_args(argv=None):
    parser = util.argument_parser('Train a MAML!')
    add_maml_args(parser, num_train_iterations=15000)
    return parser.parse_args(argv)


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))

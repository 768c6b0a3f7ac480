"""Implementation of model-agnostic meta-learning (MAML) for Omniglot.

The MAML class is the assignment's: training, validation and --test run `_outer_step` on each
batch, which runs `_inner_loop` on each task, which runs `_forward`. The inner loop takes its
gradients with torch.func.grad, so that with --tasks batched torch.func.vmap maps the same
per-task code over the batch (as in the torch.func MAML example).

First-order MAML (--first_order) differentiates phi = theta - alpha * g with the inner gradients
g treated as constants: the meta-gradient w.r.t. theta is then the query-loss gradient at the
adapted parameters (as in the second handout), and learned inner learning rates still get the
gradient of their own term, d phi^L / d alpha_k = -(sum over steps of g_k), as first-order
Meta-SGD / MAML++ do.

MAML++ (Antoniou, Edwards, Storkey, "How to train your MAML", ICLR 2019) is five options of the
same learner, held in MAMLPlusPlus; with all of them off, the learner runs plain MAML's
operations.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import layers
import omniglot
import training
import util

NUM_INPUT_CHANNELS = 1
NUM_HIDDEN_CHANNELS = 32
KERNEL_SIZE = 3
NUM_CONV_LAYERS = 4
# MAML++ defaults, from the paper and its Omniglot configurations (HowToTrainYourMAMLPytorch):
MSL_FRACTION = 0.08  # multi-step loss annealed over 20 of 250 epochs ('multi_step_loss_num_epochs')
MSL_MIN_WEIGHT = 0.03  # each non-final step keeps 0.03 / steps ('min_value_for_non_final_losses')
FIRST_ORDER_FRACTION = 1 / 3  # ours: the paper used first order for its first 50 epochs
MIN_OUTER_LR = 1e-5  # cosine annealing of the outer learning rate down to 'min_learning_rate'
# TensorBoard tags: learned inner lrs as inner_lrs/{key}[/step_{i}]; the cosine's outer lr
INNER_LR_TAG = 'inner_lrs'
OUTER_LR_TAG = 'outer_lr'


@dataclass
class MAMLPlusPlus:
    """The MAML++ options; the defaults (all off) are plain MAML.

    Attributes:
        msl_iterations (int): multi-step loss: the query loss after every inner step, weighted,
            the weights annealed towards the last step over the first msl_iterations training
            iterations, the last step's loss alone after them (0: off)
        first_order_iterations (int): derivative-order annealing: first order before this
            training iteration, second order from it (0: off)
        per_step_inner_lrs (bool): a learned inner learning rate per parameter and inner step
        per_step_bn (bool): learned batch-norm weights and biases per inner step (outer loop
            only; the statistics stay each task's own batch statistics)
        cosine_iterations (int): cosine annealing of the outer learning rate from its initial
            value to min_outer_lr over this many iterations (0: off)
        min_outer_lr (float): where the cosine ends
    """
    msl_iterations: int = 0
    first_order_iterations: int = 0
    per_step_inner_lrs: bool = False
    per_step_bn: bool = False
    cosine_iterations: int = 0
    min_outer_lr: float = MIN_OUTER_LR


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


def embed(parameters, images, norms=None):
    """The network up to its linear layer: 4x [conv 3x3 'same' -> batch norm (batch
    statistics) -> ReLU], then the mean over positions.

    Args:
        parameters (dict[str, Tensor]): network weights, keys and shapes as init_parameters
            (the linear layer's are not used)
        images (Tensor): shape (examples, 1, height, width); any height and width
        norms (dict[str, Tensor] or None): batch norm's weight 'gamma{i}' and bias 'beta{i}' of
            each layer i, shape (32,) (MAML++'s per-step batch norm); None: no affine

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


def forward(parameters, images, norms=None):
    """Computes logits: embed's features, then the linear layer w4, b4.

    Args:
        parameters, images, norms: as embed takes them

    Returns:
        logits, shape (examples, num_outputs)
    """
    return F.linear(*layers.autocast_inputs(embed(parameters, images, norms),
                                            parameters[f'w{NUM_CONV_LAYERS}'],
                                            parameters[f'b{NUM_CONV_LAYERS}']))


def cross_entropy(logits, labels):
    """Cross-entropy of logits (examples, classes) against labels (examples,), a 0-dim Tensor:
    float32 under autocast, as autocast itself runs it (not reached under vmap)."""
    return F.cross_entropy(layers.at_least_float32(logits), labels)


def multi_step_loss_weights(num_steps, progress):
    """MAML++'s weights of the query losses after each inner step, progress (0 to 1) through
    their annealing: uniform at 0; then every non-final weight falls linearly to
    MSL_MIN_WEIGHT / num_steps, and the last one takes the rest (they always sum to 1)."""
    uniform, floor = 1 / num_steps, MSL_MIN_WEIGHT / num_steps
    return ([max(uniform - progress * uniform, floor)] * (num_steps - 1) +
            [min(uniform + progress * (num_steps - 1) * uniform, 1 - (num_steps - 1) * floor)])


def cosine_learning_rate(step, num_steps, initial, final):
    """The learning rate at step of a cosine from initial (step 0) to final (step num_steps), as
    torch.optim.lr_scheduler.CosineAnnealingLR."""
    return final + (initial - final) * (1 + math.cos(math.pi * step / num_steps)) / 2


class MAML(training.MetaLearner):
    """Trains and assesses a MAML."""
    METRICS = {'loss': 'loss',
               'pre_adapt_support': 'pre-adaptation support accuracy',
               'post_adapt_support': 'post-adaptation support accuracy',
               'post_adapt_query': 'post-adaptation query accuracy'}
    TEST_METRIC = 'post_adapt_query'

    def __init__(self, num_outputs, num_inner_steps, inner_lr, learn_inner_lrs, outer_lr,
                 log_dir, device, first_order=False, maml_plus_plus=MAMLPlusPlus(),
                 settings=training.RunSettings()):
        """Inits MAML.

        The network's weights are stored as a dict of leaf tensors, `_meta_parameters`, and the
        per-parameter inner learning rates as `_inner_lrs` (same keys; 0-dim, or one per inner
        step with MAML++'s per-step rates); MAML++'s per-step batch-norm weights and biases are
        `_step_norms` (else empty). One Adam optimizer updates them all (the learning rates only
        when learned).

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
            maml_plus_plus (MAMLPlusPlus): the MAML++ options; all off by default
            settings (training.RunSettings): intervals, --amp and --tasks
        """
        super().__init__(log_dir, device, settings)
        self._meta_parameters = {key: value.to(device).requires_grad_()
                                 for key, value in init_parameters(num_outputs).items()}
        lr_shape = (num_inner_steps,) if maml_plus_plus.per_step_inner_lrs else ()
        self._learn_inner_lrs = learn_inner_lrs or maml_plus_plus.per_step_inner_lrs
        self._inner_lrs = {key: torch.full(lr_shape, float(inner_lr), device=device,
                                           requires_grad=self._learn_inner_lrs)
                           for key in self._meta_parameters}
        # MAML++'s per-step batch norm: row i serves inner step i, the last row after the last.
        rows = max(num_inner_steps, 1)
        self._step_norms = {f'{name}{i}': torch.full((rows, NUM_HIDDEN_CHANNELS), value,
                                                     device=device, requires_grad=True)
                            for i in range(NUM_CONV_LAYERS)
                            for name, value in (('gamma', 1.0), ('beta', 0.0))
                            } if maml_plus_plus.per_step_bn else {}
        self._num_inner_steps = num_inner_steps
        self._first_order = first_order
        self._maml_plus_plus = maml_plus_plus
        self._outer_lr = outer_lr
        self._iteration = 0  # the training iteration, for what MAML++ anneals
        self._norm_rows = None  # _make_norm_rows's, while _outer_step runs
        self._optimizer = torch.optim.Adam(
            [*self._meta_parameters.values(), *self._inner_lrs.values(),
             *self._step_norms.values()], lr=outer_lr)
        # Parameter shapes depend on num_outputs only (and with MAML++'s per-step parameters,
        # on the inner steps): shots, and otherwise inner steps, may change at test.
        self.architecture = (f'maml/conv{NUM_CONV_LAYERS}x{NUM_HIDDEN_CHANNELS}/{num_outputs}-way'
                             + (f'/per-step-lrs-{num_inner_steps}' if lr_shape else '')
                             + (f'/per-step-bn-{rows}' if self._step_norms else ''))

    def _forward(self, images, parameters, step=-1):
        """Computes logits of images with the given parameters.

        Args:
            images (Tensor): shape (num_images, 1, height, width)
            parameters (dict[str, Tensor]): network weights, as _meta_parameters
            step (int): the inner step the weights serve, -1 after the last (MAML++'s per-step
                batch norm; plain MAML has one network for all)

        Returns:
            logits, shape (num_images, num_outputs)
        """
        rows = self._norm_rows or self._make_norm_rows()
        return forward(parameters, images, rows[step] if rows else None)

    def _make_norm_rows(self):
        """MAML++'s per-step batch-norm parameters {name: (rows, 32)} as a list of rows
        {name: (32,)}, one per inner step (the last also after it); [] without them."""
        norms = self._step_norms
        return [{key: value[row] for key, value in norms.items()}
                for row in range(max(self._num_inner_steps, 1))] if norms else []

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
        return trajectory if every_step else parameters, accuracies, tuple(gradients.values())

    def _support_loss(self, parameters, images, labels, step):
        """The loss that inner step step descends, and its logits (num_images, num_outputs)."""
        logits = self._forward(images, parameters, step)
        return cross_entropy(logits, labels), logits

    def _step_inner_lrs(self, step):
        """{key: the inner learning rate of step}: a 0-dim one serves every step, a 1-d one
        (MAML++'s per-step rates) holds one each."""
        return {key: value if value.dim() == 0 else value[step]
                for key, value in self._inner_lrs.items()}

    def _outer_step(self, task_batch, train, per_task=False):
        """Computes the MAML loss and metrics on a batch of tasks: each task adapts to its
        support set (_inner_loop), then is scored on its query set (_task). In the loop path
        (--tasks loop) the tasks run one at a time; batched, torch.func.vmap maps the same
        per-task code over them.

        Args:
            task_batch (list of tuple): each tuple is (images_support (N*K, 1, 28, 28),
                labels_support (N*K,), images_query (N*Q, 1, 28, 28), labels_query (N*Q,))
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
        tasks = [torch.stack(part).to(self._device) for part in zip(*task_batch)]
        with torch.set_grad_enabled(train):
            # once per batch: autograd sums each row's gradient over the batch in one place
            self._norm_rows = self._make_norm_rows()
            try:
                losses, accuracies_support, accuracies_query = training.per_task(
                    functools.partial(self._task, train=train), self._batched)(*tasks)
            finally:
                self._norm_rows = None
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
        loss_weights = self._multi_step_loss_weights() if train else None
        parameters, accuracies, _ = self._inner_loop(images_support, labels_support, train,
                                                     every_step=loss_weights is not None)
        if loss_weights is None:
            logits = self._forward(images_query, parameters)
            loss = cross_entropy(logits, labels_query)
        else:
            losses = []
            for step, (weight, step_parameters) in enumerate(zip(loss_weights, parameters,
                                                                 strict=True)):
                logits = self._forward(images_query, step_parameters, step)
                losses.append(weight * cross_entropy(logits, labels_query))
            loss = sum(losses)
        return (loss, torch.stack(accuracies), util.accuracy_per_task(logits, labels_query))

    def _evaluate(self, task_batch, train):
        """The training loop's interface to _outer_step: its per-task metrics."""
        return self._outer_step(task_batch, train, per_task=True)

    def _second_order(self):
        """Second order unless --first_order, or MAML++'s derivative-order annealing is still
        in its first-order part."""
        return (not self._first_order
                and self._iteration >= self._maml_plus_plus.first_order_iterations)

    def _multi_step_loss_weights(self):
        """The query-loss weight of each inner step at this iteration, or None: multi-step loss
        off, or its annealing over."""
        if not self._num_inner_steps or self._iteration >= self._maml_plus_plus.msl_iterations:
            return None
        return multi_step_loss_weights(self._num_inner_steps,
                                       self._iteration / self._maml_plus_plus.msl_iterations)

    def _train_step(self, task_batch, step):
        """Sets what MAML++ anneals by iteration (derivative order, loss weights, outer learning
        rate), then the shared training step."""
        self._iteration = step
        options = self._maml_plus_plus
        if options.cosine_iterations:
            learning_rate = cosine_learning_rate(min(step, options.cosine_iterations),
                                                 options.cosine_iterations, self._outer_lr,
                                                 options.min_outer_lr)
            for group in self._optimizer.param_groups:
                group['lr'] = learning_rate
        return super()._train_step(task_batch, step)

    def _log_extra(self, writer, step):
        if self._learn_inner_lrs:
            for key, value in self._inner_lrs.items():
                if value.dim() == 0:
                    writer.add_scalar(f'{INNER_LR_TAG}/{key}', value.item(), step)
                    continue
                for inner_step, learning_rate in enumerate(value.tolist()):
                    writer.add_scalar(f'{INNER_LR_TAG}/{key}/step_{inner_step}', learning_rate,
                                      step)
        if self._maml_plus_plus.cosine_iterations:
            writer.add_scalar(OUTER_LR_TAG, self._optimizer.param_groups[0]['lr'], step)

    def _checkpoint_state(self):
        state = {name: {key: value.detach() for key, value in getattr(self, '_' + name).items()}
                 for name in ('meta_parameters', 'inner_lrs', 'step_norms')}
        if not state['step_norms']:
            del state['step_norms']  # plain MAML: the assignment's keys
        return dict(state, optimizer_state_dict=self._optimizer.state_dict())

    def _load_checkpoint_state(self, state):
        for name in ('meta_parameters', 'inner_lrs', 'step_norms'):
            util.copy_into(getattr(self, '_' + name), state.get(name, {}))
        self._optimizer.load_state_dict(state['optimizer_state_dict'])


MAMLPP_OPTIONS = ('multi_step_loss', 'derivative_order_annealing', 'per_step_inner_lrs',
                  'per_step_bn', 'cosine_outer_lr')


def default_log_dir(args):
    return training.default_log_dir(
        'maml', 'omniglot', args, training.TASK_FIELDS + (
            ('inner_steps', 'num_inner_steps'), ('inner_lr', 'inner_lr'),
            ('learn_inner_lrs', 'learn_inner_lrs'), ('outer_lr', 'outer_lr'),
            ('batch_size', 'batch_size')), options=('first_order', 'mamlpp', *MAMLPP_OPTIONS))


def maml_plus_plus(args):
    """The MAML++ options the flags ask for (--mamlpp: all five), in iterations."""
    on = {option: args.mamlpp or getattr(args, option) for option in MAMLPP_OPTIONS}
    return MAMLPlusPlus(
        msl_iterations=round(MSL_FRACTION * args.num_train_iterations) * on['multi_step_loss'],
        first_order_iterations=(round(FIRST_ORDER_FRACTION * args.num_train_iterations)
                                * on['derivative_order_annealing']),
        per_step_inner_lrs=on['per_step_inner_lrs'], per_step_bn=on['per_step_bn'],
        cosine_iterations=args.num_train_iterations * on['cosine_outer_lr'])


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
    group = parser.add_argument_group(
        'MAML++ (Antoniou et al., "How to train your MAML", ICLR 2019); the defaults come from '
        "the paper and its Omniglot configurations; --num_train_iterations sets the annealing "
        'lengths, so keep it when resuming')
    group.add_argument('--mamlpp', action='store_true', help='all five options below')
    group.add_argument('--multi_step_loss', action='store_true',
                      help='the query loss after every inner step, weighted; the weights anneal '
                           f'to the last step over the first {MSL_FRACTION:.0%}% of training (the '
                           'paper: 20 of 250 epochs), then the last step alone')
    group.add_argument('--derivative_order_annealing', action='store_true',
                      help=f'first order for the first {FIRST_ORDER_FRACTION:.0%}% of training, '
                           'second order after (the paper: its first 50 epochs; the '
                           'fraction is ours)')
    group.add_argument('--per_step_inner_lrs', action='store_true',
                      help='a learned inner learning rate per layer and inner step, initialised '
                           'to --inner_lr (the paper initialised 0.1)')
    group.add_argument('--per_step_bn', action='store_true',
                      help='learned batch-norm weights and biases per inner step (initialised '
                           '1 and 0); statistics stay each batch\'s own')
    group.add_argument('--cosine_outer_lr', action='store_true',
                      help='cosine annealing of the outer learning rate from --outer_lr to '
                           f'{MIN_OUTER_LR:g} over training (the paper\'s min_learning_rate)')


def main(args):
    training.check_common_args(args)
    if args.num_inner_steps < 0:
        raise util.UserError(f'--num_inner_steps must be 0 or more, got {args.num_inner_steps}')
    util.check_positive(inner_lr=args.inner_lr, outer_lr=args.outer_lr)
    training.main(args, omniglot.OmniglotTasks(args.num_way, args.num_support, args.num_query,
                                               args.seed),
                  lambda log_dir, device: MAML(
                      args.num_way, args.num_inner_steps, args.inner_lr, args.learn_inner_lrs,
                      args.outer_lr, log_dir, device, args.first_order, maml_plus_plus(args),
                      training.RunSettings(amp=args.amp, tasks=args.tasks)),
                  default_log_dir(args))


def parse_args(argv=None):
    parser = util.argument_parser('Train a MAML!')
    add_maml_args(parser, num_train_iterations=15000)
    return parser.parse_args(argv)


if __name__ == '__main__':
    util.cli(lambda: main(parse_args()))

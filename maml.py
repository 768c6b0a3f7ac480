"""Implementation of model-agnostic meta-learning (MAML) for Omniglot.

The math is a few pure functions of a parameter dict and one task's data (`forward`, `adapt`),
as in the torch.func MAML example; the MAML class holds the meta-parameters, the inner learning
rates and the optimizer, and plugs them into the shared training loop of training.py.

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


def loss_and_logits(parameters, images, labels, norms=None):
    """Cross-entropy of forward's logits, and the logits; arguments as forward and adapt take
    them. Returns (0-dim Tensor, logits of shape (examples, num_outputs))."""
    logits = forward(parameters, images, norms)
    # float32 under autocast, as autocast itself runs cross-entropy (not reached under vmap)
    return F.cross_entropy(layers.at_least_float32(logits), labels), logits


def autograd_gradient(create_graph):
    """adapt's gradient function for one task at a time: torch.autograd.grad of loss_and_logits,
    differentiable when create_graph (second order). With grad mode off (evaluation) it
    differentiates leaf copies of the weights, so that no graph reaches the meta-parameters."""
    def gradient(parameters, images, labels, norms):
        with torch.enable_grad():
            parameters = {key: value if value.requires_grad else value.detach().requires_grad_()
                          for key, value in parameters.items()}
            loss, logits = loss_and_logits(parameters, images, labels, norms)
            return torch.autograd.grad(loss, list(parameters.values()),
                                       create_graph=create_graph), logits
    return gradient


def func_gradient(create_graph):
    """adapt's gradient function that torch.func.vmap can batch over tasks: torch.func.grad of
    loss_and_logits, which the outer backward differentiates (second order); without
    create_graph the gradients are detached, constants of the outer backward (first order)."""
    def gradient(parameters, images, labels, norms):
        gradients, logits = torch.func.grad(loss_and_logits, has_aux=True)(parameters, images,
                                                                         labels, norms)
        gradients = tuple(gradients.values())
        return gradients if create_graph else tuple(g.detach() for g in gradients), logits
    return gradient


def adapt(parameters, inner_lrs, images, labels, num_steps, gradient, norms=None):
    """The inner loop: num_steps gradient steps on one task's support loss.

    Each step is phi <- phi - inner_lrs[key] * grad_phi L(phi). The gradient function decides
    how the gradients are taken: autograd_gradient (one task at a time) or func_gradient
    (under torch.func.vmap), each differentiable (second-order MAML) or constant (first-order
    MAML: the result is still differentiable through the update itself).

    Args:
        parameters (dict[str, Tensor]): starting weights
        inner_lrs (dict[str, Tensor]): same keys; each 0-dim (one learning rate for every step)
            or of shape (num_steps,) (MAML++: one per step)
        images (Tensor): support images, shape (num_way * num_support, 1, height, width)
        labels (Tensor): support labels, int64, shape (num_way * num_support,)
        num_steps (int): number of inner steps, >= 0
        gradient (callable): (parameters, images, labels, norms) -> (the gradients of
            loss_and_logits, one tensor per parameter in the dict's order; the logits)
        norms (list of dict or None): forward's norms at step i are norms[i], and after the
            last step norms[-1] (step_norm_rows makes them); None: no affine at any step

    Returns:
        the weights before the first step and after each step, num_steps + 1 dicts
        support logits before each step and after the last, num_steps + 1 Tensors of shape
            (num_way * num_support, num_outputs)
        the last step's gradients, a tuple with one tensor per parameter in the dict's order
            (empty when num_steps is 0)
    """
    norms = norms or step_norm_rows({}, num_steps)
    trajectory, logits, gradients = [parameters], [], ()
    for step in range(num_steps):
        gradients, step_logits = gradient(parameters, images, labels, norms[step])
        logits.append(step_logits)
        parameters = {key: value - at_step(inner_lrs[key], step) * step_gradient
                      for (key, value), step_gradient in zip(parameters.items(), gradients)}
        trajectory.append(parameters)
    with torch.no_grad():
        logits.append(forward(parameters, images, norms[-1]))
    return trajectory, logits, gradients


def query_loss(trajectory, norms, images, labels, loss_weights=None):
    """The query loss of the adapted weights, and their logits; with loss_weights (MAML++'s
    multi-step loss), the weighted sum of the query losses after every inner step.

    Args:
        trajectory (list of dict): adapt's weights before and after each inner step
        norms (list): the per-step batch-norm rows adapt used (step_norm_rows)
        images (Tensor): query images, shape (N*Q, 1, height, width)
        labels (Tensor): query labels, shape (N*Q,)
        loss_weights (list of float or None): one weight per inner step

    Returns:
        loss (0-dim Tensor), logits of the last weights (N*Q, num_outputs)
    """
    if loss_weights is None:
        return loss_and_logits(trajectory[-1], images, labels, norms[-1])
    losses = []
    for weight, parameters, step_norms in zip(loss_weights, trajectory[1:], norms, strict=True):
        loss, logits = loss_and_logits(parameters, images, labels, step_norms)
        losses.append(weight * loss)
    return sum(losses), logits


def task_objective(images_support, labels_support, images_query, labels_query, *, parameters,
                   inner_lrs, norms, num_steps, gradient, loss_weights):
    """One task's MAML objective, a pure function of the task's data and the weights, which
    torch.func.vmap batches over tasks (its positional arguments): adapt to the support set,
    then query_loss.

    Args:
        images_support (Tensor): shape (N*K, 1, height, width)
        labels_support (Tensor): int64, shape (N*K,)
        images_query (Tensor): shape (N*Q, 1, height, width)
        labels_query (Tensor): int64, shape (N*Q,)
        parameters, inner_lrs, num_steps, gradient: as adapt takes them
        norms (list): step_norm_rows's rows, one per inner step
        loss_weights (list of float or None): as query_loss takes them

    Returns:
        query loss (0-dim Tensor)
        support logits before each step and after the last, shape (num_steps + 1, N*K, N)
        query logits of the adapted weights, shape (N*Q, N)
    """
    trajectory, logits_support, _ = adapt(parameters, inner_lrs, images_support, labels_support,
                                          num_steps, gradient, norms)
    loss, logits_query = query_loss(trajectory, norms, images_query, labels_query, loss_weights)
    return loss, torch.stack(logits_support), logits_query


def at_step(learning_rate, step):
    """An inner learning rate at step: a 0-dim one serves every step, a 1-d one holds one each."""
    return learning_rate if learning_rate.dim() == 0 else learning_rate[step]


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


def step_norm_rows(norms, num_steps):
    """MAML++'s per-step batch-norm parameters {name: (rows, 32)} as the list of
    max(num_steps, 1) rows {name: (32,)} that adapt and forward take, one per inner step (the
    last also after it); all None (no affine) when norms is empty."""
    rows = range(max(num_steps, 1))
    return [{key: value[row] for key, value in norms.items()} if norms else None for row in rows]


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
        self._optimizer = torch.optim.Adam(
            [*self._meta_parameters.values(), *self._inner_lrs.values(),
             *self._step_norms.values()], lr=outer_lr)
        # Parameter shapes depend on num_outputs only (and with MAML++'s per-step parameters,
        # on the inner steps): shots, and otherwise inner steps, may change at test.
        self.architecture = (f'maml/conv{NUM_CONV_LAYERS}x{NUM_HIDDEN_CHANNELS}/{num_outputs}-way'
                             + (f'/per-step-lrs-{num_inner_steps}' if lr_shape else '')
                             + (f'/per-step-bn-{rows}' if self._step_norms else ''))

    def _forward(self, images, parameters):
        """The assignment's interface to forward(parameters, images): logits (num_images,
        classes) of images (num_images, channels, height, width)."""
        return forward(parameters, images)

    def _inner_loop(self, images, labels, train):
        """Computes the adapted network parameters via the MAML inner loop.

        Args:
            images (Tensor): task support set inputs
                shape (num_images, channels, height, width)
            labels (Tensor): task support set outputs
                shape (num_images,)
            train (bool): whether we are training or evaluating

        Returns:
            parameters (dict[str, Tensor]): adapted network parameters, same shapes as
                _meta_parameters; differentiable w.r.t. the meta-parameters (and learned inner
                lrs) only when train
            accuracies (list[float]): support set accuracy over the course of
                the inner loop, length num_inner_steps + 1
            gradients (tuple[Tensor]): gradients computed from autograd.grad at the last
                inner step, one per parameter in _meta_parameters order (empty for zero inner
                steps); they require grad only when train and not first-order
        """
        with torch.set_grad_enabled(train):
            trajectory, logits, gradients = adapt(
                self._meta_parameters, self._inner_lrs, images, labels, self._num_inner_steps,
                autograd_gradient(train and self._second_order()), self._norm_rows(train))
        parameters = trajectory[-1]
        if not train:  # zero inner steps: the meta-parameters themselves
            parameters = {key: value.detach() for key, value in parameters.items()}
        return parameters, [util.score(step_logits, labels) for step_logits in logits], gradients

    def _norm_rows(self, train):
        """The per-step batch-norm rows that adapt and the query loss use (step_norm_rows), detached
        in evaluation; built once per batch of tasks."""
        norms = self._step_norms
        if not train:
            norms = {key: value.detach() for key, value in norms.items()}
        return step_norm_rows(norms, self._num_inner_steps)

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

    def _evaluate(self, task_batch, train):
        """The MAML objective on each task of a batch, one task at a time or (--tasks batched)
        all at once under torch.func.vmap; task_batch and train as _outer_step takes them.

        Returns:
            mean query loss over the tasks, a 0-dim Tensor (with grad only when train)
            {metric key: numpy array}: 'support_per_step' of shape (num_tasks, num_inner_steps
                + 1), and the METRICS keys of shape (num_tasks,)
        """
        tasks = [torch.stack(part).to(self._device) for part in zip(*task_batch)]
        create_graph = train and self._second_order()
        objective = functools.partial(
            task_objective, parameters=self._meta_parameters, inner_lrs=self._inner_lrs,
            norms=self._norm_rows(train), num_steps=self._num_inner_steps,
            loss_weights=self._multi_step_loss_weights() if train else None)
        # torch.func.grad where vmap batches the tasks, autograd one task at a time
        gradient = (func_gradient if self._batched else autograd_gradient)(create_graph)
        with torch.set_grad_enabled(train):
            losses, logits_support, logits_query = training.per_task(
                functools.partial(objective, gradient=gradient), self._batched)(*tasks)
        _, labels_support, _, labels_query = tasks
        accuracies_support = util.accuracy_per_task(logits_support, labels_support[:, None])
        return losses.mean(), {
            'support_per_step': accuracies_support,
            'pre_adapt_support': accuracies_support[:, 0],
            'post_adapt_support': accuracies_support[:, -1],
            'post_adapt_query': util.accuracy_per_task(logits_query, labels_query)}

    def _outer_step(self, task_batch, train):
        """The assignment's interface to _evaluate: the MAML loss and metrics of a batch.

        Args:
            task_batch (list of tuple): each tuple is (images_support (N*K, 1, 28, 28),
                labels_support (N*K,), images_query (N*Q, 1, 28, 28), labels_query (N*Q,))
            train (bool): whether we are training or evaluating

        Returns:
            outer_loss (Tensor): mean MAML loss over the batch, shape ()
            accuracies_support (ndarray): support set accuracy over the
                course of the inner loop, averaged over the task batch
                shape (num_inner_steps + 1,)
            accuracy_query (float64): query set accuracy of the adapted
                parameters, averaged over the task batch
        """
        loss, metrics = self._evaluate(task_batch, train)
        return (loss, util.to_host(metrics['support_per_step']).mean(axis=0),
                util.to_host(metrics['post_adapt_query']).mean())

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

"""MAML++ (Antoniou, Edwards, Storkey, "How to train your MAML", ICLR 2019): five options on
top of maml.py's MAML, kept apart from it as learn2learn keeps its MAMLpp.

    multi-step loss             the query loss after every inner step, weighted, the weights
                                annealed towards the last step
    derivative-order annealing  first order early in training, second order after
    per-step inner lrs          a learned inner learning rate per parameter and inner step
    per-step batch norm         learned batch-norm weights and biases per inner step
    cosine outer lr             cosine annealing of the outer learning rate

`python maml.py --mamlpp` (all five) or any of their flags trains a MAMLpp; with all of them
off, maml.py trains its MAML.
"""
import dataclasses
import math

import torch

import maml
import training
import util

# Defaults from the paper and its Omniglot configurations (HowToTrainYourMAMLPytorch):
MSL_FRACTION = 0.08  # multi-step loss annealed over 20 of 250 epochs ('multi_step_loss_num_epochs')
MSL_MIN_WEIGHT = 0.03  # each non-final step keeps 0.03 / steps ('min_value_for_non_final_losses')
FIRST_ORDER_FRACTION = 1 / 3  # ours: the paper used first order for its first 50 epochs
MIN_OUTER_LR = 1e-5  # cosine annealing of the outer learning rate down to 'min_learning_rate'
OUTER_LR_TAG = 'outer_lr'  # TensorBoard tag of the cosine's outer learning rate
FLAGS = ('multi_step_loss', 'derivative_order_annealing', 'per_step_inner_lrs', 'per_step_bn',
         'cosine_outer_lr')


@dataclasses.dataclass
class Options:
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


class MAMLpp(maml.MAML):
    """MAML with the MAML++ options."""

    def __init__(self, num_outputs, num_inner_steps, inner_lr, learn_inner_lrs, outer_lr,
                 log_dir, device, first_order=False, options=Options(),
                 settings=training.RunSettings()):
        """Inits MAML, then MAML++'s parameters: the inner learning rates `_inner_lrs` of shape
        (num_inner_steps,) with per-step rates (learned), and the per-step batch-norm weights
        and biases `_step_norms` {gamma{i}, beta{i}: (rows, 32)} (else empty), row i for inner
        step i and the last row also after the last step. One Adam updates them all.

        Args:
            as MAML's, and options (Options): the MAML++ options
        """
        super().__init__(num_outputs, num_inner_steps, inner_lr,
                         learn_inner_lrs or options.per_step_inner_lrs, outer_lr, log_dir,
                         device, first_order, settings)
        self._options = options
        if options.per_step_inner_lrs:
            self._inner_lrs = {key: torch.full((num_inner_steps,), float(inner_lr),
                                               device=device, requires_grad=True)
                               for key in self._meta_parameters}
        rows = max(num_inner_steps, 1)
        self._step_norms = {f'{name}{i}': torch.full((rows, maml.NUM_HIDDEN_CHANNELS), value,
                                                     device=device, requires_grad=True)
                            for i in range(maml.NUM_CONV_LAYERS)
                            for name, value in (('gamma', 1.0), ('beta', 0.0))
                            } if options.per_step_bn else {}
        self._norm_rows = None  # _make_norm_rows's, while _outer_step runs
        self._iteration = 0  # the training iteration, for what MAML++ anneals
        self._outer_lr = outer_lr
        self._optimizer = torch.optim.Adam(
            [*self._meta_parameters.values(), *self._inner_lrs.values(),
             *self._step_norms.values()], lr=outer_lr)
        # With per-step parameters their shapes depend on the inner steps too.
        self.architecture += ((f'/per-step-lrs-{num_inner_steps}'
                               if options.per_step_inner_lrs else '')
                              + (f'/per-step-bn-{rows}' if options.per_step_bn else ''))

    def _forward(self, images, parameters, step=-1):
        """MAML's network, with batch norm's weights and biases of the inner step (per-step
        batch norm; none without it)."""
        rows = self._norm_rows or self._make_norm_rows()
        return maml.forward(images, parameters, rows[step] if rows else None)

    def _make_norm_rows(self):
        """The per-step batch-norm parameters as a list of rows {name: (32,)}, one per inner
        step (the last also after it); [] without them."""
        return [{key: value[row] for key, value in self._step_norms.items()}
                for row in range(max(self._num_inner_steps, 1))] if self._step_norms else []

    def _outer_step(self, task_batch, train, per_task=False):
        """MAML's, with the per-step batch-norm rows made once for the batch, so that autograd
        sums each row's gradient over the batch in one place."""
        with torch.set_grad_enabled(train):
            self._norm_rows = self._make_norm_rows()
        try:
            return super()._outer_step(task_batch, train, per_task)
        finally:
            self._norm_rows = None

    def _step_inner_lrs(self, step):
        """{key: inner learning rate of step}: with per-step rates, each key's own for step."""
        if not self._options.per_step_inner_lrs:
            return super()._step_inner_lrs(step)
        return {key: value[step] for key, value in self._inner_lrs.items()}

    def _second_order(self):
        """MAML's choice, and first order while derivative-order annealing is in its
        first-order part."""
        return super()._second_order() and (
            self._iteration >= self._options.first_order_iterations)

    def _task(self, images_support, labels_support, images_query, labels_query, train):
        """MAML's task, or with the multi-step loss in training the weighted sum of the query
        losses after every inner step (arguments and results as MAML._task)."""
        loss_weights = self._multi_step_loss_weights() if train else None
        if loss_weights is None:
            return super()._task(images_support, labels_support, images_query, labels_query,
                                 train)
        trajectory, accuracies, _ = self._inner_loop(images_support, labels_support, train,
                                                     every_step=True)
        losses = []
        for step, (weight, parameters) in enumerate(zip(loss_weights, trajectory, strict=True)):
            logits = self._forward(images_query, parameters, step)
            losses.append(weight * maml.cross_entropy(logits, labels_query))
        return (sum(losses), torch.stack(accuracies),
                util.accuracy_per_task(logits, labels_query))

    def _multi_step_loss_weights(self):
        """The query-loss weight of each inner step at this iteration, or None: multi-step loss
        off, or its annealing over."""
        if not self._num_inner_steps or self._iteration >= self._options.msl_iterations:
            return None
        return multi_step_loss_weights(self._num_inner_steps,
                                       self._iteration / self._options.msl_iterations)

    def _train_step(self, task_batch, step):
        """Sets what MAML++ anneals by iteration (derivative order, loss weights, outer learning
        rate), then the shared training step."""
        self._iteration = step
        options = self._options
        if options.cosine_iterations:
            learning_rate = cosine_learning_rate(min(step, options.cosine_iterations),
                                                 options.cosine_iterations, self._outer_lr,
                                                 options.min_outer_lr)
            for group in self._optimizer.param_groups:
                group['lr'] = learning_rate
        return super()._train_step(task_batch, step)

    def _log_extra(self, writer, step):
        """MAML's learned inner lrs, per step as inner_lrs/{key}/step_{i} with per-step rates;
        the cosine's outer learning rate."""
        if self._options.per_step_inner_lrs:
            for key, value in self._inner_lrs.items():
                for inner_step, learning_rate in enumerate(value.tolist()):
                    writer.add_scalar(f'{maml.INNER_LR_TAG}/{key}/step_{inner_step}',
                                      learning_rate, step)
        else:
            super()._log_extra(writer, step)
        if self._options.cosine_iterations:
            writer.add_scalar(OUTER_LR_TAG, self._optimizer.param_groups[0]['lr'], step)

    def _checkpoint_state(self):
        """MAML's keys, and step_norms with per-step batch norm."""
        state = super()._checkpoint_state()
        if self._step_norms:
            state['step_norms'] = {key: value.detach() for key, value in self._step_norms.items()}
        return state

    def _load_checkpoint_state(self, state):
        util.copy_into(self._step_norms, state.get('step_norms', {}))
        super()._load_checkpoint_state(state)


def multi_step_loss_weights(num_steps, progress):
    """The weights of the query losses after each inner step, progress (0 to 1) through
    their annealing: uniform at 0; then every non-final weight falls linearly to
    MSL_MIN_WEIGHT / num_steps, and the last one takes the rest (they always sum to 1)."""
    uniform, floor = 1 / num_steps, MSL_MIN_WEIGHT / num_steps
    return ([max(uniform - progress * uniform, floor)] * (num_steps - 1) +
            [min(uniform + progress * (num_steps - 1) * uniform, 1 - (num_steps - 1) * floor)])


def cosine_learning_rate(step, num_steps, initial, final):
    """The learning rate at step of a cosine from initial (step 0) to final (step num_steps), as
    torch.optim.lr_scheduler.CosineAnnealingLR."""
    return final + (initial - final) * (1 + math.cos(math.pi * step / num_steps)) / 2


def options(args):
    """The options the flags ask for (--mamlpp: all five), in iterations; None when all are
    off (plain MAML)."""
    every = args.mamlpp
    on = {'multi_step_loss': every or args.multi_step_loss,
          'derivative_order_annealing': every or args.derivative_order_annealing,
          'per_step_inner_lrs': every or args.per_step_inner_lrs,
          'per_step_bn': every or args.per_step_bn,
          'cosine_outer_lr': every or args.cosine_outer_lr}
    if not any(on.values()):
        return None
    return Options(
        msl_iterations=round(MSL_FRACTION * args.num_train_iterations) * on['multi_step_loss'],
        first_order_iterations=(round(FIRST_ORDER_FRACTION * args.num_train_iterations)
                                * on['derivative_order_annealing']),
        per_step_inner_lrs=on['per_step_inner_lrs'], per_step_bn=on['per_step_bn'],
        cosine_iterations=args.num_train_iterations * on['cosine_outer_lr'])


def add_args(parser):
    """The flags --mamlpp and one per option, as a group of parser."""
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

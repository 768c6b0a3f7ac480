"""Implementation of model-agnostic meta-learning (MAML) for Omniglot.

The math is a few pure functions of a parameter dict and one task's data (`forward`, `adapt`),
as in the torch.func MAML example; the MAML class holds the meta-parameters, the inner learning
rates and the optimizer, and plugs them into the shared training loop of training.py.

First-order MAML (--first_order) differentiates phi = theta - alpha * g with the inner gradients
g treated as constants: the meta-gradient w.r.t. theta is then the query-loss gradient at the
adapted parameters (as in the second handout), and learned inner learning rates still get the
gradient of their own term, d phi^L / d alpha_k = -(sum over steps of g_k), as first-order
Meta-SGD / MAML++ do.
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import omniglot
import training
import util

NUM_INPUT_CHANNELS = 1
NUM_HIDDEN_CHANNELS = 32
KERNEL_SIZE = 3
NUM_CONV_LAYERS = 4


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


def forward(parameters, images):
    """Computes logits: 4x [conv 3x3 'same' -> batch norm (batch statistics) -> ReLU], the mean
    over positions, then a linear layer.

    Args:
        parameters (dict[str, Tensor]): network weights, keys and shapes as init_parameters
        images (Tensor): shape (examples, 1, height, width); any height and width

    Returns:
        logits, shape (examples, num_outputs)
    """
    x = images
    for i in range(NUM_CONV_LAYERS):
        x = F.conv2d(x, parameters[f'conv{i}'], parameters[f'b{i}'], stride=1, padding='same')
        x = F.batch_norm(x, None, None, training=True)
        x = F.relu(x)
    x = x.mean(dim=(2, 3))
    return F.linear(x, parameters[f'w{NUM_CONV_LAYERS}'], parameters[f'b{NUM_CONV_LAYERS}'])


def adapt(parameters, inner_lrs, images, labels, num_steps, create_graph):
    """The inner loop: num_steps gradient steps on one task's support loss.

    Each step is phi <- phi - inner_lrs[key] * grad_phi L(phi). With create_graph the gradients
    are differentiable (second-order MAML); without, they are constants and the result is still
    differentiable through the update itself (first-order MAML) if parameters require grad.

    Args:
        parameters (dict[str, Tensor]): starting weights; each must require grad
        inner_lrs (dict[str, Tensor]): same keys, 0-dim learning rates
        images (Tensor): support images, shape (num_way * num_support, 1, height, width)
        labels (Tensor): support labels, int64, shape (num_way * num_support,)
        num_steps (int): number of inner steps, >= 0
        create_graph (bool): whether the gradients are differentiable

    Returns:
        adapted parameters (dict, same shapes)
        support accuracies before each step and after the last, a list of num_steps + 1 floats
        the last step's gradients: the tuple torch.autograd.grad returns, one tensor per
            parameter in the dict's order (empty when num_steps is 0)
    """
    accuracies, gradients = [], ()
    for _ in range(num_steps):
        logits = forward(parameters, images)
        accuracies.append(util.score(logits, labels))
        loss = F.cross_entropy(logits, labels)
        gradients = torch.autograd.grad(loss, list(parameters.values()),
                                        create_graph=create_graph)
        parameters = {key: value - inner_lrs[key] * gradient
                      for (key, value), gradient in zip(parameters.items(), gradients)}
    with torch.no_grad():
        accuracies.append(util.score(forward(parameters, images), labels))
    return parameters, accuracies, gradients


class MAML(training.MetaLearner):
    """Trains and assesses a MAML."""
    METRICS = {'loss': 'loss',
               'pre_adapt_support': 'pre-adaptation support accuracy',
               'post_adapt_support': 'post-adaptation support accuracy',
               'post_adapt_query': 'post-adaptation query accuracy'}
    TEST_METRIC = 'post_adapt_query'

    def __init__(self, num_outputs, num_inner_steps, inner_lr, learn_inner_lrs, outer_lr,
                 log_dir, device, first_order=False, val_interval=None, save_interval=None,
                 amp='none'):
        """Inits MAML.

        The network's weights are stored as a dict of leaf tensors, `_meta_parameters`, and the
        per-parameter inner learning rates as `_inner_lrs` (same keys, 0-dim); one Adam
        optimizer updates both (the learning rates only with learn_inner_lrs).

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
            val_interval, save_interval (int): steps between validations / checkpoints
            amp (str): 'bf16' for bfloat16 autocast (--amp), 'none' for float32
        """
        super().__init__(log_dir, device, val_interval, save_interval, amp=amp)
        self._meta_parameters = {key: value.to(device).requires_grad_()
                                 for key, value in init_parameters(num_outputs).items()}
        self._inner_lrs = {key: torch.tensor(float(inner_lr), device=device,
                                             requires_grad=learn_inner_lrs)
                           for key in self._meta_parameters}
        self._num_inner_steps = num_inner_steps
        self._learn_inner_lrs = learn_inner_lrs
        self._first_order = first_order
        self._optimizer = torch.optim.Adam(
            list(self._meta_parameters.values()) + list(self._inner_lrs.values()), lr=outer_lr)
        # Parameter shapes depend on num_outputs only: inner steps and shots may change at test.
        self.architecture = f'maml/conv{NUM_CONV_LAYERS}x{NUM_HIDDEN_CHANNELS}/{num_outputs}-way'

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
        with torch.enable_grad():
            if train:
                return adapt(self._meta_parameters, self._inner_lrs, images, labels,
                             self._num_inner_steps, create_graph=not self._first_order)
            # Evaluation: start from detached copies, so no graph reaches the meta-parameters.
            start = {key: value.detach().requires_grad_()
                     for key, value in self._meta_parameters.items()}
            lrs = {key: value.detach() for key, value in self._inner_lrs.items()}
            parameters, accuracies, gradients = adapt(start, lrs, images, labels,
                                                      self._num_inner_steps, create_graph=False)
        return {key: value.detach() for key, value in parameters.items()}, accuracies, gradients

    def _evaluate(self, task_batch, train):
        """The MAML objective on each task of a batch, one task at a time; task_batch and
        train as _outer_step takes them.

        Returns:
            mean query loss over the tasks, a 0-dim Tensor (with grad only when train)
            {metric key: numpy array}: 'support_per_step' of shape (num_tasks, num_inner_steps
                + 1), and the METRICS keys of shape (num_tasks,)
        """
        losses, accuracies_support, accuracies_query = [], [], []
        for task in task_batch:
            images_support, labels_support, images_query, labels_query = (
                part.to(self._device) for part in task)
            parameters, accuracies, _ = self._inner_loop(images_support, labels_support, train)
            with torch.set_grad_enabled(train):
                logits = forward(parameters, images_query)
                losses.append(F.cross_entropy(logits, labels_query))
            accuracies_support.append(accuracies)
            accuracies_query.append(util.score(logits, labels_query))
        accuracies_support = np.array(accuracies_support, dtype=np.float64)
        return torch.stack(losses).mean(), {
            'support_per_step': accuracies_support,
            'pre_adapt_support': accuracies_support[:, 0],
            'post_adapt_support': accuracies_support[:, -1],
            'post_adapt_query': np.array(accuracies_query, dtype=np.float64)}

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
        return loss, metrics['support_per_step'].mean(axis=0), metrics['post_adapt_query'].mean()

    def _log_extra(self, writer, step):
        if self._learn_inner_lrs:
            for key, value in self._inner_lrs.items():
                writer.add_scalar(f'inner_lrs/{key}', value.item(), step)

    def _checkpoint_state(self):
        return {'meta_parameters': {key: value.detach() for key, value in
                                    self._meta_parameters.items()},
                'inner_lrs': {key: value.detach() for key, value in self._inner_lrs.items()},
                'optimizer_state_dict': self._optimizer.state_dict()}

    def _load_checkpoint_state(self, state):
        # Copy into the tensors the optimizer holds: swapping in new tensors (as the original
        # assignment did) leaves the optimizer updating orphans, and training silently stops.
        with torch.no_grad():
            for name in ('meta_parameters', 'inner_lrs'):
                for key, value in getattr(self, '_' + name).items():
                    value.copy_(state[name][key])
        self._optimizer.load_state_dict(state['optimizer_state_dict'])


def default_log_dir(args):
    log_dir = (f'./logs/maml/omniglot.way_{args.num_way}.support_{args.num_support}'
               f'.query_{args.num_query}.inner_steps_{args.num_inner_steps}'
               f'.inner_lr_{args.inner_lr}.learn_inner_lrs_{args.learn_inner_lrs}'
               f'.outer_lr_{args.outer_lr}.batch_size_{args.batch_size}')
    if args.first_order:
        log_dir += '.first_order_True'
    return log_dir


def add_maml_args(parser, num_train_iterations):
    training.add_common_args(parser, num_train_iterations)
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


def main(args):
    training.check_common_args(args)
    if args.num_inner_steps < 0:
        raise util.UserError(f'--num_inner_steps must be 0 or more, got {args.num_inner_steps}')
    util.check_positive(inner_lr=args.inner_lr, outer_lr=args.outer_lr)
    training.main(args, omniglot.OmniglotTasks(args.num_way, args.num_support, args.num_query,
                                               args.seed),
                  lambda log_dir, device: MAML(
                      args.num_way, args.num_inner_steps, args.inner_lr, args.learn_inner_lrs,
                      args.outer_lr, log_dir, device, args.first_order, amp=args.amp),
                  default_log_dir(args))


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Train a MAML!')
    add_maml_args(parser, num_train_iterations=15000)
    util.cli(lambda: main(parser.parse_args()))

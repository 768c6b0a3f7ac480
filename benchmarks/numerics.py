"""The benchmark's accuracy check: ours must be as close to exact arithmetic as the course's way.

On one seeded batch, for weights drawn with several seeds, ours and the reference (reference.py)
compute the loss and every gradient in float32, and the reference again in float64. Ours passes
when its largest relative error against float64 is within ACCURACY_MARGIN times the
reference's own (or within RELATIVE_TOLERANCE), each the median over the seeds. Comparing ours
with the reference's float32 result directly would fail any change of summation order:
second-order MAML in float32 is itself ~1e-2 from float64, and on Omniglot's binary images
rounding decides ties in max pooling and at a ReLU's 0. One tie picked the other way moves a
gradient by ~1e-3 of its norm, on one side and not the other, for one draw of the weights and
not the next, and at another thread count or on another CPU not at all; the median over three
draws leaves such a draw out, where a loss of precision shows in every draw. The float64
references run on the CPU, from copies (Apple's MPS has no float64).
"""
import functools

import numpy as np
import torch

import maml
import omniglot
import protonet
import reference
import training

RELATIVE_TOLERANCE = 1e-4
ACCURACY_MARGIN = 2
MAML_INNER_LR = 0.4
LEARNING_RATE = 0.001
# (name, inner steps, first order) of the MAML configurations checked and timed
MAML_ROWS = [('MAML 5w1s 1 step', 1, False), ('MAML 5w1s 5 steps', 5, False),
             ('MAML 5w1s 1 step first-order', 1, True)]
BATCHED = ' --tasks batched'  # ends the name of a check or a row of the batched path
TASKS = [('loop', ''), ('batched', BATCHED)]  # each path is checked: (--tasks, name suffix)


def exact_copy(tensor):
    """tensor copied to the CPU, where the float64 references are computed, as it is; then, if
    floating-point, widened to float64 there (MPS cannot widen to float64 as it copies)."""
    copy = tensor.detach().to('cpu', copy=True)
    return copy.double() if copy.is_floating_point() else copy


def exact_batch(task_batch):
    """task_batch's task tuples through exact_copy."""
    return [tuple(map(exact_copy, task)) for task in task_batch]


def largest_relative_error(loss, expected_loss, gradients, expected_gradients):
    """The largest of |loss - expected| / |expected| and ||a - b|| / ||b|| over gradient pairs.

    A gradient whose norm is below 1e-3 of the largest one (the bias of a convolution followed
    by batch norm: zero in exact arithmetic, float32 rounding noise in practice) is compared
    relative to the norm of the whole gradient instead.

    Args:
        loss, expected_loss (Tensor): 0-dim; expected_loss float64 on the CPU, loss anywhere
        gradients, expected_gradients (list of Tensor): pairwise the same shapes, as the losses
    """
    norms = [b.norm().item() for b in expected_gradients]
    whole = float(np.linalg.norm(norms))
    errors = [((exact_copy(a) - b).norm() / (norm if norm >= 1e-3 * max(norms) else whole)).item()
              for a, b, norm in zip(gradients, expected_gradients, norms, strict=True)]
    return max([((exact_copy(loss) - expected_loss).abs() / expected_loss.abs()).item(), *errors])


def loss_and_gradients(loss, parameters):
    loss.backward()
    return loss.detach(), [p.grad for p in parameters]


def error_against(result, exact):
    """result, exact: (loss, gradients) pairs -> the largest relative error of result."""
    (loss, gradients), (expected_loss, expected_gradients) = result, exact
    return largest_relative_error(loss, expected_loss, gradients, expected_gradients)


def seeded_learners(make, seed):
    """{--tasks path: make(tasks)}, each made after torch.manual_seed(seed): the same weights."""
    learners = {}
    for tasks, _ in TASKS:
        torch.manual_seed(seed)
        learners[tasks] = make(tasks)
    return learners


def check_protonet(task_batch, seed, device, log_dir):
    """Errors of ProtoNet._step, on each --tasks path, and of the course's step against the
    course's step in float64, same weights (drawn with seed) and batch.

    Returns:
        ({tasks: ours}, reference): each the largest relative error of the loss or any gradient
    """
    learners = seeded_learners(lambda tasks: protonet.ProtoNet(LEARNING_RATE, log_dir, device,
                                                               tasks=tasks), seed)
    network = learners['loop']._network
    float32 = reference.protonet_network_like(network)
    float64 = reference.protonet_network_like(network)
    float64.load_state_dict({key: exact_copy(value) for key, value in
                             float64.state_dict().items()}, assign=True)

    def course_step(network, batch):
        return loss_and_gradients(reference.protonet_step(network, batch)[0],
                                  network.parameters())

    def ours(learner):
        parameters = [p for conv, norm in zip(learner._network.convs, learner._network.norms)
                      for p in (*conv.parameters(), *norm.parameters())]
        return loss_and_gradients(learner._step(task_batch)[0], parameters)
    exact = course_step(float64, exact_batch(task_batch))
    return ({tasks: error_against(ours(learner), exact) for tasks, learner in learners.items()},
            error_against(course_step(float32, task_batch), exact))


def check_maml(task_batch, num_inner_steps, first_order, seed, device, log_dir):
    """Errors of MAML._outer_step, on each --tasks path, and of the course's outer step against
    the course's in float64, same weights (drawn with seed) and batch.

    Returns:
        ({tasks: ours}, reference): each the largest relative error of the loss or any
        meta-gradient
    """
    learners = seeded_learners(lambda tasks: maml.MAML(
        5, num_inner_steps, MAML_INNER_LR, False, LEARNING_RATE, log_dir, device,
        first_order=first_order, settings=training.RunSettings(tasks=tasks)), seed)
    meta_parameters = learners['loop']._meta_parameters
    inner_lrs = dict.fromkeys(meta_parameters, MAML_INNER_LR)

    def course_step(parameters, batch):
        """parameters: leaf tensors, on batch's device and of its floating-point dtype."""
        loss = reference.maml_outer_step(parameters, inner_lrs, batch, num_inner_steps,
                                         create_graph=not first_order)[0]
        return loss_and_gradients(loss, parameters.values())

    def ours(learner):
        return loss_and_gradients(learner._outer_step(task_batch, train=True)[0],
                                  learner._meta_parameters.values())
    exact = course_step({key: exact_copy(value).requires_grad_()
                         for key, value in meta_parameters.items()}, exact_batch(task_batch))
    return ({tasks: error_against(ours(learner), exact) for tasks, learner in learners.items()},
            error_against(course_step(reference.leaf_copies(meta_parameters), task_batch),
                          exact))


def check_numerics(batch_size, num_query, device, log_dir, seeds):
    """Every accuracy check on one seeded batch of batch_size tasks, num_query queries per
    class, for weights drawn with each seed, each path of ours against the same reference
    computations; prints them; True if all pass."""
    def task_batch(num_support):
        return next(iter(omniglot.get_omniglot_dataloader('train', batch_size, 5, num_support,
                                                          num_query, batch_size, device=device)))
    checks = {'ProtoNet 5w5s': functools.partial(check_protonet, task_batch(5))}
    for name, num_inner_steps, first_order in MAML_ROWS:
        checks[name] = functools.partial(check_maml, task_batch(1), num_inner_steps, first_order)
    errors = {}  # name -> [(ours, reference) for each seed]
    for name, check in checks.items():
        for seed in seeds:
            ours, theirs = check(seed, device, log_dir)
            for tasks, suffix in TASKS:
                errors.setdefault(name + suffix, []).append((ours[tasks], theirs))
    print(f'Float32 loss and gradients against the reference in float64, same batch of '
          f'{batch_size} tasks: largest relative error, the median over weights drawn with '
          f'seeds {seeds}')
    passed = True
    for name in [name + suffix for _, suffix in TASKS for name in checks]:
        ours, theirs = np.median(errors[name], axis=0)
        ok = ours <= max(RELATIVE_TOLERANCE, ACCURACY_MARGIN * theirs)
        passed &= ok
        print(f'  {name}: ours {ours:.1e}, reference {theirs:.1e} {"ok" if ok else "FAILED"}')
    return passed

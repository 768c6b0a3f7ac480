"""mamlpp.py: MAML++'s options (multi-step loss, per-step inner learning rates and batch norm,
derivative-order annealing, cosine outer learning rate) against weights and schedules worked out
by hand or by reference.py, alone and together; its checkpoints, flags and log dir.

As test_maml.py: float64 on tiny random tasks (its helpers)."""
import pytest
import torch
import torch.nn.functional as F

import maml
import mamlpp
import reference
import util
from test_maml import (KEYS, NUM_WAY, assert_dicts_close, meta_gradient, parse, tiny_tasks, train,
                       values)

pytestmark = pytest.mark.usefixtures('one_thread')  # tiny tensors
# A convolution's bias before batch norm has a gradient of rounding noise (zero in exact
# arithmetic), and so has its inner lr: whether either moves depends on the CPU's rounding.
NOISE_GRADIENTS = ('b0', 'b1', 'b2', 'b3')


def plus_model(tmp_path, num_inner_steps, plus, first_order=False):
    """A float64 MAML with the given MAML++ options, seeded."""
    torch.manual_seed(0)
    return reference.maml_in_float64(mamlpp.MAMLpp(NUM_WAY, num_inner_steps, 0.4, False, 0.001,
                                                   str(tmp_path), 'cpu', first_order,
                                                   options=plus))


def weights_after_each_step(parameters, lrs, images, labels, num_steps):
    """The reference's adapted weights after 1, 2, ..., num_steps steps (second order)."""
    return [reference.maml_adapt(parameters, lrs, images, labels, steps, create_graph=True)[0]
            for steps in range(1, num_steps + 1)]


def test_multi_step_loss_weights_worked_out_by_hand():
    # 5 steps: uniform 0.2; halfway, non-final 0.2 - 0.1, final 0.2 + 0.5 * 4 * 0.2; at the end
    # the floor 0.03 / 5 and 1 - 4 * 0.006.
    assert mamlpp.multi_step_loss_weights(5, 0) == pytest.approx([0.2] * 5)
    assert mamlpp.multi_step_loss_weights(5, 0.5) == pytest.approx([0.1] * 4 + [0.6])
    assert mamlpp.multi_step_loss_weights(5, 1) == pytest.approx([0.006] * 4 + [0.976])
    assert mamlpp.multi_step_loss_weights(1, 0.3) == pytest.approx([1.0])


def test_multi_step_loss_is_the_weighted_sum_worked_out_by_hand(tmp_path):
    tasks = tiny_tasks(seed=3)
    model = plus_model(tmp_path, 3, mamlpp.Options(msl_iterations=10))
    model._iteration = 5  # halfway: weights 1/3 - 1/6, 1/3 - 1/6, 1/3 + 0.5 * 2/3
    weights = [1 / 6, 1 / 6, 2 / 3]
    parameters, lrs = (reference.leaf_copies(tensors) for tensors in values(model))
    by_hand = sum(sum(w * F.cross_entropy(reference.maml_forward(phi, xq), yq)
                      for w, phi in zip(weights, weights_after_each_step(parameters, lrs, xs, ys,
                                                                         3)))
                  for xs, ys, xq, yq in tasks) / len(tasks)
    loss = model._outer_step(tasks, train=True)[0]
    torch.testing.assert_close(loss, by_hand, rtol=1e-12, atol=0)
    loss.backward()
    by_hand.backward()
    assert_dicts_close({k: v.grad for k, v in model._meta_parameters.items()},
                       {k: v.grad for k, v in parameters.items()}, rtol=1e-9, atol=1e-12)
    # after the annealing, and in evaluation, the last step's loss alone
    final = reference.maml_outer_step(parameters, lrs, tasks, 3)[0]
    model._iteration = 10
    torch.testing.assert_close(model._outer_step(tasks, train=True)[0], final, rtol=1e-12, atol=0)
    model._iteration = 5
    torch.testing.assert_close(model._outer_step(tasks, train=False)[0], final.detach(),
                               rtol=1e-12, atol=0)


def test_per_step_inner_lrs_are_used_step_by_step_and_learned(tmp_path):
    xs, ys, xq, yq = tiny_tasks(num_tasks=1, seed=4)[0]
    model = plus_model(tmp_path, 3, mamlpp.Options(per_step_inner_lrs=True))
    with torch.no_grad():
        for i, value in enumerate(model._inner_lrs.values()):
            assert value.shape == (3,) and value.requires_grad
            value.copy_(torch.tensor([0.1, 0.3, 0.05]) + 0.01 * i)
    expected = reference.leaf_copies(values(model)[0])
    for step in range(3):  # one reference step at a time, with that step's rates
        lrs = {k: v[step].item() for k, v in model._inner_lrs.items()}
        expected = reference.maml_adapt(expected, lrs, xs, ys, 1, create_graph=True)[0]
    adapted, _, _ = model._inner_loop(xs, ys, train=True)
    assert_dicts_close({k: v.detach() for k, v in adapted.items()},
                       {k: v.detach() for k, v in expected.items()}, rtol=1e-10, atol=1e-12)
    model._outer_step([(xs, ys, xq, yq)], train=True)[0].backward()
    for key, value in model._inner_lrs.items():
        assert torch.isfinite(value.grad).all() and (value.grad != 0).all(), key


def test_per_step_batch_norm_is_learned_and_each_row_is_used(tmp_path):
    tasks = tiny_tasks(seed=5)
    model = plus_model(tmp_path, 2, mamlpp.Options(per_step_bn=True))
    norms = model._step_norms
    assert sorted(norms) == sorted(f'{n}{i}' for i in range(4) for n in ('gamma', 'beta'))
    assert all(v.shape == (2, 32) and v.requires_grad for v in norms.values())
    loss = model._outer_step(tasks, train=True)[0]
    loss.backward()
    for key, value in norms.items():  # support forward at steps 0 and 1, query after step 1
        assert (value.grad.abs().sum(1) > 0).all(), key
    for row in range(2):  # row 0 acts only through the first inner gradient: a small change
        with torch.no_grad():
            norms['beta2'][row] += 1
            changed = model._outer_step(tasks, train=True)[0]
            norms['beta2'][row] -= 1
        assert abs(changed.item() - loss.item()) > 1e-9, f'row {row} is not used'


def test_neutral_options_compute_plain_maml_bit_for_bit(tmp_path):
    """Per-step rates all equal to the plain one and batch norm 1 and 0: the same numbers."""
    tasks = tiny_tasks(seed=6)
    plain = plus_model(tmp_path, 2, mamlpp.Options())
    plus = plus_model(tmp_path, 2, mamlpp.Options(per_step_inner_lrs=True, per_step_bn=True,
                                                 first_order_iterations=0, msl_iterations=0))
    results = [meta_gradient(model, tasks)[0] for model in (plain, plus)]
    assert_dicts_close(results[1], results[0], rtol=0, atol=0)


def test_derivative_order_switches_at_the_configured_iteration(tmp_path):
    """Before the switch the meta-gradient is the reference's first-order one, from it the
    reference's second-order one (reference.maml_outer_step with and without create_graph)."""
    tasks = tiny_tasks(seed=7)
    parameters, lrs = values(plus_model(tmp_path, 2, mamlpp.Options()))
    expected = {}
    for first_order in (True, False):
        leaves = reference.leaf_copies(parameters)
        reference.maml_outer_step(leaves, lrs, tasks, 2, create_graph=not first_order)[
            0].backward()
        expected[first_order] = {k: v.grad for k, v in leaves.items()}
    for k in KEYS:  # the two differ, so each comparison below can fail
        assert (expected[True][k] - expected[False][k]).norm() > 1e-3 * expected[False][k].norm()
    for iteration, first_order in [(0, True), (3, True), (4, False), (9, False)]:
        model = plus_model(tmp_path, 2, mamlpp.Options(first_order_iterations=4))
        model._iteration = iteration
        assert_dicts_close(meta_gradient(model, tasks)[0], expected[first_order], rtol=1e-9,
                           atol=1e-12)


def test_outer_learning_rate_follows_the_cosine(tmp_path):
    model = plus_model(tmp_path, 1, mamlpp.Options(cosine_iterations=6))
    theirs = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.001)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=6, eta_min=1e-5)
    for step in range(8):  # past the end, the rate stays at its minimum
        model._train_step(tiny_tasks(seed=step), step)
        assert model._optimizer.param_groups[0]['lr'] == pytest.approx(
            theirs.param_groups[0]['lr'] if step <= 6 else 1e-5, rel=1e-12)
        theirs.step()
        schedule.step()


def test_mamlpp_checkpoints_every_parameter_and_resumes_exactly(tmp_path):
    """Resumed at 3, across the end of the multi-step loss (5), the switch to second order (5)
    and the cosine (6): the same parameters as training straight through."""
    plus = mamlpp.Options(msl_iterations=5, first_order_iterations=5, per_step_inner_lrs=True,
                         per_step_bn=True, cosine_iterations=6)
    straight = train(tmp_path / 'a', 7, -1, 3, plus, num_inner_steps=2)
    train(tmp_path / 'b', 4, -1, 3, plus, num_inner_steps=2)
    checkpoint = torch.load(tmp_path / 'b' / 'state3.pt', weights_only=True)
    assert all(v.shape == (2,) for v in checkpoint['inner_lrs'].values())
    assert len(checkpoint['step_norms']) == 8
    assert all(v.shape == (2, 32) for v in checkpoint['step_norms'].values())
    resumed = train(tmp_path / 'b', 7, 3, 100, plus, num_inner_steps=2)
    for name in ('meta_parameters', 'inner_lrs', 'step_norms'):
        assert_dicts_close(*({k: v.detach() for k, v in getattr(model, '_' + name).items()}
                             for model in (resumed, straight)), rtol=0, atol=0)
        moved = [k for k, v in getattr(resumed, '_' + name).items()
                 if not torch.equal(v.detach(), checkpoint[name][k]) and k not in NOISE_GRADIENTS]
        expected = [k for k in checkpoint[name] if k not in NOISE_GRADIENTS]
        assert moved == expected, f'{name} did not all move after resuming'
    assert resumed._optimizer.param_groups[0]['lr'] == straight._optimizer.param_groups[0]['lr']


def test_mamlpp_flags_and_log_dir():
    args = parse(['--mamlpp', '--num_train_iterations', '3000'])
    assert mamlpp.options(args) == mamlpp.Options(
        msl_iterations=240, first_order_iterations=1000, per_step_inner_lrs=True,
        per_step_bn=True, cosine_iterations=3000)
    assert maml.default_log_dir(args).endswith('.batch_size_16.mamlpp_True')
    args = parse(['--per_step_bn', '--cosine_outer_lr'])
    assert mamlpp.options(args) == mamlpp.Options(per_step_bn=True, cosine_iterations=15000)
    assert maml.default_log_dir(args).endswith('.per_step_bn_True.cosine_outer_lr_True')
    assert mamlpp.options(parse([])) is None


def test_mamlpp_checkpoint_with_other_inner_steps_is_a_clear_error(tmp_path):
    mamlpp.MAMLpp(NUM_WAY, 2, 0.4, False, 0.001, str(tmp_path), 'cpu',
                  options=mamlpp.Options(per_step_inner_lrs=True))._save(0)
    tested = mamlpp.MAMLpp(NUM_WAY, 5, 0.4, False, 0.001, str(tmp_path), 'cpu',
                           options=mamlpp.Options(per_step_inner_lrs=True))
    with pytest.raises(util.UserError, match='per-step-lrs-2 model, but these flags build a '
                                             '.*per-step-lrs-5 model'):
        tested.load(0)

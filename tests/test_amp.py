"""--amp bf16: bfloat16 autocast in the shared loop, close to float32, finite MAML meta-gradients."""
import argparse

import pytest
import torch
from torch import nn

import maml
import protonet
import training


class DtypeRecorder(nn.Module):
    """A tiny ProtoNet learner that records the dtype its linear layer computes in."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(28 * 28, 8)
        self.dtypes = []

    def forward(self, images):
        """One task's images (examples, 1, 28, 28) -> latents (examples, 8)."""
        latents = self.linear(images.flatten(1))
        self.dtypes.append(latents.dtype)
        return latents


def test_amp_flag_defaults_to_float32_and_accepts_only_known_values():
    parser = argparse.ArgumentParser()
    training.add_common_args(parser, num_train_iterations=10)
    assert parser.parse_args([]).amp == 'none'
    assert parser.parse_args(['--amp', 'bf16']).amp == 'bf16'
    with pytest.raises(SystemExit):
        parser.parse_args(['--amp', 'fp16'])


def test_bf16_autocast_applies_to_training_validation_and_test_only_when_asked(
        tmp_path, omniglot_batch):
    recorder = DtypeRecorder()
    model = protonet.ProtoNet(0.001, str(tmp_path), 'cpu', learner=recorder)
    task_batch = omniglot_batch(batch_size=2, num_way=3, num_support=1, num_query=2)
    model._train_step(task_batch, step=0)
    assert set(recorder.dtypes) == {torch.float32}
    recorder.dtypes.clear()
    model = protonet.ProtoNet(0.001, str(tmp_path), 'cpu', learner=recorder, amp='bf16')
    model._train_step(task_batch, step=1)
    model.validate([task_batch])
    model.test([task_batch])
    assert set(recorder.dtypes) == {torch.bfloat16}
    # The parameters, their gradients and Adam's state stay float32.
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in recorder.parameters())


def test_bf16_protonet_loss_and_gradients_are_close_to_float32(tmp_path, omniglot_batch):
    task_batch = omniglot_batch(batch_size=2, num_way=5, num_support=5, num_query=5)  # bf16 emulated here
    results = {}
    for amp in training.AMP_CHOICES:
        torch.manual_seed(0)  # the same weights for both
        model = protonet.ProtoNet(0.001, str(tmp_path), 'cpu', amp=amp)
        with model._autocast():
            loss, _ = model._evaluate(task_batch, train=True)
        loss.backward()
        assert loss.dtype == torch.float32
        results[amp] = loss.item(), torch.cat([p.grad.flatten() for p in
                                               model._network.parameters()])
    (loss32, grad32), (loss16, grad16) = results['none'], results['bf16']
    assert loss16 == pytest.approx(loss32, rel=0.02)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99


def maml_meta_gradient(tmp_path, task_batch, num_inner_steps, amp, first_order):
    """(loss, metrics, every meta-gradient flat: the weights' and the learned inner lrs') of a
    seeded 5-way MAML on task_batch, under the training loop's autocast."""
    torch.manual_seed(0)  # the same weights for all
    model = maml.MAML(5, num_inner_steps, 0.4, True, 0.001, str(tmp_path), 'cpu',
                      first_order=first_order, settings=training.RunSettings(amp=amp))
    with model._autocast():
        loss, metrics = model._evaluate(task_batch, train=True)
    loss.backward()
    gradients = [value.grad for name in ('_meta_parameters', '_inner_lrs')
                 for value in getattr(model, name).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in gradients)
    return loss, metrics, torch.cat([g.flatten() for g in gradients])


@pytest.mark.parametrize('num_inner_steps', [1, 5])
def test_bf16_maml_second_order_meta_gradients_are_close_to_float32_second_order(
        tmp_path, omniglot_batch, num_inner_steps):
    """bfloat16's second-order meta-gradient is near float32's second-order one, much nearer
    than float32's first-order one is (measured: 0.14 and 0.32 of its norm away, against 0.70
    and 0.85 for first order, with 1 and 5 inner steps), so a bfloat16 path that silently
    dropped the second-order term would fail."""
    task_batch = omniglot_batch(batch_size=2, num_way=5, num_support=1, num_query=15)
    loss, metrics, bf16 = maml_meta_gradient(tmp_path, task_batch, num_inner_steps, 'bf16',
                                             False)
    assert torch.isfinite(loss) and torch.isfinite(metrics['post_adapt_query']).all()
    _, _, second = maml_meta_gradient(tmp_path, task_batch, num_inner_steps, 'none', False)
    _, _, first = maml_meta_gradient(tmp_path, task_batch, num_inner_steps, 'none', True)
    error = (bf16 - second).norm() / second.norm()
    first_order_distance = (first - second).norm() / second.norm()
    assert error < 0.6 * first_order_distance, (error, first_order_distance)
    assert (bf16 - first).norm() > (bf16 - second).norm()
    assert torch.nn.functional.cosine_similarity(bf16, second, dim=0) > 0.9

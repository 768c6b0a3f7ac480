"""sampling.py's TaskBatch: one tensor per part from the sampler to the step, and to the
assignment's code its list of task tuples; both forms give a step the same numbers."""
import pytest
import torch

import distributed
import maml
import omniglot
import protonet
import sampling


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return next(iter(omniglot.get_omniglot_dataloader('train', 4, 3, 2, 3, 4)))


def test_a_task_batch_is_the_assignment_s_list_of_task_tuples(batch):
    assert isinstance(batch, sampling.TaskBatch) and len(batch) == 4
    tasks = list(batch)
    assert all(isinstance(task, tuple) and len(task) == 4 for task in tasks)
    for part, whole in zip(sampling.stacked(tasks), batch.parts, strict=True):
        assert torch.equal(part, whole)
    assert [tuple(t.shape) for t in tasks[1]] == [(6, 1, 28, 28), (6,), (9, 1, 28, 28), (9,)]
    assert tasks[1][1].tolist() == [0, 0, 1, 1, 2, 2]


def test_stacked_hands_over_the_batch_s_own_tensors(batch):
    assert all(part is whole for part, whole in zip(sampling.stacked(batch), batch.parts))


def test_a_slice_is_a_task_batch_of_the_same_tasks(batch):
    share = batch[1::2]
    assert isinstance(share, sampling.TaskBatch) and len(share) == 2
    for task, expected in zip(share, list(batch)[1::2], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(task, expected, strict=True))
    whole = distributed.share(batch)  # one process: all of it, still one tensor per part
    assert isinstance(whole, sampling.TaskBatch)
    assert all(torch.equal(a, b) for a, b in zip(whole.parts, batch.parts, strict=True))


@pytest.mark.parametrize('learner', ['ProtoNet', 'MAML'])
def test_a_step_gives_the_same_numbers_on_the_batch_and_on_its_list(tmp_path, batch, learner):
    def loss_and_gradients(task_batch):
        torch.manual_seed(0)
        if learner == 'ProtoNet':
            model = protonet.ProtoNet(0.001, str(tmp_path), 'cpu')
            loss, parameters = model._step(task_batch)[0], list(model._network.parameters())
        else:
            model = maml.MAML(3, 1, 0.4, False, 0.001, str(tmp_path), 'cpu')
            loss = model._outer_step(task_batch, train=True)[0]
            parameters = list(model._meta_parameters.values())
        return [loss, *torch.autograd.grad(loss, parameters)]
    for ours, theirs in zip(loss_and_gradients(batch), loss_and_gradients(list(batch)),
                            strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

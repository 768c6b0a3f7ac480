"""Plain reference implementations of ProtoNet and MAML, written the way the course's staff
code is: an nn.Sequential of the assignment's layers, functional MAML layers with
torch.autograd.grad for the inner loop, one task at a time, every step spelled out.

They share nothing with protonet.py and maml.py but the equations, so grader.py and the tests
check ours against them (in float64 where float32 rounding would blur the comparison), and the
benchmark times them as the course-style baseline.
"""
import torch
import torch.nn.functional as F
from torch import nn

MAML_KEYS = ['conv0', 'b0', 'conv1', 'b1', 'conv2', 'b2', 'conv3', 'b3', 'w4', 'b4']


def accuracy(logits, labels):
    """Fraction of rows of logits (n, classes) whose argmax is the label (n,), a float."""
    return (logits.argmax(1) == labels).float().mean().item()


def to_float64(task_batch):
    """A batch of task tuples with every floating-point tensor in float64."""
    return [tuple(t.double() if t.is_floating_point() else t for t in task) for task in task_batch]


def leaf_copies(tensors, dtype=None):
    """Copies of tensors (a dict or a list), optionally cast, that are leaves requiring grad."""
    def copy(value):
        return value.detach().to(dtype or value.dtype, copy=True).requires_grad_()
    if isinstance(tensors, dict):
        return {key: copy(value) for key, value in tensors.items()}
    return [copy(value) for value in tensors]


# ----- ProtoNet -----
def protonet_network(num_layers=4, channels=64):
    """The course's ProtoNetNetwork: num_layers x [conv 3x3 'same' -> BatchNorm2d -> ReLU ->
    max pool 2], then flatten; in train mode, so batch norm uses each call's batch."""
    layers, in_channels = [], 1
    for _ in range(num_layers):
        layers += [nn.Conv2d(in_channels, channels, 3, padding='same'), nn.BatchNorm2d(channels),
                   nn.ReLU(), nn.MaxPool2d(2)]
        in_channels = channels
    return nn.Sequential(*layers, nn.Flatten()).train()


def protonet_network_like(network):
    """A course network holding the weights of a ProtoNetNetwork (its convs[i] and norms[i])."""
    ours = [p for conv, norm in zip(network.convs, network.norms)
            for p in (conv.weight, conv.bias, norm.weight, norm.bias)]
    reference = protonet_network(len(network.convs), network.convs[0].out_channels).to(
        ours[0].device, ours[0].dtype)
    with torch.no_grad():
        for theirs, mine in zip(reference.parameters(), ours, strict=True):
            theirs.copy_(mine)
    return reference


def protonet_step(network, task_batch):
    """The course's ProtoNet._step: one task at a time, prototypes as class means.

    Args:
        network (nn.Module): maps images (n, 1, 28, 28) to latents (n, latents)
        task_batch (list of tuple): (images_support (N*K, 1, 28, 28), labels_support (N*K,),
            images_query (N*Q, 1, 28, 28), labels_query (N*Q,)), class-major labels 0..N-1

    Returns:
        mean query loss (0-dim Tensor), mean support accuracy, mean query accuracy (floats)
    """
    device = next(network.parameters()).device
    losses, accuracies_support, accuracies_query = [], [], []
    for task in task_batch:
        images_support, labels_support, images_query, labels_query = (t.to(device) for t in task)
        latents_support, latents_query = network(images_support), network(images_query)
        prototypes = torch.stack([latents_support[labels_support == c].mean(0)
                                  for c in range(len(labels_support.unique()))])

        def logits(latents):
            return -((latents[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)

        losses.append(F.cross_entropy(logits(latents_query), labels_query))
        accuracies_support.append(accuracy(logits(latents_support), labels_support))
        accuracies_query.append(accuracy(logits(latents_query), labels_query))
    return (torch.stack(losses).mean(), sum(accuracies_support) / len(task_batch),
            sum(accuracies_query) / len(task_batch))


# ----- MAML -----
def maml_forward(parameters, images):
    """The course's MAML._forward: 4 x [conv 3x3 pad 1 -> batch norm with batch statistics, no
    affine -> ReLU], mean over positions, linear.

    Args:
        parameters (dict[str, Tensor]): keys MAML_KEYS; conv{i} (32, in, 3, 3), b{i} (32,),
            w4 (num_outputs, 32), b4 (num_outputs,)
        images (Tensor): shape (n, 1, height, width), any height and width

    Returns:
        logits, shape (n, num_outputs)
    """
    x = images
    for i in range(4):
        x = F.conv2d(x, parameters[f'conv{i}'], parameters[f'b{i}'], padding=1)
        x = F.relu(F.batch_norm(x, None, None, training=True))
    return x.mean(dim=(2, 3)) @ parameters['w4'].t() + parameters['b4']


def maml_adapt(parameters, inner_lrs, images, labels, num_steps, create_graph):
    """Plain gradient descent on one task's support loss.

    Args:
        parameters (dict[str, Tensor]): starting weights, requiring grad
        inner_lrs (dict[str, float or Tensor]): learning rate of each weight
        images (Tensor): support images, shape (n, 1, height, width)
        labels (Tensor): support labels, shape (n,)
        num_steps (int): inner steps
        create_graph (bool): differentiable inner gradients (second order)

    Returns:
        adapted weights (dict); support accuracies before each step and after the last (list
        of num_steps + 1 floats); each step's gradients (list of dicts)
    """
    accuracies, steps = [], []
    for _ in range(num_steps):
        logits = maml_forward(parameters, images)
        accuracies.append(accuracy(logits, labels))
        gradients = torch.autograd.grad(F.cross_entropy(logits, labels),
                                        list(parameters.values()), create_graph=create_graph)
        steps.append(dict(zip(parameters, gradients)))
        parameters = {key: value - inner_lrs[key] * steps[-1][key]
                      for key, value in parameters.items()}
    with torch.no_grad():
        accuracies.append(accuracy(maml_forward(parameters, images), labels))
    return parameters, accuracies, steps


def maml_outer_step(parameters, inner_lrs, task_batch, num_steps, create_graph=True):
    """The course's MAML._outer_step: adapt to each task's support set, then the query loss.

    Args:
        parameters (dict[str, Tensor]): meta-parameters, requiring grad
        inner_lrs (dict[str, float or Tensor]): learning rate of each weight
        task_batch (list of tuple): task tuples as for protonet_step
        num_steps (int): inner steps
        create_graph (bool): second order (True) or first order (False)

    Returns:
        mean query loss (0-dim Tensor, with grad), support accuracies averaged over tasks
        (list of num_steps + 1 floats), mean query accuracy (float)
    """
    device = next(iter(parameters.values())).device
    losses, accuracies_support, accuracies_query = [], [], []
    for task in task_batch:
        images_support, labels_support, images_query, labels_query = (t.to(device) for t in task)
        adapted, accuracies, _ = maml_adapt(parameters, inner_lrs, images_support,
                                            labels_support, num_steps, create_graph)
        logits = maml_forward(adapted, images_query)
        losses.append(F.cross_entropy(logits, labels_query))
        accuracies_support.append(accuracies)
        accuracies_query.append(accuracy(logits, labels_query))
    return (torch.stack(losses).mean(),
            [sum(step) / len(task_batch) for step in zip(*accuracies_support)],
            sum(accuracies_query) / len(task_batch))


# ----- transfer learning -----
def transfer_learn(parameters, task, num_steps, learning_rate):
    """The second handout's transfer baseline on one task: maml_forward's features (frozen),
    a new zero-initialised linear classifier fitted by num_steps steps of plain gradient descent
    on the support loss (autograd), then the query set.

    Args:
        parameters (dict[str, Tensor]): pre-trained weights, keys MAML_KEYS (w4, b4 unused)
        task (tuple): as for protonet_step
        num_steps (int): gradient steps
        learning_rate (float): their step size

    Returns:
        query loss (0-dim Tensor), support accuracy and query accuracy (floats)
    """
    images_support, labels_support, images_query, labels_query = task
    width = parameters['conv0'].shape[0]
    features = dict(parameters, w4=torch.eye(width).to(parameters['conv0']),
                    b4=torch.zeros(width).to(parameters['conv0']))
    with torch.no_grad():
        features_support = maml_forward(features, images_support)
        features_query = maml_forward(features, images_query)
    num_way = len(labels_support.unique())
    weight = features_support.new_zeros(num_way, width, requires_grad=True)
    bias = features_support.new_zeros(num_way, requires_grad=True)
    with torch.enable_grad():
        for _ in range(num_steps):
            loss = F.cross_entropy(features_support @ weight.t() + bias, labels_support)
            loss.backward()
            with torch.no_grad():
                weight -= learning_rate * weight.grad
                bias -= learning_rate * bias.grad
            weight.grad = bias.grad = None
    with torch.no_grad():
        logits_query = features_query @ weight.t() + bias
        return (F.cross_entropy(logits_query, labels_query),
                accuracy(features_support @ weight.t() + bias, labels_support),
                accuracy(logits_query, labels_query))


# ----- metabolism tasks -----
def metabolism_tasks(features, class_rows, set_idxs, num_support, num_query, generator):
    """Binary tasks drawn one task and one class at a time: for each class of the task's data
    set, a random permutation of its molecules (generator, on the CPU) moved to the data's
    device, the first num_support for the support set and the next num_query for the query.

    Args:
        features (list of Tensor): each data set's features, shape (n_i, 1024)
        class_rows (list of list of Tensor): class_rows[i][c], the rows of data set i whose
            label is c, int64 on the features' device
        set_idxs (Tensor): int64 data set of each task, shape (num_tasks,)
        num_support, num_query (int): molecules per class
        generator (torch.Generator): a CPU generator

    Returns:
        list of task tuples, as metabolism.MetabolismDataset.make_tasks gives them one by one
    """
    tasks = []
    for set_idx in set_idxs.tolist():
        support, query = [], []
        for rows in class_rows[set_idx]:
            order = torch.randperm(len(rows), generator=generator)[:num_support + num_query]
            rows = rows[order.to(rows.device)]
            support.append(features[set_idx][rows[:num_support]])
            query.append(features[set_idx][rows[num_support:]])
        classes = torch.arange(len(support), device=features[set_idx].device)
        tasks.append((torch.cat(support), classes.repeat_interleave(num_support),
                      torch.cat(query), classes.repeat_interleave(num_query)))
    return tasks


def maml_in_float64(model):
    """A maml.MAML with every tensor its optimizer holds (meta-parameters, inner learning rates,
    any MAML++ parameters) cast to float64 in place: they stay the same objects."""
    for value in model._optimizer.param_groups[0]['params']:
        value.data = value.data.double()
    return model

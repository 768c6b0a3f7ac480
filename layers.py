"""Layers the learners share: batch norm with each task's own statistics, and ProtoNet's first
layer, convolution then batch norm, as one matrix product.

A 'same' convolution maps each input patch (with a constant 1 for the bias) linearly to its
output, and batch norm with the batch's own statistics maps each channel affinely, so the two
fold into one (channels, patch size + 1) matrix applied to the patches. For a first layer the
patch is small (1 input channel, 3x3: 9 + 1 numbers) while the output is large (64 channels
at 28x28), so this replaces a convolution, its weight gradient and two batch-norm passes over
the large output by one product and its transpose (benchmarks/README.md measures it).
"""
import torch
import torch.nn.functional as F
from torch import nn

DEVICES_WITHOUT_FLOAT64 = ('mps',)  # Apple's GPUs: "Cannot convert a MPS Tensor to float64"


class TaskBatchNorm(nn.Module):
    """Batch norm with the statistics of the batch it is given, one task's, in training and
    evaluation alike, and no running statistics (nothing to update under torch.func.vmap).

    Equal to nn.BatchNorm in train mode applied to one task.
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.eps = eps

    def forward(self, x):
        """x: one task's (examples, channels, *spatial) -> same shape, with its own statistics."""
        return F.batch_norm(x, None, None, *in_dtype_of(x, self.weight, self.bias), training=True,
                            eps=self.eps)


def autocast_inputs(*tensors):
    """tensors in the dtype that autocast runs a convolution or matrix product in: its lower
    precision where autocast is on for their device, else unchanged (None stays None).

    Without torch.func.vmap this is what autocast does anyway; under vmap, autocast does not
    reach these operations on the CPU (it leaves them in float32, or mixes dtypes that batch
    norm's backward then refuses; pytorch/pytorch#192617, #184890), so the functions that run
    under vmap cast for it.
    """
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def one_hot(labels, num_classes, dtype):
    """F.one_hot(labels, num_classes).to(dtype) by comparison: F.one_hot checks the labels'
    range by reading them back on the CPU, a wait that a training step must not have.

    Args:
        labels (Tensor): int64, any shape, values 0..num_classes-1
    Returns:
        Tensor of shape labels.shape + (num_classes,)
    """
    return (labels[..., None] == torch.arange(num_classes, device=labels.device)).to(dtype)


def at_least_float32(x):
    """bfloat16 x (from autocast) as float32; float32 and float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def in_dtype_of(x, *tensors):
    """tensors (batch norm's weight and bias, or None) in x's dtype: bfloat16 under autocast,
    where vmap's batch norm needs one dtype for all (see autocast_inputs)."""
    return tuple(None if t is None else t.to(x.dtype) for t in tensors)


def conv_batch_norm(images, weight, bias, norm_weight=None, norm_bias=None, eps=1e-5):
    """F.batch_norm(F.conv2d(images, weight, bias, padding='same'), None, None, norm_weight,
    norm_bias, training=True, eps=eps), with gradients through the statistics as batch norm.

    The statistics come from the patches' second moments in float64 (exact_dtype), so they
    are exact where batch norm sums in float32; the product runs in the input's precision
    (bfloat16 under autocast, as a convolution would).

    Args:
        images (Tensor): shape (examples, in_channels, height, width)
        weight (Tensor): shape (channels, in_channels, kernel, kernel), kernel odd
        bias (Tensor): shape (channels,)
        norm_weight, norm_bias (Tensor or None): shape (channels,); None: no affine

    Returns:
        Tensor of shape (examples, channels, height, width) in channels_last memory format
    """
    examples, _, height, width = images.shape
    kernel = weight.shape[-1]
    patches = F.unfold(images, kernel, padding=kernel // 2)
    patches = torch.cat([patches, torch.ones_like(patches[:, :1])], 1)
    patches = patches.transpose(1, 2).reshape(examples * height * width, -1)
    with torch.autocast(images.device.type, enabled=False):
        fused = fused_affine(patches, weight, bias, norm_weight, norm_bias, eps)
    outputs = patches @ fused.to(patches.dtype).T
    return outputs.view(examples, height, width, -1).permute(0, 3, 1, 2)


def fused_affine(patches, weight, bias, norm_weight, norm_bias, eps):
    """The (channels, patch size + 1) matrix that maps a patch (and 1) to its normalised output.

    Args:
        patches (Tensor): shape (positions, patch size + 1), the last column all ones
        weight, bias, norm_weight, norm_bias: as conv_batch_norm

    Returns:
        Tensor of shape (channels, patch size + 1), in exact_dtype
    """
    dtype = exact_dtype(patches.device)
    patches = patches.to(dtype)
    moments = patches.T @ patches / len(patches)  # E[p p^T]; its last row is E[p]
    affine = torch.cat([weight.flatten(1), bias[:, None]], 1).to(dtype)
    mean = affine @ moments[-1]
    variance = ((affine @ moments) * affine).sum(1) - mean ** 2
    scale = torch.rsqrt(variance + eps)
    shift = -mean * scale
    if norm_weight is not None:
        scale, shift = scale * norm_weight, shift * norm_weight + norm_bias
    return torch.cat([affine[:, :-1] * scale[:, None], (affine[:, -1] * scale + shift)[:, None]], 1)


def exact_dtype(device):
    """float64 where the device has it; float32 on those without (DEVICES_WITHOUT_FLOAT64),
    where the first layer's statistics then round as batch norm's own float32 sums do."""
    return torch.float32 if device.type in DEVICES_WITHOUT_FLOAT64 else torch.float64


def hidden_layers_format(x):
    """The first layer's output x (channels_last, as conv_batch_norm returns it) in the memory
    format for the layers after it.

    Kept channels_last under bfloat16 autocast, where convolutions and max pooling run faster;
    NCHW in float32, because CPU batch norm in channels_last sums its statistics less
    accurately. (Keeping the format, not asking for channels_last, also works under
    torch.func.vmap, which cannot convert a tensor to it.)
    """
    return x if torch.is_autocast_enabled(x.device.type) else x.contiguous()

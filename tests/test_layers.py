"""layers.py: the fused first layer equals convolution then batch norm, to the second derivative."""
import pytest
import torch
import torch.nn.functional as F

import layers


def plain(images, weight, bias, norm_weight=None, norm_bias=None):
    return F.batch_norm(F.conv2d(images, weight, bias, padding='same'), None, None,
                        norm_weight, norm_bias, training=True)


def inputs(in_channels=1, channels=8, dtype=torch.float64, affine=True, seed=0):
    """Binary images (as Omniglot's) and random weights that require grad."""
    generator = torch.Generator().manual_seed(seed)
    images = (torch.rand(6, in_channels, 9, 11, generator=generator) > 0.7).to(dtype)
    weight = torch.randn(channels, in_channels, 3, 3, generator=generator, dtype=dtype)
    bias = torch.randn(channels, generator=generator, dtype=dtype)
    norm = ([1 + torch.rand(channels, generator=generator, dtype=dtype),
             torch.randn(channels, generator=generator, dtype=dtype)] if affine else [])
    return images, [p.requires_grad_() for p in [weight, bias, *norm]]


@pytest.mark.parametrize('in_channels,affine', [(1, True), (1, False), (2, True)])
def test_values_and_gradients_equal_conv_then_batch_norm(in_channels, affine):
    images, parameters = inputs(in_channels, affine=affine)
    ours = layers.conv_batch_norm(images, *parameters)
    expected = plain(images, *parameters)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    upstream = torch.randn_like(expected)
    gradients = torch.autograd.grad((ours * upstream).sum(), parameters)
    expected_gradients = torch.autograd.grad((expected * upstream).sum(), parameters)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-9, atol=1e-10)
    assert gradients[1].abs().max() < 1e-12  # the bias cancels in batch norm


def test_second_derivatives_equal_conv_then_batch_norm():
    """MAML differentiates the inner gradient: compare d/dw of a function of d loss/dw."""
    images, parameters = inputs()

    def second_order(layer):
        outputs = layer(images, *parameters)
        loss = (outputs.relu() * torch.linspace(-1, 1, outputs.numel(),
                                                dtype=outputs.dtype).view_as(outputs)).sum()
        gradient = torch.autograd.grad(loss, parameters[0], create_graph=True)[0]
        return torch.autograd.grad(gradient.pow(2).sum(), parameters)

    for ours, expected in zip(second_order(layers.conv_batch_norm), second_order(plain)):
        torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-10)


def test_float32_is_at_least_as_accurate_as_conv_then_batch_norm():
    images, parameters = inputs(channels=64, dtype=torch.float32)
    images64, parameters64 = images.double(), [p.detach().double() for p in parameters]
    exact = plain(images64, *parameters64)

    def error(layer):
        return ((layer(images, *parameters).double() - exact).norm() / exact.norm()).item()
    assert error(layers.conv_batch_norm) <= max(2 * error(plain), 1e-6)


def test_bfloat16_autocast_runs_the_product_in_bfloat16_and_switches_to_channels_last():
    images, parameters = inputs(channels=16, dtype=torch.float32)
    expected = plain(images, *parameters)
    assert layers.hidden_layers_format(layers.conv_batch_norm(images, *parameters)).is_contiguous()
    with torch.autocast('cpu', torch.bfloat16):
        ours = layers.conv_batch_norm(images, *parameters)
        assert layers.hidden_layers_format(ours).is_contiguous(memory_format=torch.channels_last)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected, rtol=2e-2, atol=5e-2)

"""capture/outputs.py: conv maps pooled with equal windows give exactly what adaptive pooling gives."""

import itertools

import pytest
import torch
from torch.nn import functional as F

from lightning_repsim.capture.outputs import _adaptive_avg_pool, reduce_output

ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_pooling_gives_bit_for_bit_what_adaptive_pooling_gives(dims, dtype):
    """Every (side, target) pair, equal windows (the fast path where their side is a power of two) or not."""
    g = torch.Generator().manual_seed(dims)
    sides = {1: [6, 8, 12, 32, 64], 2: [4, 8, 12, 16, 32], 3: [2, 4, 8, 12]}[dims]
    for side, out in itertools.product(sides, [1, 2, 3, 4, 8]):
        if out >= side:
            continue
        for _ in range(3):
            x = torch.randn(5, 3, *[side] * dims, generator=g, dtype=dtype) * 10 + 3
            expected = ADAPTIVE[dims](x, [out] * dims)
            assert torch.equal(_adaptive_avg_pool(x, [out] * dims), expected), (side, out)
    if dims == 2:  # a channels-last map, and one with different sides
        x = torch.randn(4, 6, 16, 8, generator=g, dtype=dtype).to(memory_format=torch.channels_last)
        assert torch.equal(_adaptive_avg_pool(x, [4, 4]), F.adaptive_avg_pool2d(x, [4, 4]))
        x = torch.randn(4, 6, 32, 8, generator=g, dtype=dtype)
        assert torch.equal(_adaptive_avg_pool(x, [4, 2]), F.adaptive_avg_pool2d(x, [4, 2]))


def test_unequal_windows_still_pool_adaptively():
    x = torch.randn(2, 3, 10, 7)
    assert torch.equal(_adaptive_avg_pool(x, [3, 3]), F.adaptive_avg_pool2d(x, [3, 3]))
    assert reduce_output(x, max_features=27).shape == (2, 27)


def test_a_conv_layer_reduces_as_before():
    """The ResNet-like stem's case: 16 channels of 32 x 32 pooled to 4 x 4 for max_features=256."""
    x = torch.randn(6, 16, 32, 32)
    assert torch.equal(reduce_output(x, max_features=256), F.adaptive_avg_pool2d(x, 4).reshape(6, -1))

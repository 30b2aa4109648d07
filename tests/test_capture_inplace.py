"""Captured features never alias a module's output (issue 12): an in-place operation after a selected
layer (``nn.ReLU(inplace=True)``, a ResNet block's ``out += identity``) must not change what was
recorded. Checked against the true outputs of a manual forward, for every reduction path that could
return a view (a 2-D output as is, a conv map flattened as is, a first / last token)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_repsim.capture import capture, reduce_output

C, S = 4, 6  # block channels and side: C * S * S = 144 <= max_features, so conv maps are flattened as is


class InplaceMLP(nn.Module):
    """5-8-3 MLP whose hidden Linear is followed by an in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(5, 8)
        self.act = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc1(self.act(self.fc0(x)))

    def true_outputs(self, x):
        hidden = self.fc0(x)
        return {"fc0": hidden.clone(), "fc1": self.fc1(torch.relu(hidden))}


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: in-place ReLUs and ``out += identity`` after the last BatchNorm."""

    def __init__(self, channels=C):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        g = torch.Generator().manual_seed(3)
        for bn in (self.bn1, self.bn2):  # eval-mode statistics that make every output non-trivial
            bn.running_mean.copy_(torch.randn(channels, generator=g))
            bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
            bn.weight.data.copy_(torch.randn(channels, generator=g))
            bn.bias.data.copy_(torch.randn(channels, generator=g))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)

    def true_outputs(self, x):
        """Every parameterised layer's output by a manual forward without any in-place operation."""
        c1 = self.conv1(x)
        b1 = self.bn1(c1)
        c2 = self.conv2(torch.relu(b1))
        b2 = self.bn2(c2)
        return {"conv1": c1, "bn1": b1, "conv2": c2, "bn2": b2}


class ResNetLike(nn.Module):
    """A residual block, then the MLP head: both in-place cases in one model (for the callback)."""

    def __init__(self):
        super().__init__()
        self.block = BasicBlock()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc0 = nn.Linear(C, 8)
        self.act = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc1(self.act(self.fc0(self.flat(self.pool(self.block(x))))))

    def true_features(self, x):
        """``{layer: (n, p)}`` of every parameterised leaf, as capture() names and reduces them."""
        with torch.no_grad():
            block = {f"block.{k}": v.flatten(1) for k, v in self.block.true_outputs(x).items()}
            pooled = self.block(x.clone()).mean((2, 3))
            hidden = self.fc0(pooled)
            return {**block, "fc0": hidden, "fc1": self.fc1(torch.relu(hidden))}


def _probe(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch_size", [None, 7])
def test_linear_before_an_inplace_relu_keeps_its_own_output(batch_size):
    torch.manual_seed(0)
    net, x = InplaceMLP().eval(), _probe((20, 5))
    with torch.no_grad():
        expected = net.true_outputs(x)
    assert bool((expected["fc0"] < 0).any())  # the ReLU would visibly change it
    got = capture(net, x, batch_size=batch_size)
    assert list(got) == ["fc0", "fc1"]
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_size", [None, 5])
def test_resnet_block_layers_keep_their_outputs_despite_inplace_add_and_relu(batch_size):
    torch.manual_seed(0)
    block, x = BasicBlock().eval(), _probe((12, C, S, S))
    with torch.no_grad():
        expected = block.true_outputs(x)
    got = capture(block, x, batch_size=batch_size, max_features=C * S * S)  # flattened as is: a view before
    assert list(got) == ["conv1", "bn1", "conv2", "bn2"]
    for name, value in expected.items():
        assert got[name].shape == (12, C * S * S)
        torch.testing.assert_close(got[name], value.flatten(1), rtol=0, atol=1e-5)


def test_model_of_both_cases_matches_its_true_features():
    torch.manual_seed(0)
    net, x = ResNetLike().eval(), _probe((16, C, S, S), seed=1)
    got = capture(net, x, batch_size=6)
    expected = net.true_features(x)
    assert list(got) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "shape, options",
    [
        ((6, 5), {}),  # 2-D: as is
        ((6,), {}),  # 1-D: unsqueezed
        ((6, 3, 2, 2), {"layout": "conv"}),  # conv map flattened as is
        ((6, 4, 3), {"layout": "tokens", "token_reduction": "first"}),
        ((6, 4, 3), {"layout": "tokens", "token_reduction": "last"}),
        ((6, 4, 3), {"layout": "tokens", "token_reduction": "flatten"}),
    ],
)
def test_reduce_output_never_returns_a_view_of_the_output(shape, options):
    output = torch.randn(*shape)
    features = reduce_output(output, **options)
    before = features.clone()
    output.add_(100.0)  # what an in-place op of the model would do afterwards
    assert torch.equal(features, before)


def test_reduce_output_copies_nothing_twice():
    output = torch.randn(6, 8, 10, 10)  # pooled: the reduction already copies
    features = reduce_output(output, max_features=128)
    assert features.untyped_storage().nbytes() == features.numel() * features.element_size()
    half = torch.randn(6, 5, dtype=torch.float16)  # upcast: already a copy
    assert reduce_output(half).untyped_storage().data_ptr() != half.untyped_storage().data_ptr()

"""Tests of lightning_repsim.capture: order, selection, output handling, reduction, probe."""

import dataclasses
import hashlib
import importlib
import math
import re
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim.capture import (
    Probe,
    capture,
    execution_order,
    reduce_output,
    select_layers,
    select_output,
)
from lightning_repsim.errors import RepSimValueError, RepSimWarning

# --------------------------------------------------------------------------- models


class Reordered(nn.Module):
    """Defined head-first, executed stem-first: named_modules order != execution order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.act = nn.ReLU()
        self.stem = nn.Linear(4, 8)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.act(self.stem(x)))


class Shared(nn.Module):
    """One module called twice, with another in between."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, x):
        return self.block(self.mid(self.block(x)))


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        self.bn(self.a(x))
        raise RuntimeError("boom")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(6, 2))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def _all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------- execution_order


def test_execution_order_differs_from_definition_order():
    model = Reordered()
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["head", "stem", "unused"]
    x = torch.randn(5, 4)
    assert execution_order(model, lambda: model(x)) == ["stem", "head"]
    assert execution_order(model, lambda: model(x), with_parameters=False) == ["stem", "act", "head"]


def test_execution_order_all_modules_and_top_level():
    model = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    every = execution_order(model, lambda: model(x), leaf_only=False, with_parameters=False)
    assert every[:2] == ["features", "features.0"]
    assert every.index("pool") < every.index("classifier") < every.index("classifier.2")
    assert "" not in every
    assert execution_order(model, lambda: model(x)) == ["features.0", "features.1", "features.3", "classifier.2"]
    # Sequential children are expanded into blocks; parameter-free blocks are dropped
    assert execution_order(model, lambda: model(x), top_level=True) == [
        "features.0",
        "features.1",
        "features.3",
        "classifier.2",
    ]


def test_execution_order_top_level_orders_by_first_descendant():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = nn.Sequential(nn.Linear(8, 4))
            self.encoder = nn.Module()
            self.encoder.inner = nn.Linear(4, 8)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.decoder(self.act(self.encoder.inner(x)))

    net = Net()
    assert execution_order(net, lambda: net(torch.randn(2, 4)), top_level=True) == ["encoder", "decoder.0"]


def test_execution_order_shared_module_first_call_wins():
    model = Shared()
    x = torch.randn(3, 4)
    assert execution_order(model, lambda: model(x)) == ["block", "mid"]


def test_execution_order_leaves_state_untouched():
    model = ConvNet()
    model.train()
    model.classifier.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    stats = model.features[1].running_mean.clone()
    x = torch.randn(4, 3, 8, 8) * 3 + 1
    execution_order(model, lambda: model(x))
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert torch.equal(model.features[1].running_mean, stats)
    assert model.features[1].num_batches_tracked.item() == 0
    assert _all_hooks(model) == 0
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_execution_order_hooks_removed_after_exception():
    model = Boom()
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        execution_order(model, lambda: model(torch.randn(3, 4)))
    assert _all_hooks(model) == 0
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------- select_layers


def test_select_layers_names_globs_types():
    model = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    order = execution_order(model, lambda: model(x), leaf_only=False, with_parameters=False)
    assert select_layers(model, order, None) == order
    assert select_layers(model, order, nn.Conv2d) == ["features.0", "features.3"]
    assert select_layers(model, order, "features.?") == ["features.0", "features.1", "features.2", "features.3"]
    # kept in execution order, whatever order the selectors come in; duplicates once
    assert select_layers(model, order, ["classifier.2", nn.ReLU, "features.2"]) == ["features.2", "classifier.2"]
    assert select_layers(model, order, ["pool", (nn.Linear)]) == ["pool", "classifier.2"]


def test_select_layers_no_match_lists_available():
    model = ConvNet()
    order = ["features.0", "features.3"]
    with pytest.raises(RepSimValueError, match=r"'nope' matched no .*'features\.0', 'features\.3'"):
        select_layers(model, order, ["features.0", "nope"])
    with pytest.raises(RepSimValueError, match=r"Conv3d matched no"):
        select_layers(model, order, nn.Conv3d)
    with pytest.raises(RepSimValueError, match="neither"):
        select_layers(model, order, [3])


class Block(nn.Module):
    """A user-defined block, selected by its import path ``<this module>.Block``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.linear(x))


def test_select_layers_import_paths_select_by_type():
    model = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    order = execution_order(model, lambda: model(x), leaf_only=False, with_parameters=False)
    for path in ("torch.nn.Conv2d", "torch.nn.modules.conv.Conv2d"):
        assert select_layers(model, order, path) == ["features.0", "features.3"]
    assert select_layers(model, order, ["torch.nn.Linear", "features.2", "torch.nn.ReLU"]) == [
        "features.2",
        "classifier.2",
    ]
    blocks = nn.Sequential(Block(), nn.Linear(4, 4), Block())
    order = execution_order(blocks, lambda: blocks(torch.randn(2, 4)), leaf_only=False, with_parameters=False)
    assert select_layers(blocks, order, f"{__name__}.Block") == ["0", "2"]


def test_select_layers_module_names_win_over_import_paths():
    model = nn.Module()
    model.torch = nn.Module()
    model.torch.nn = nn.Module()
    model.torch.nn.Linear = nn.Conv1d(2, 2, 1)  # a module whose path reads as a type
    model.head = nn.Linear(2, 2)
    model.forward = lambda x: model.head(model.torch.nn.Linear(x).mean(-1))
    order = execution_order(model, lambda: model(torch.randn(3, 2, 5)))
    assert order == ["torch.nn.Linear", "head"]
    assert select_layers(model, order, "torch.nn.Linear") == ["torch.nn.Linear"]  # the name, not the type


def test_select_layers_imports_only_dotted_identifiers(monkeypatch):
    imported = []
    real = importlib.import_module

    def spy(name, *args):
        imported.append(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", spy)
    model = ConvNet()
    order = execution_order(model, lambda: model(torch.randn(2, 3, 8, 8)), leaf_only=False, with_parameters=False)
    assert select_layers(model, order, ["features.0", "features.*", "classifier.[02]", "pool"]) == [
        "features.0",
        "features.1",
        "features.2",
        "features.3",
        "pool",
        "classifier.0",
        "classifier.2",
    ]
    assert imported == []
    with pytest.raises(RepSimValueError, match=r"'features\.9' matched no executed module; available"):
        select_layers(model, order, "features.9")
    assert imported == []
    assert select_layers(model, order, "torch.nn.Flatten") == ["classifier.0"]
    assert imported == ["torch.nn"]


def test_select_layers_never_imports_a_package_the_program_has_not_loaded(tmp_path, monkeypatch):
    (tmp_path / "stray_head.py").write_text("raise RuntimeError('imported a stray module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = ConvNet()
    with pytest.raises(RepSimValueError, match=r"'stray_head\.fc' \(no module of that name"):
        select_layers(model, ["features.0", "pool"], "stray_head.fc")  # a misspelt layer name, say
    assert "stray_head" not in sys.modules


@pytest.mark.parametrize("path", ["torch.nn.Linearr", "torch.nn.functional.relu", "no_such_package.Block"])
def test_select_layers_bad_import_path_says_so(path):
    model = ConvNet()
    with pytest.raises(
        RepSimValueError,
        match=rf"'{re.escape(path)}' \(no module of that name, nor the import "
        r"path of an nn.Module subclass\) matched no executed module",
    ):
        select_layers(model, ["features.0", "pool"], path)
    with pytest.raises(RepSimValueError, match=r"'torch\.nn\.Conv3d' \(nn\.conv\.Conv3d\) matched no executed"):
        select_layers(model, ["features.0", "pool"], "torch.nn.Conv3d")


def test_capture_selectors_reach_parameter_free_modules():
    model = ConvNet()
    x = torch.randn(3, 3, 8, 8)
    feats = capture(model, x, [nn.ReLU, "pool", "classifier.*"])
    assert list(feats) == ["features.2", "pool", "classifier.0", "classifier.1", "classifier.2"]
    assert feats["pool"].shape == (3, 6)
    with pytest.raises(RepSimValueError, match="available layers: 'features'"):
        capture(model, x, "feature.0")
    assert _all_hooks(model) == 0


# --------------------------------------------------------------------------- capture basics


def test_capture_default_layers_in_execution_order_and_values():
    model = Reordered()
    x = torch.randn(7, 4)
    feats = capture(model, x)
    assert list(feats) == ["stem", "head"]
    assert torch.allclose(feats["stem"], model.stem(x))
    assert torch.allclose(feats["head"], model(x))
    assert all(f.dtype == torch.float32 and not f.requires_grad for f in feats.values())


def test_capture_batches_concatenate_to_full_pass():
    model = ConvNet()
    x = torch.randn(10, 3, 8, 8)
    full = capture(model, x, max_features=64)
    parts = capture(model, Probe(x), batch_size=3, max_features=64)
    assert list(full) == list(parts)
    for name in full:
        assert full[name].shape[0] == 10
        torch.testing.assert_close(parts[name], full[name], rtol=1e-5, atol=1e-5)


def test_capture_shared_module_first_call():
    model = Shared()
    x = torch.randn(4, 4)
    feats = capture(model, x, batch_size=2)
    assert list(feats) == ["block", "mid"]
    torch.testing.assert_close(feats["block"], model.block(x))


def test_capture_restores_flags_bn_stats_and_hooks():
    model = ConvNet()
    model.train()
    model.features[1].eval()  # mixed modes
    model.classifier[1].eval()
    flags = {n: m.training for n, m in model.named_modules()}
    bn = model.features[1]
    bn.train()  # train mode: a forward in train mode would update the running stats
    flags["features.1"] = True
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(6, 3, 8, 8) * 5 + 2
    feats = capture(model, x)
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert _all_hooks(model) == 0
    # eval-mode BatchNorm: running stats were used, not batch stats
    model.eval()
    torch.testing.assert_close(feats["features.1"], bn(model.features[0](x)).flatten(1)[:, :4096])


def test_capture_hooks_removed_and_flags_restored_after_exception():
    model = Boom()
    model.train()
    model.a.eval()
    with pytest.raises(RuntimeError, match="boom"):
        capture(model, torch.randn(3, 4))
    assert _all_hooks(model) == 0
    assert model.training and model.bn.training and not model.a.training
    assert model.bn.num_batches_tracked.item() == 0


def test_capture_forward_callable_and_wrappers():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x, scale):
            return self.lin(x) * scale

    model = TwoInputs()
    x = torch.randn(5, 4)
    feats = capture(nn.DataParallel(model), x, forward=lambda m, b: m(b, 2.0))
    assert list(feats) == ["lin"]  # names of the unwrapped module
    torch.testing.assert_close(feats["lin"], model.lin(x))


def test_capture_lightning_module():
    from pytorch_lightning.demos.boring_classes import BoringModel

    model = BoringModel()
    feats = capture(model, torch.randn(4, 32))
    assert list(feats) == ["layer"] and feats["layer"].shape == (4, 2)


def test_capture_default_layers_are_deepest_executed_parameter_holders():
    class ViTish(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 5, 8))  # the root owns a parameter
            self.embed = nn.Linear(4, 8)
            layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.encoder(self.embed(x) + self.pos)
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.head(h.mean(1))

    model = ViTish()
    x = torch.randn(3, 5, 4)
    feats = capture(model, x)
    names = list(feats)
    # the root is never chosen when its descendants ran; MHA stands in for its unused out_proj
    assert "" not in names and "attn" in names and "attn.out_proj" not in names
    assert names[0] == "embed" and names[-2:] == ["attn", "head"]
    # each encoder layer appears once, as itself (fast path) or through its sublayers
    for i in range(2):
        prefix = f"encoder.layers.{i}"
        assert any(n == prefix or n.startswith(prefix + ".") for n in names)
    assert not any(n != m and m.startswith(n + ".") for n in names for m in names), (
        "a module and one of its descendants were both chosen"
    )
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        h = model.encoder(model.embed(x) + model.pos)
        torch.testing.assert_close(feats["attn"], model.attn(h, h, h)[0].mean(1))


def test_capture_blocks_come_before_their_submodules():
    model = ConvNet()
    feats = capture(model, torch.randn(2, 3, 8, 8), ["features.0", "features", "classifier"])
    assert list(feats) == ["features", "features.0", "classifier"]


def test_capture_never_executed_layer_warns():
    model = Reordered()
    with pytest.warns(RepSimWarning, match="never executed.*unused"):
        feats = capture(model, torch.randn(3, 4), ["stem", "unused"])
    assert list(feats) == ["stem"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_features": 0}, "max_features"),
        ({"layout": "nchw"}, "layout"),
        ({"layout": {"stem": "pixels"}}, "layout"),
        ({"token_reduction": "max"}, "token_reduction"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_capture_rejects_bad_arguments(kwargs, match):
    model = Reordered()
    with pytest.raises(RepSimValueError, match=match):
        capture(model, torch.randn(3, 4), **kwargs)
    assert _all_hooks(model) == 0


# --------------------------------------------------------------------------- output types


def test_select_output_variants():
    a, b = torch.randn(2, 3), torch.randn(2, 5)

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        hidden: torch.Tensor = None
        last_hidden_state: torch.Tensor = None

    assert select_output(a) is a
    assert select_output((None, a, b)) is a
    assert select_output([a, b], 1) is b
    assert select_output(((a, b), b)) is a
    assert select_output({"logits": a, "last_hidden_state": b}) is b
    assert select_output(OrderedDict(logits=a, pooled=b), "pooled") is b
    assert select_output({"loss": None, "logits": a}) is a
    assert select_output(Out(a, b)) is a
    assert select_output(Out(a, None, b)) is b
    assert select_output(Out(a, b), "hidden") is b
    assert select_output(Out(a, b), lambda o: o.hidden) is b
    assert select_output(a, 1) is a  # an int selector leaves plain tensors alone
    with pytest.raises(RepSimValueError, match="'blk'.*str"):
        select_output("text", name="blk")


class TupleDictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.proj = nn.Linear(5, 4)

    def forward(self, x):
        seq, _ = self.lstm(x)
        return self.proj(seq)


def test_capture_lstm_output_is_sequence_output_mean_over_tokens():
    model = TupleDictModel()
    x = torch.randn(4, 6, 3)
    feats = capture(model, x)
    seq, (h, c) = model.lstm(x)
    assert feats["lstm"].shape == (4, 5)
    torch.testing.assert_close(feats["lstm"], seq.mean(1))
    # nn.Linear acts on the last axis: its (N, T=6, D=4) output is tokens under auto
    torch.testing.assert_close(feats["proj"], model.proj(seq).mean(1))
    # a layout mapping switches it to tokens
    tok = capture(model, x, layout={"proj": "tokens"}, token_reduction="last")
    torch.testing.assert_close(tok["proj"], model.proj(seq)[:, -1])
    torch.testing.assert_close(tok["lstm"], seq[:, -1])


def test_capture_seq_first_modules_are_transposed():
    gru = nn.GRU(3, 5)  # batch_first=False: (T, N, H)
    x = torch.randn(4, 6, 3)  # probe rows are examples: N=4, T=6
    feats = capture(gru, x, forward=lambda m, b: m(b.transpose(0, 1)), token_reduction="first")
    out, _ = gru(x.transpose(0, 1))
    assert feats[""].shape == (4, 5)
    torch.testing.assert_close(feats[""], out[0])

    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    q = torch.randn(3, 5, 8)
    feats = capture(mha, q, forward=lambda m, b: m(b, b, b))
    torch.testing.assert_close(feats[""], mha(q, q, q)[0].mean(1))


def test_capture_inner_layers_of_a_sequence_first_model_are_transposed():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)  # batch_first=False
    x = torch.randn(3, 5, 8)  # probe rows are examples: N=3, T=5
    feats = capture(layer, x, ["self_attn", "linear1", "norm2"], forward=lambda m, b: m(b.transpose(0, 1)))
    seen = {}
    hooks = [
        getattr(layer, n).register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, o))
        for n in ("linear1", "norm2")
    ]
    layer.eval()
    with torch.no_grad():
        layer(x.transpose(0, 1))
    for hook in hooks:
        hook.remove()
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"self_attn": (3, 8), "linear1": (3, 16), "norm2": (3, 8)}
    torch.testing.assert_close(feats["linear1"], seen["linear1"].transpose(0, 1).mean(1))  # (T, N, D) → rows N
    torch.testing.assert_close(feats["norm2"], seen["norm2"].transpose(0, 1).mean(1))


@pytest.mark.parametrize("n, batch_size", [(20, None), (20, 4), (20, 8), (20, 12), (16, 8), (8, None)])
def test_sequence_first_rows_stay_examples_when_a_batch_is_as_long_as_the_sequence(n, batch_size):
    # T = 8 tokens: batches of 8 examples (also the last chunk after 12) have T == N; with n = 16 or 8
    # every batch does, and the model's structure (inside a batch_first=False layer) decides
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)  # batch_first=False
    x = torch.randn(n, 8, 8)
    expected = capture(layer, x, ["linear1", "norm2"], forward=lambda m, b: m(b.transpose(0, 1)), batch_size=1)
    feats = capture(layer, x, ["linear1", "norm2"], forward=lambda m, b: m(b.transpose(0, 1)), batch_size=batch_size)
    for name in expected:
        torch.testing.assert_close(feats[name], expected[name])


def test_a_batch_first_model_with_sequence_as_long_as_the_batch_keeps_rows():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))  # (N, T, D), batch first
    x = torch.randn(10, 5, 4)
    for batch_size in (None, 5):  # every batch of 5 is as long as the sequence
        feats = capture(model, x, batch_size=batch_size)
        torch.testing.assert_close(feats["0"], model[0](x).mean(1))
        torch.testing.assert_close(feats["1"], model(x).mean(1))


class FlattenedTokens(nn.Module):
    """A Linear applied to (N * T, D): its output has no axis of one row per example."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.proj = nn.Linear(6, 6)

    def forward(self, x):  # x: (N, T, 4)
        h = self.embed(x)
        return self.proj(h.reshape(-1, h.shape[-1])).reshape(h.shape)


def test_layers_without_one_row_per_example_are_left_out_by_default_and_refused_when_selected():
    model, x = FlattenedTokens(), torch.randn(3, 5, 4)
    with pytest.warns(RepSimWarning, match=r"left out.*'proj' \(15, 6\)"):
        feats = capture(model, x)
    assert list(feats) == ["embed"] and feats["embed"].shape == (3, 6)
    with pytest.raises(RepSimValueError, match=r"'proj' gave an output of shape \(15, 6\) for a batch of 3 examples"):
        capture(model, x, ["embed", "proj"])


def test_capture_dict_and_dataclass_outputs():
    @dataclasses.dataclass
    class ModelOutput:
        logits: torch.Tensor
        last_hidden_state: torch.Tensor

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return {"aux": x.sum(1), "feat": self.lin(x)}

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = self.inner(x)["feat"]
            return ModelOutput(logits=self.head(h), last_hidden_state=h)

    model = Outer()
    x = torch.randn(5, 3)
    h = model.inner.lin(x)
    feats = capture(model, x, ["inner", ""])
    torch.testing.assert_close(feats["inner"], x.sum(1, keepdim=True))  # first tensor value
    torch.testing.assert_close(feats[""], h)  # last_hidden_state preferred
    feats = capture(model, x, ["inner"], output_selector="feat")
    torch.testing.assert_close(feats["inner"], h)


# --------------------------------------------------------------------------- reduction


@pytest.mark.parametrize(
    ("shape", "max_features", "expected_p"),
    [
        ((2, 5), 4, 5),  # 2-D as is, never capped
        ((2, 4, 10), 4096, 40),  # fits: flattened as is
        ((2, 16, 32, 32), 4096, 16 * 16 * 16),
        ((2, 16, 32, 32), 1000, 16 * 7 * 7),
        ((2, 3, 2, 50), 60, 3 * 2 * 10),  # the short side is never upsampled
        ((2, 8, 8, 8, 8), 100, 8 * 2 * 2 * 2),
        ((2, 4, 100), 50, 4 * 12),
    ],
)
def test_conv_reduction_is_largest_fitting_pooling(shape, max_features, expected_p):
    x = torch.randn(*shape)
    out = reduce_output(x, layout="conv", max_features=max_features)
    assert out.shape == (2, expected_p)
    if len(shape) > 2:
        assert out.shape[1] <= max_features
        spatial = shape[2:]
        side = next(
            s for s in range(max(spatial), 0, -1) if shape[1] * math.prod(min(s, d) for d in spatial) <= max_features
        )
        sizes = [min(side, d) for d in spatial]
        assert shape[1] * math.prod(sizes) == expected_p
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
        torch.testing.assert_close(out, pool[len(spatial)](x, sizes).flatten(1))


def test_conv_reduction_too_many_channels_warns_once_per_layer():
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Conv2d(32, 8, 1))
    x = torch.randn(6, 3, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats = capture(model, x, batch_size=2, max_features=16)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RepSimWarning)]
    assert len(msgs) == 1 and "'0'" in msgs[0] and "32 channels" in msgs[0]
    torch.testing.assert_close(feats["0"], model[0](x).mean((2, 3)))  # global average pooling
    assert feats["1"].shape == (6, 8 * 1 * 1)  # 8 * 4 * 4 > 16 → pooled to 1x1 (8 * 2 * 2 > 16)


def test_token_reduction_modes_and_auto_layout():
    x = torch.randn(2, 5, 3)
    lstm = nn.LSTM(3, 3, batch_first=True)
    emb = nn.Embedding(10, 3)
    torch.testing.assert_close(reduce_output(x, module=lstm), x.mean(1))
    torch.testing.assert_close(reduce_output(x, module=emb, token_reduction="first"), x[:, 0])
    torch.testing.assert_close(reduce_output(x, module=lstm, token_reduction="last"), x[:, -1])
    torch.testing.assert_close(reduce_output(x, module=lstm, token_reduction="flatten"), x.reshape(2, 15))
    # 3-D outputs of Conv1d / other modules are (N, C, L) conv maps under auto
    assert reduce_output(x, module=nn.Conv1d(5, 5, 1)).shape == (2, 15)
    assert reduce_output(x, module=nn.Conv1d(5, 5, 1), max_features=5).shape == (2, 5)
    # ... but modules acting on the last axis give (N, T, D) tokens
    torch.testing.assert_close(reduce_output(x, module=nn.Linear(3, 3), max_features=5), x.mean(1))
    torch.testing.assert_close(reduce_output(x, module=nn.LayerNorm(3)), x.mean(1))
    # explicit layouts win
    torch.testing.assert_close(reduce_output(x, module=nn.Linear(3, 3), layout="tokens"), x.mean(1))
    assert reduce_output(x, module=lstm, layout="conv").shape == (2, 15)
    with pytest.warns(RepSimWarning, match="'tok'.*max_features=4"):
        reduce_output(x, name="tok", layout="tokens", token_reduction="flatten", max_features=4)


def test_capture_embedding_tokens():
    model = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 6))
    ids = torch.randint(0, 20, (4, 9))
    feats = capture(model, ids, nn.Embedding)
    torch.testing.assert_close(feats["0"], model[0](ids).mean(1))


def test_fp16_and_autocast_outputs_upcast_to_float32():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # autocast is live inside capture
        feats = capture(model, x)
        assert torch.is_autocast_enabled("cpu")
    assert all(f.dtype == torch.float32 for f in feats.values())
    torch.testing.assert_close(feats["2"], model(x), rtol=3e-2, atol=3e-2)

    half = nn.Sequential(nn.Linear(4, 8)).half()
    feats = capture(half, x.half())
    assert feats["0"].dtype == torch.float32
    torch.testing.assert_close(feats["0"], half(x.half()).float())
    assert reduce_output(torch.ones(3, 2, dtype=torch.float64)).dtype == torch.float64
    assert reduce_output(torch.ones(3, dtype=torch.int64)).shape == (3, 1)


# --------------------------------------------------------------------------- Probe


def test_probe_hash_is_stable_and_sensitive():
    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    h = Probe(x).hash
    assert len(h) == 64 and h == Probe(x.clone()).hash
    # a fixed digest: the same data hashes the same on every run and machine
    assert h == "7138f5c16411ba07d37aa2cf7e5386d8e56b0bf908aa40ae70c3a40cbba52ad4"
    reference = hashlib.sha256(b"lightning_repsim.Probe/v1|torch.float32|(6, 4)|")
    reference.update(x.numpy().tobytes())
    assert h == reference.hexdigest()
    y = x.clone()
    y[5, 3] += 1e-3
    assert Probe(y).hash != h
    assert Probe(x.reshape(4, 6)).hash != h  # same bytes, other shape
    assert Probe(x.double()).hash != h
    assert Probe(x.t().contiguous().t()).hash == h  # memory layout does not matter
    assert Probe(x.bfloat16()).hash != Probe(x.half()).hash
    assert len(Probe(torch.ones(3, 2, dtype=torch.bool)).hash) == 64


def test_probe_sources_and_batches():
    x, y = torch.randn(10, 3), torch.arange(10)
    assert torch.equal(Probe((x, y)).inputs, x)
    assert torch.equal(Probe([x[:4], x[4:]]).inputs, x)
    assert torch.equal(Probe(Probe(x)).inputs, x)
    probe = Probe(x)
    assert len(probe) == 10
    chunks = list(probe.batches(4))
    assert [c.shape[0] for c in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat(chunks), x)
    assert probe.to("cpu").device.type == "cpu"
    with pytest.raises(RepSimValueError, match="Cannot build"):
        Probe(3)
    with pytest.raises(RepSimValueError, match="empty"):
        Probe(torch.empty(0, 3))


def test_probe_from_dataloader_materialises_once_and_stops_early():
    x = torch.randn(20, 3)
    loader = DataLoader(TensorDataset(x, torch.zeros(20)), batch_size=6, shuffle=False)
    probe = Probe(loader)
    assert torch.equal(probe.inputs, x)

    pulled = []

    class Counting:
        def __iter__(self):
            for i in range(0, 20, 6):
                pulled.append(i)
                yield {"x": x[i : i + 6], "label": torch.zeros(6)}

    probe = Probe(Counting(), max_examples=8)
    assert torch.equal(probe.inputs, x[:8]) and pulled == [0, 6]
    assert probe.hash == Probe(x[:8]).hash
    # tensors-only loaders
    assert len(Probe(DataLoader(x, batch_size=7))) == 20


def test_probe_from_dataloader_leaves_global_rng_untouched():
    x = torch.randn(12, 3)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    Probe(DataLoader(TensorDataset(x), batch_size=5, shuffle=True))
    Probe(DataLoader(x, batch_size=5))
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_capture_takes_the_probe_from_the_model_device_copy(monkeypatch):
    requested = []
    original = Probe.to

    def spy(self, device):
        requested.append(torch.device(device))
        return original(self, device)

    monkeypatch.setattr(Probe, "to", spy)
    probe = Probe(torch.randn(6, 4))
    capture(nn.Linear(4, 3), probe, batch_size=4)
    capture(nn.Linear(4, 3), probe, batch_size=4)
    assert requested == [torch.device("cpu")] * 2  # one device copy per call, never one per batch


def test_a_forward_that_changes_its_input_in_place_leaves_the_probe_as_it_was():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return self.linear(x.mul_(2))  # e.g. an in-place normalisation

    model, probe = InPlace(), Probe(torch.randn(6, 4))
    inputs, digest = probe.inputs.clone(), probe.hash
    first = capture(model, probe, batch_size=4)["linear"]
    second = capture(model, probe, batch_size=4)["linear"]
    torch.testing.assert_close(second, first)
    assert torch.equal(probe.inputs, inputs) and Probe(probe.inputs).hash == digest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_is_copied_to_the_gpu_once_across_captures():
    net = nn.Linear(4, 3).cuda()
    probe = Probe(torch.randn(10, 4))
    seen = []

    def forward(model, batch):
        seen.append(batch.data_ptr())
        return model(batch)

    for _ in range(2):
        capture(net, probe, forward=forward, batch_size=5)
    assert len(probe._on_device) == 1
    base = probe.to("cuda").data_ptr()
    assert len(seen) == 4 and base not in seen  # each batch is a device-side copy of a slice of the cached probe


def test_probe_from_a_shuffling_loader_is_the_datasets_first_examples_every_time():
    x = torch.randn(40, 3)
    dataset = TensorDataset(x, torch.arange(40))
    probes = [Probe(DataLoader(dataset, batch_size=7, shuffle=True), max_examples=16) for _ in range(3)]
    assert all(torch.equal(p.inputs, x[:16]) for p in probes)
    assert len({p.hash for p in probes}) == 1
    # the loader's own order where it is sequential; the whole dataset when it is smaller than asked
    assert torch.equal(Probe(DataLoader(dataset, batch_size=7), max_examples=16).inputs, x[:16])
    assert torch.equal(Probe(DataLoader(dataset, batch_size=64, shuffle=True), max_examples=512).inputs, x)


def test_probe_from_a_loader_with_a_custom_sampler_follows_the_sampler():
    from torch.utils.data import SubsetRandomSampler

    x = torch.randn(30, 2)
    sampler = SubsetRandomSampler(list(range(10, 20)), generator=torch.Generator().manual_seed(0))
    probe = Probe(DataLoader(TensorDataset(x), batch_size=4, sampler=sampler))
    assert sorted(probe.inputs[:, 0].tolist()) == sorted(x[10:20, 0].tolist())

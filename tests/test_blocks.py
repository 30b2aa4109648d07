"""capture.blocks: the default layers and freeze units are the blocks of real architectures.

Independent references: each block's features are checked against the block's output computed by
hand (the modules called one after the other), and the Hugging Face models, written by no one here,
are fitted with both callbacks at their defaults.
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim.callbacks import FreezeTraining, RepresentationSimilarity
from lightning_repsim.capture import Block, capture_blocks, default_blocks
from tests.test_capture_inplace import BasicBlock  # torchvision's: in-place ReLUs, out += identity


def blocks_of(model: nn.Module, x: torch.Tensor) -> list[Block]:
    return default_blocks(model, lambda: model(x))


def names(blocks: list[Block]) -> list[str]:
    return [b.name for b in blocks]


# ----------------------------------------------------------------------------- nn.TransformerEncoder


class Encoder(nn.Module):
    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_transformer_encoder_rows_are_its_layers():
    torch.manual_seed(0)
    model, x = Encoder(), torch.randint(0, 20, (6, 5))
    blocks = blocks_of(model, x)
    assert names(blocks) == ["embed", "encoder.layers.0", "encoder.layers.1", "encoder.layers.2", "head"]
    assert all(b.modules == (b.name,) and b.output == b.name for b in blocks)
    # each row is the layer's true output, its tokens averaged (a transformer block is read as tokens)
    feats = capture_blocks(model, x, blocks)
    with torch.no_grad():
        model.eval()
        h = model.embed(x)
        torch.testing.assert_close(feats["embed"], h.mean(1))
        for i, layer in enumerate(model.encoder.layers):
            h = layer(h)
            torch.testing.assert_close(feats[f"encoder.layers.{i}"], h.mean(1), rtol=1e-5, atol=1e-6)


def test_one_freeze_unit_per_encoder_layer():
    model, x = Encoder(layers=4), torch.randint(0, 20, (2, 5))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in model.get_submodule(b.name).parameters()) for b in blocks_of(model, x))
    assert largest / total < 0.25  # the old default froze the whole encoder (97.8 %) in one event


# ----------------------------------------------------------------------------- a ResNet-like CNN


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.layer2 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _trained_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that a BatchNorm in eval mode is not nearly the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_resnet_like_stem_is_conv_bn_relu_and_each_residual_block_is_one():
    torch.manual_seed(0)
    model, x = _trained_bn(ResNetLike()), torch.randn(4, 3, 8, 8)
    blocks = blocks_of(model, x)
    assert names(blocks) == ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc"]
    stem = blocks[0]
    assert stem.modules == ("conv1", "bn1", "relu") and stem.output == "relu"  # the max-pool closes the group
    feats = capture_blocks(model, x, blocks, max_features=10_000)
    model.eval()
    with torch.no_grad():
        h = torch.relu(model.bn1(model.conv1(x)))
        torch.testing.assert_close(feats["conv1"], h.flatten(1))  # post-ReLU, the in-place ReLU's output
        h = model.maxpool(h)
        for name in ("layer1.0", "layer1.1", "layer2.0", "layer2.1"):
            h = model.get_submodule(name)(h.clone())
            torch.testing.assert_close(feats[name], h.flatten(1))


def test_flat_cnn_groups_conv_with_its_batchnorm_and_activation():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    blocks = blocks_of(net, torch.randn(2, 3, 8, 8))
    assert [(b.name, b.modules, b.output) for b in blocks] == [
        ("0", ("0", "1", "2"), "2"),
        ("4", ("4", "5", "6"), "6"),
        ("9", ("9",), "9"),
    ]


# ----------------------------------------------------------------------------- MLPs and corner cases


def test_mlp_linear_with_activation_and_dropout():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))
    x = torch.randn(7, 5)
    blocks = blocks_of(net, x)
    assert [(b.name, b.modules, b.output) for b in blocks] == [
        ("0", ("0", "1", "2"), "2"),
        ("3", ("3", "4"), "4"),
        ("5", ("5",), "5"),
    ]
    feats = capture_blocks(net, x, blocks)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats["0"], torch.relu(net[0](x)))
        torch.testing.assert_close(feats["3"], nn.functional.gelu(net[3](torch.relu(net[0](x)))))


class Wrapped(nn.Module):
    """A LightningModule-like wrapper: blocks exactly the modules of a child are that child."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU())
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stem(x)))


def test_a_group_that_is_a_whole_module_is_that_module_and_a_final_norm_joins_the_head():
    blocks = blocks_of(Wrapped(), torch.randn(3, 4))
    assert [(b.name, b.modules, b.output) for b in blocks] == [
        ("stem", ("stem",), "stem"),
        ("head", ("norm", "head"), "head"),  # a norm after nothing open goes with the head it precedes
    ]


def test_attention_whose_projections_never_run_is_one_leaf():
    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x)[0].mean(1))

    assert names(blocks_of(Attend(), torch.randn(2, 3, 8))) == ["attn", "head"]


def test_a_parameter_free_rotary_embedding_does_not_join_the_token_embedding():
    class RotaryEmbedding(nn.Module):  # as in Llama: cos / sin of the positions, no parameters
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            angles = torch.arange(x.shape[1], dtype=x.dtype)[:, None] * torch.ones(x.shape[-1])
            return angles.cos()[None], angles.sin()[None]

    class Llamaish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(10, 8)
            self.rotary_emb = RotaryEmbedding()
            self.head = nn.Linear(8, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.embed_tokens(ids)
            cos, sin = self.rotary_emb(h)
            return self.head((h * cos + h * sin).mean(1))

    blocks = blocks_of(Llamaish(), torch.randint(0, 10, (2, 5)))
    assert [(b.name, b.output) for b in blocks] == [("embed_tokens", "embed_tokens"), ("head", "head")]


def test_modules_that_never_run_and_the_roots_own_parameters_are_no_block():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.act = nn.Tanh()
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x * self.scale)

    assert blocks_of(Odd(), torch.randn(2, 3)) == []


def test_discovery_leaves_modes_and_parameters_unchanged():
    model = ResNetLike().train()
    model.layer1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks_of(model, torch.randn(2, 3, 8, 8))
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- both callbacks, no parameterised layer


class NoLayer(pl.LightningModule):
    """A model whose only parameter is its own: no module with parameters to monitor or freeze."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2))
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x @ self.w)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _quiet_trainer(tmp_path, callbacks, **options) -> pl.Trainer:
    kwargs = dict(
        max_steps=4,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    kwargs.update(options)
    return pl.Trainer(**kwargs)


@pytest.mark.parametrize(
    "callback",
    [
        pytest.param(lambda: RepresentationSimilarity(reference="init", write_files=False), id="similarity"),
        pytest.param(lambda: FreezeTraining(), id="freeze"),
    ],
)
def test_no_parameterised_layer_is_a_configuration_error(tmp_path, callback):
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=4)
    trainer = _quiet_trainer(tmp_path, [callback()])
    with pytest.raises(Exception, match=r"no layer with parameters found.*pass (layers|units)="):
        trainer.fit(NoLayer(), data)


# ----------------------------------------------------------------------------- Hugging Face models


VOCAB, SEQ = 50, 8


class TinyLM(pl.LightningModule):
    """A tiny Hugging Face backbone with a classification head on the mean hidden state."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        import transformers

        transformers.logging.set_verbosity_error()
        if kind == "gpt2":
            config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16)
            self.backbone = transformers.GPT2Model(config)
        else:
            config = transformers.BertConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=2,
                intermediate_size=64,
                vocab_size=VOCAB,
                max_position_embeddings=16,
            )
            self.backbone = transformers.BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(32, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(input_ids=ids).last_hidden_state.mean(1))

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return nn.functional.cross_entropy(self(ids), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


EXPECTED = {
    "gpt2": ["backbone.wte", "backbone.h.0", "backbone.h.1", "head"],
    "bert": ["backbone.embeddings", "backbone.encoder.layer.0", "backbone.encoder.layer.1", "head"],
}


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hugging_face_model_with_both_callbacks_at_defaults(tmp_path, kind):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (16, SEQ))
    data = DataLoader(TensorDataset(ids, torch.randint(0, 2, (16,))), batch_size=4)
    model = TinyLM(kind)
    monitor = RepresentationSimilarity(every_n_train_steps=2, write_files=False)
    freeze = FreezeTraining(verbose=False)
    trainer = _quiet_trainer(tmp_path, [monitor, freeze], max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's few-batches notes
        trainer.fit(model, data)

    # the heatmap rows: the embedding, each transformer block, the head
    assert monitor.layer_names == EXPECTED[kind]
    assert freeze.units == EXPECTED[kind]
    if kind == "gpt2":  # token + position embeddings and their dropout: their sum; the final norm joins the head
        assert freeze.unit_modules["backbone.wte"] == ["backbone.wte", "backbone.wpe", "backbone.drop"]
        assert freeze.unit_modules["head"] == ["backbone.ln_f", "head"]

    # freezing proceeds block by block: each event freezes exactly the parameters of its own block
    events = freeze.events
    assert [e["unit"] for e in events] == EXPECTED[kind][:-1]
    assert [e["step"] for e in events] == [1, 2, 3]  # linear schedule: units 1..3 of 4 at 25/50/75 % of 4 steps
    total = sum(p.numel() for p in model.parameters())
    share = {
        unit: sum(p.numel() for m in modules for p in model.get_submodule(m).parameters()) / total
        for unit, modules in freeze.unit_modules.items()
    }
    embedding = share[EXPECTED[kind][0]]
    blocks = len(EXPECTED[kind]) - 2
    assert all(share[unit] <= (1 - embedding) / blocks + embedding + 1e-9 for unit in freeze.units)
    assert all(share[u] < 0.5 for u in EXPECTED[kind][1:-1])  # no event freezes the whole encoder
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    expected = {
        id(p) for u in EXPECTED[kind][:-1] for m in freeze.unit_modules[u] for p in model.get_submodule(m).parameters()
    }
    assert frozen == expected

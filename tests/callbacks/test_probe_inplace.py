"""The callback's probe path records each layer's own output even when the model changes it in place
afterwards (``nn.ReLU(inplace=True)``, a residual ``out += identity``): issue 12."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim.callbacks import RepresentationSimilarity
from lightning_repsim.store import open_store
from tests.test_capture_inplace import C, ResNetLike, S

PROBE = torch.randn(24, C, S, S, generator=torch.Generator().manual_seed(11))


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = ResNetLike()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_probe_features_of_inplace_models_equal_the_true_outputs(tmp_path):
    torch.manual_seed(0)
    model = Module()
    initial = ResNetLike()
    initial.load_state_dict(model.net.state_dict())
    expected = {f"net.{k}": v for k, v in initial.eval().true_features(PROBE).items()}
    callback = RepresentationSimilarity(
        probe=PROBE,
        reference="init",
        measures=("linear_cka",),
        write_files=False,
        max_features=C * S * S,
        layers=sorted(expected),  # each module's own output (the default blocks read the activations after them)
    )
    data = DataLoader(TensorDataset(torch.randn(32, C, S, S), torch.randint(0, 2, (32,))), batch_size=8)
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path), max_epochs=1, accelerator="cpu", devices=1, logger=False,
        callbacks=[callback], enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, data)
    store = open_store(callback.store_path)
    stored = store.get(store.steps[0])
    assert set(stored) == set(expected)
    assert store.kinds["net.fc0"] == "features" and store.kinds["net.block.bn2"] == "gram_factor"
    for name, value in expected.items():
        assert bool((value < 0).any())  # an in-place ReLU would have changed it
        if store.kinds[name] == "features":
            torch.testing.assert_close(stored[name].to(value.dtype), value, rtol=0, atol=1e-5)
        else:  # wider than the probe: stored as a factor F of the Gram, F Fᵀ = X Xᵀ
            factor = stored[name].double()
            gram = value.double() @ value.double().T
            torch.testing.assert_close(factor @ factor.T, gram, rtol=0, atol=1e-5 * float(gram.abs().max()))

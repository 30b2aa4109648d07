"""Tests of FreezeTraining: real ``Trainer.fit`` runs on CPU with small models.

Every "frozen" claim is checked bit-exactly (``torch.equal``) against a snapshot taken the moment
the unit froze, with controls showing that the same tensors did change while trainable.
"""

import types
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_repsim.callbacks import (
    CubicSchedule,
    FreezeTraining,
    LinearSchedule,
    SimilaritySchedule,
    TimesSchedule,
)
from lightning_repsim.errors import RepSimValueError

UNITS = ["block1", "block2", "head"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster and immune to other processes on a small CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N_BATCHES = 8  # batches per epoch with the default data


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.bn = nn.BatchNorm1d(n_out)

    def forward(self, x):
        return torch.relu(self.bn(self.linear(x)))


class Net(pl.LightningModule):
    """Three units; ``head`` is declared first so that declaration order != execution order."""

    def __init__(self, optimizer: str = "sgd", set_to_none: bool = True, lr: float = 0.05):
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.block1 = Block(6, 16)
        self.block2 = Block(16, 16)
        self.optimizer_name, self.set_to_none, self.lr = optimizer, set_to_none, lr

    def forward(self, x):
        return self.head(self.block2(self.block1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=0.1)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr / 5)
        return torch.optim.AdamW(params, lr=self.lr / 5, weight_decay=0.5)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=self.set_to_none)


def loader(n: int = 8 * N_BATCHES, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def make_trainer(callbacks, tmp_path=None, **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=24,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def unit_state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class FreezeRecorder(Callback):
    """Placed after FreezeTraining: snapshots a unit's parameters and buffers the moment it freezes."""

    def __init__(self, freeze: FreezeTraining) -> None:
        self.freeze = freeze
        self.at_freeze: dict = {}
        self.freeze_batch: dict = {}
        self.initial: dict = {}

    def _snap(self, pl_module, batch_idx):
        for unit in self.freeze.frozen_units:
            if unit not in self.at_freeze:
                self.at_freeze[unit] = unit_state(pl_module.get_submodule(unit))
                self.freeze_batch[unit] = batch_idx

    def on_train_start(self, trainer, pl_module):
        self.initial = {u: unit_state(pl_module.get_submodule(u)) for u in UNITS}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._snap(pl_module, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._snap(pl_module, batch_idx + 1)

    def assert_frozen_since_freeze(self, pl_module, expected_units, buffers=True):
        assert sorted(self.at_freeze) == sorted(expected_units)
        for unit, snapshot in self.at_freeze.items():
            now = pl_module.get_submodule(unit).state_dict()
            params = {name for name, _ in pl_module.get_submodule(unit).named_parameters()}
            for name, value in snapshot.items():
                if not buffers and name not in params:
                    continue
                assert torch.equal(now[name], value), f"{unit}.{name} moved after freezing"
            # control: the unit did train before it froze
            assert not torch.equal(snapshot["linear.weight"], self.initial[unit]["linear.weight"])
        head = pl_module.head.weight
        assert not torch.equal(head, self.initial["head"]["weight"]), "the top unit must keep training"


# --------------------------------------------------------------------------- true freeze


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_frozen_units_stay_bit_identical(optimizer, set_to_none, accumulate):
    pl.seed_everything(1)
    freeze = FreezeTraining(schedule={"block1": 3, "block2": 5}, units=UNITS, verbose=False)
    recorder = FreezeRecorder(freeze)
    model = Net(optimizer, set_to_none)
    trainer = make_trainer([freeze, recorder], max_steps=8, accumulate_grad_batches=accumulate)
    trainer.fit(model, loader(8 * 24))
    assert freeze.frozen_units == ["block1", "block2"]
    assert [e["step"] for e in freeze.events] == [3, 5]
    assert not any(p.requires_grad for p in model.block1.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    recorder.assert_frozen_since_freeze(model, ["block1", "block2"])


class Feeder(Callback):
    """Feeds the external similarity schedule: block1 is 'unchanged' from batch ``at`` on."""

    def __init__(self, freeze: FreezeTraining, at: int) -> None:
        self.freeze, self.at = freeze, at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            self.freeze.update_similarity(trainer.global_step, {"block1.linear": 0.999, "block2": 0.5})


@pytest.mark.parametrize("accumulate", [2, 3])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_freeze_in_the_middle_of_gradient_accumulation(optimizer, accumulate):
    pl.seed_everything(2)
    freeze = FreezeTraining(schedule=SimilaritySchedule(source="external", patience=1), units=UNITS, verbose=False)
    recorder = FreezeRecorder(freeze)
    at = 3 * accumulate  # fed after the first batch of window 4, applied before its second batch
    model = Net(optimizer)
    trainer = make_trainer([freeze, Feeder(freeze, at), recorder], max_steps=8, accumulate_grad_batches=accumulate)
    trainer.fit(model, loader(8 * 24))
    assert freeze.frozen_units == ["block1"]
    assert (at + 1) % accumulate != 0, "the freeze must fall inside an accumulation window"
    assert recorder.freeze_batch["block1"] == at + 1
    assert freeze.history == [{"step": 3, "values": {"block1": 0.999, "block2": 0.5}}]
    recorder.assert_frozen_since_freeze(model, ["block1"])


class ModeChecker(Callback):
    def __init__(self, freeze):
        self.freeze, self.checked = freeze, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "block1" in self.freeze.frozen_units:
            assert pl_module.block1.bn.training is self.freeze.train_bn
            assert pl_module.block2.bn.training
            self.checked += 1


class NetResettingModes(Net):
    """Puts the whole model back in train mode after validation and at each epoch start (as
    older Lightning versions and many user modules do)."""

    def on_validation_model_train(self):
        self.train()

    def on_train_epoch_start(self):
        self.train()


@pytest.mark.parametrize("train_bn", [False, True])
def test_batchnorm_statistics_and_mode_survive_validation(train_bn):
    pl.seed_everything(3)
    freeze = FreezeTraining(schedule={"block1": 4}, units=UNITS, train_bn=train_bn, verbose=False)
    recorder, checker = FreezeRecorder(freeze), ModeChecker(freeze)
    model = NetResettingModes()
    trainer = make_trainer([freeze, recorder, checker], max_steps=20, val_check_interval=3, limit_val_batches=2)
    trainer.fit(model, loader(), loader(seed=1))
    assert checker.checked == 16
    snap = recorder.at_freeze["block1"]
    bn = model.block1.bn
    assert torch.equal(bn.weight, snap["bn.weight"]) and torch.equal(model.block1.linear.weight, snap["linear.weight"])
    stats_frozen = torch.equal(bn.running_mean, snap["bn.running_mean"]) and torch.equal(
        bn.num_batches_tracked, snap["bn.num_batches_tracked"]
    )
    assert stats_frozen is (not train_bn)
    assert not torch.equal(model.block2.bn.running_mean, recorder.initial["block2"]["bn.running_mean"])


class BackwardCounter(Callback):
    def __init__(self, freeze):
        self.freeze = freeze
        self.calls = {"block1": 0, "block2": 0, "head": 0}
        self.after_freeze = {"block1": 0, "block2": 0, "head": 0}
        self.grads_after_freeze = []

    def on_fit_start(self, trainer, pl_module):
        for name in self.calls:
            pl_module.get_submodule(name).register_full_backward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, grad_input, grad_output):
            self.calls[name] += 1
            if "block1" in self.freeze.frozen_units:
                self.after_freeze[name] += 1

        return hook

    def on_after_backward(self, trainer, pl_module):
        if "block1" in self.freeze.frozen_units:
            self.grads_after_freeze.append([p.grad for p in pl_module.block1.parameters()])


def test_backward_stops_at_the_frozen_prefix():
    freeze = FreezeTraining(schedule={"block1": 4}, units=UNITS, verbose=False)
    counter = BackwardCounter(freeze)
    trainer = make_trainer([freeze, counter], max_steps=10)
    trainer.fit(Net(), loader())
    assert counter.calls == {"block1": 4, "block2": 10, "head": 10}
    assert counter.after_freeze == {"block1": 0, "block2": 6, "head": 6}
    assert len(counter.grads_after_freeze) == 6
    assert all(g is None for grads in counter.grads_after_freeze for g in grads)


# --------------------------------------------------------------------------- schedules


def test_linear_and_cubic_schedules_and_default_units():
    for schedule, _steps in [("linear", [8, 16]), ("cubic", [0, 7])]:  # T=24, L=3: 24*(i/3) and 24*(0.5+0.5 i/3)^3
        start = 0.5 if schedule == "cubic" else 0.0
        schedule_object = {"linear": LinearSchedule, "cubic": CubicSchedule}[schedule](start=start)
        freeze = FreezeTraining(schedule=schedule_object, verbose=False)
        make_trainer([freeze]).fit(Net(), loader())
        assert freeze.units == ["block1", "block2", "head"]  # execution order, not declaration order
        expected = {"linear": [8, 16], "cubic": [int(24 * (0.5 + 0.5 / 3) ** 3), int(24 * (0.5 + 1 / 3) ** 3)]}
        assert [e["step"] for e in freeze.events] == expected[schedule]
        assert freeze.frozen_units == ["block1", "block2"]


class Wrapper(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Holder(Wrapper):
    def __init__(self):
        super().__init__()
        inner = self.net
        del self.net
        self.model = nn.Module()
        self.model.stem, self.model.mid, self.model.top = inner[0], inner[2], inner[4]

    def forward(self, x):
        return self.model.top(torch.relu(self.model.mid(torch.relu(self.model.stem(x)))))


def test_discovery_expands_containers_and_looks_through_a_wrapped_network():
    freeze = FreezeTraining(verbose=False)
    make_trainer([freeze], max_steps=6).fit(Wrapper(), loader())
    assert freeze.units == ["net.0", "net.2", "net.4"]
    assert [e["step"] for e in freeze.events] == [2, 4]
    freeze = FreezeTraining(verbose=False)
    make_trainer([freeze], max_steps=6).fit(Holder(), loader())
    assert freeze.units == ["model.stem", "model.mid", "model.top"]


def test_default_units_are_blocks_with_their_activation():
    freeze = FreezeTraining(verbose=False)
    make_trainer([freeze], max_steps=6).fit(Wrapper(), loader())
    assert freeze.unit_modules == {"net.0": ["net.0", "net.1"], "net.2": ["net.2", "net.3"], "net.4": ["net.4"]}
    assert freeze.unit_output("net.0") == "net.1"


def test_external_similarity_of_a_blocks_member_module_counts_for_its_unit():
    class Feed(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:  # the ReLU net.1 belongs to unit net.0; net.3 to net.2
                freeze.update_similarity(1, {"net.1": 0.999, "net.3": 0.5})

    freeze = FreezeTraining(schedule=SimilaritySchedule(source="external", patience=1), verbose=False)
    make_trainer([freeze, Feed()], max_steps=3).fit(Wrapper(), loader())
    assert freeze.history == [{"step": 1, "values": {"net.0": 0.999, "net.2": 0.5}}]
    assert freeze.frozen_units == ["net.0"]


def test_state_keeps_each_units_modules_and_loads_version_1():
    freeze = FreezeTraining(verbose=False)
    make_trainer([freeze], max_steps=6).fit(Wrapper(), loader())
    state = freeze.state_dict()
    assert state["version"] == 2
    assert state["blocks"]["net.0"] == {"modules": ["net.0", "net.1"], "output": "net.1"}
    restored = FreezeTraining(verbose=False)
    restored.load_state_dict(state)
    assert restored.unit_modules == freeze.unit_modules and restored.frozen_units == ["net.0", "net.2"]

    # a checkpoint written before units were blocks: each unit is its one module, and it still freezes
    legacy_state = {k: v for k, v in state.items() if k != "blocks"} | {"version": 1}
    legacy = FreezeTraining(verbose=False)
    legacy.load_state_dict(legacy_state)
    assert legacy.unit_modules == {"net.0": ["net.0"], "net.2": ["net.2"], "net.4": ["net.4"]}
    model = Wrapper()
    make_trainer([legacy], max_steps=2).fit(model, loader())
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}


def test_dict_schedule_steps_epochs_fractions_and_globs():
    freeze = FreezeTraining(schedule={"block1": "epoch:1", "block*": 0.5}, verbose=False)
    make_trainer([freeze]).fit(Net(), loader())
    assert [(e["unit"], e["step"]) for e in freeze.events] == [("block1", 8), ("block2", 12)]
    freeze = FreezeTraining(schedule={"block2": "step:5", "block1": "fraction:0.25"}, verbose=False)
    make_trainer([freeze]).fit(Net(), loader())
    assert [(e["unit"], e["step"]) for e in freeze.events] == [("block2", 5), ("block1", 6)]


def test_freezing_everything_needs_freeze_last_and_then_stops_training():
    with pytest.raises(RepSimValueError, match="would freeze every unit.*freeze_last=True"):
        make_trainer([FreezeTraining(schedule={"*": 5}, units=UNITS)]).fit(Net(), loader())
    freeze = FreezeTraining(schedule={"block*": 3, "head": 6}, units=UNITS, freeze_last=True, verbose=False)
    trainer = make_trainer([freeze])
    trainer.fit(Net(), loader())
    assert freeze.frozen_units == UNITS and trainer.global_step == 6
    freeze = FreezeTraining(schedule=LinearSchedule(end=0.5), units=UNITS, freeze_last=True, verbose=False)
    trainer = make_trainer([freeze])
    trainer.fit(Net(), loader())
    assert [e["step"] for e in freeze.events] == [4, 8, 12] and trainer.global_step == 12


def test_similarity_schedule_internal_probe_epoch_checks():
    pl.seed_everything(4)
    freeze = FreezeTraining(
        schedule=SimilaritySchedule(threshold=1e-6, patience=1, check_every_n_steps=None, probe_size=20), verbose=False
    )
    make_trainer([freeze], max_steps=-1, max_epochs=3).fit(Net(), loader())
    # reference before training, then one check per epoch end; one unit per check, lowest first
    assert [(e["unit"], e["step"], e["epoch"]) for e in freeze.events] == [("block1", 8, 0), ("block2", 16, 1)]
    assert [sorted(h["values"]) for h in freeze.history] == [["block1", "block2"], ["block2"], []][:2]
    assert all(0 < v <= 1 + 1e-9 for h in freeze.history for v in h["values"].values())
    assert freeze.state_dict()["probe"].shape == (20, 6)


@pytest.mark.parametrize(("max_steps", "warns"), [(24, True), (40, False)])
def test_similarity_schedule_says_once_when_its_probe_cannot_fill(max_steps, warns):
    # 8 examples per batch: 24 steps see 192 < 256 examples, 40 steps see 320
    freeze = FreezeTraining(schedule=SimilaritySchedule(probe_size=256, check_every_n_steps=4), verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([freeze], max_steps=max_steps).fit(Net(), loader(n=8 * 50))
    said = [str(w.message) for w in caught if "nothing will freeze" in str(w.message)]
    if warns:
        assert len(said) == 1 and "first 256 training examples" in said[0] and "about 192" in said[0], said
        assert freeze.events == []
    else:
        assert said == []


def test_similarity_schedule_waits_for_the_lowest_unit():
    freeze = FreezeTraining(schedule=SimilaritySchedule(source="external", patience=2), units=UNITS, verbose=False)

    class Feed(Callback):
        values = [
            {"block1": 0.5, "block2": 1.0},
            {"block1": 0.995, "block2": 1.0},
            {"block1": 0.999, "block2": 1.0},
            {"block2": float("nan")},
            {"block2": 0.999},
            {"block2": 0.999},
        ]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx < len(self.values):
                freeze.update_similarity(trainer.global_step, self.values[batch_idx])

    make_trainer([freeze, Feed()], max_steps=10).fit(Net(), loader())
    # block2 is stable from the start but may only freeze after block1 (contiguous prefix)
    assert [(e["unit"], e["step"]) for e in freeze.events] == [("block1", 3), ("block2", 6)]
    assert "2 consecutive checks" in freeze.events[0]["reason"]


# --------------------------------------------------------------------------- resume


class StepDataNet(Net):
    """Draws each training batch from the global step.

    Lightning (without a stateful dataloader) restarts the data of an interrupted epoch from its
    first batch, so a resumed run would see other batches than the uninterrupted one; tying the
    data to the step keeps the comparison about the model, optimizer and callback state.
    """

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(1000 + self.global_step)
        x = torch.randn(8, 6, generator=g)
        return nn.functional.cross_entropy(self(x), (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


@pytest.mark.parametrize("schedule", ["linear", "similarity"])
@pytest.mark.filterwarnings("error:Found .* in eval mode at the start of training")  # re-freezing is not a mistake
def test_resume_ends_with_the_same_parameters(tmp_path, schedule):
    def run(max_steps, ckpt_path=None, save=False):
        pl.seed_everything(5)
        freeze = FreezeTraining(
            schedule=SimilaritySchedule(check_every_n_steps=2, threshold=0.9, patience=2, probe_size=12)
            if schedule == "similarity"
            else schedule,
            verbose=False,
        )
        callbacks = [freeze]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}"))
        model = StepDataNet("sgd", lr=0.2)
        trainer = make_trainer(callbacks, max_steps=max_steps, deterministic=True, enable_checkpointing=save)
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
        return model, freeze

    full, full_freeze = run(30, save=True)
    assert len(full_freeze.frozen_units) == 2  # the schedule did freeze during the run
    # interrupted (saved every 3 steps, as a preempted job would be), then resumed after the first freeze:
    # the frozen state must be re-applied before the first step after resume
    first, second = (e["step"] for e in full_freeze.events)
    step = 3 * -(-first // 3)
    assert first <= step < second
    resumed, resumed_freeze = run(30, ckpt_path=tmp_path / f"step={step}.ckpt")
    assert resumed_freeze.frozen_units == full_freeze.frozen_units
    assert resumed_freeze.events == full_freeze.events
    assert resumed_freeze.history == full_freeze.history
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- logging


def test_logging_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    freeze = FreezeTraining(schedule="linear", units=UNITS, verbose=False)
    make_trainer([freeze], logger=logger).fit(Net(), loader())
    logger.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    # a true step plot: the old value once more at the step before each freeze, and the last step logged
    units = [(e.step, e.value) for e in acc.Scalars("freeze/frozen_units")]
    assert units == [(0, 0.0), (7, 0.0), (8, 1.0), (15, 1.0), (16, 2.0), (24, 2.0)]
    n1, n2 = sum(p.numel() for p in Net().block1.parameters()), sum(p.numel() for p in Net().block2.parameters())
    total = sum(p.numel() for p in Net().parameters())
    fractions = [e.value for e in acc.Scalars("freeze/frozen_fraction")]
    first, second = n1 / total, (n1 + n2) / total
    assert fractions == pytest.approx([0.0, 0.0, first, first, second, second])
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("freeze/events/text_summary")}
    assert sorted(texts) == [8, 16]
    assert "froze `block1`" in texts[8] and "linear schedule" in texts[8] and "froze `block2`" in texts[16]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(schedule="exponential"), "schedule='exponential' is not known"),
        (dict(schedule={"block1": 1.5}), "must lie in \\[0, 1\\].*write an int \\(1\\)"),
        (dict(schedule={"block1": True}), "a bool is not a freeze time"),
        (dict(schedule={"block1": "epoch:x"}), "'epoch:x' is not a freeze time.*'epoch:3'"),
        (dict(schedule={"block1": -3}), "a step must be >= 0"),
        (dict(schedule={}), "empty dict"),
        (dict(units="block1"), "units must be a list"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(RepSimValueError, match=match):
        FreezeTraining(**kwargs)


@pytest.mark.parametrize(
    ("schedule", "kwargs", "match"),
    [
        (LinearSchedule, dict(start=0.6, end=0.4), "0 <= start <= end <= 1"),
        (SimilaritySchedule, dict(patience=0), "patience must be a positive int"),
        (SimilaritySchedule, dict(threshold=1.5), "threshold must lie in"),
        (SimilaritySchedule, dict(source="tensorboard"), "source must be one of"),
        (TimesSchedule, dict(times={}), "empty dict"),
    ],
)
def test_bad_schedule_arguments(schedule, kwargs, match):
    with pytest.raises(RepSimValueError, match=match):
        schedule(**kwargs)


def test_update_similarity_needs_the_external_similarity_schedule():
    with pytest.raises(RepSimValueError, match=r"SimilaritySchedule\(source='external'\)"):
        FreezeTraining().update_similarity(0, {"block1": 1.0})


def test_unknown_units_are_listed():
    with pytest.raises(
        RepSimValueError, match=r"\['nope'\], which match none of the units \['block1', 'block2', 'head'\]"
    ):
        make_trainer([FreezeTraining(schedule={"nope": 3, "block1": 2})]).fit(Net(), loader())
    with pytest.raises(RepSimValueError, match=r"units \['encoder'\] are not submodules of Net"):
        make_trainer([FreezeTraining(units=["encoder", "head"])]).fit(Net(), loader())


class NoForward(Net):
    def forward(self, x):
        raise NotImplementedError("use training_step")

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.head(self.block2(self.block1(batch[0]))), batch[1])


def test_discovery_failure_says_what_to_do():
    with pytest.raises(RepSimValueError, match="could not run NoForward.*NotImplementedError.*Pass units="):
        make_trainer([FreezeTraining()]).fit(NoForward(), loader())
    freeze = FreezeTraining(units=UNITS, verbose=False)  # explicit units need no forward
    make_trainer([freeze]).fit(NoForward(), loader())
    assert freeze.frozen_units == ["block1", "block2"]


class Stream(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.randn(6), torch.tensor(0)


def test_fractions_need_bounded_training():
    stream = DataLoader(Stream(), batch_size=8)
    for kwargs in (dict(max_epochs=-1, max_steps=-1), dict(max_steps=-1)):
        with pytest.raises(RepSimValueError, match="training length is unbounded.*Set max_steps"):
            make_trainer([FreezeTraining(schedule="linear")], **kwargs).fit(Net(), stream)
    freeze = FreezeTraining(schedule={"block1": 2}, verbose=False)  # steps work in unbounded training
    trainer = make_trainer([freeze, _StopAt(4)], max_epochs=-1, max_steps=-1)
    trainer.fit(Net(), stream)
    assert freeze.frozen_units == ["block1"]


class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_ddp_without_find_unused_parameters_and_sharded_strategies_are_refused():
    freeze = FreezeTraining()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="spawn"), logger=False)
    with pytest.raises(
        RepSimValueError, match="strategy='ddp_find_unused_parameters_true'.*find_unused_parameters=True"
    ):
        freeze.setup(trainer, Net(), "fit")
    with pytest.raises(RepSimValueError, match="sharded strategy FSDPStrategy"):
        freeze.setup(types.SimpleNamespace(strategy=FSDPStrategy()), Net(), "fit")


# --------------------------------------------------------------------------- DDP


class DDPChecks(Callback):
    """Runs in each spawned process; asserts there (child-process state does not come back)."""

    def __init__(self, freeze):
        self.freeze = freeze
        self.recorder = FreezeRecorder(freeze)

    def on_train_start(self, trainer, pl_module):
        self.recorder.on_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.recorder.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.recorder.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # every rank has frozen exactly what rank 0 has, at the same step
        mine = (trainer.global_step, self.freeze.frozen_units)
        assert trainer.strategy.broadcast(mine, src=0) == mine, f"rank {trainer.global_rank} diverged: {mine}"

    def on_train_end(self, trainer, pl_module):
        assert self.freeze.frozen_units == ["block1", "block2"], self.freeze.frozen_units
        # parameters never move on any rank; BatchNorm buffers follow DDP's broadcast_buffers (rank 0's)
        self.recorder.assert_frozen_since_freeze(pl_module, ["block1", "block2"], buffers=trainer.is_global_zero)
        stats = trainer.strategy.all_gather(pl_module.block1.bn.running_mean)
        assert torch.equal(stats[0], stats[1])
        weights = trainer.strategy.all_gather(pl_module.head.weight.detach())
        assert torch.equal(weights[0], weights[1])


def test_ddp_spawn_two_processes():
    freeze = FreezeTraining(
        schedule=SimilaritySchedule(check_every_n_steps=2, threshold=0.8, patience=1, probe_size=16), verbose=False
    )
    trainer = make_trainer(
        [freeze, DDPChecks(freeze)],
        devices=2,
        strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True),
        max_steps=12,
    )
    trainer.fit(Net(), loader(16 * N_BATCHES))


@pytest.mark.parametrize("size", [2, 3])
def test_similarity_schedule_refuses_fewer_than_four_probe_examples(size):
    with pytest.raises(RepSimValueError, match=r"probe_size must be an int >= 4 \(below that every CKA"):
        SimilaritySchedule(probe_size=size)
    with pytest.raises(RepSimValueError, match="at least 4 rows"):
        SimilaritySchedule(probe=torch.randn(size, 3))

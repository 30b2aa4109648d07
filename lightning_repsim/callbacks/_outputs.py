"""Where a fit's snapshot store and figures go, also when a fit resumes or a run directory is reused.

A fit writes to ``<run dir>/repsim`` (its store and ``figures/``), or to the first free
``repsim-1``, ``repsim-2``, ... when that holds an earlier fit's outputs: no fit ever writes into
another's. A resumed fit continues the store its checkpoint records when that store is in this
fit's run directory and writable; what the interrupted fit stored and drew after the checkpoint
moves to ``superseded/after-step-N/`` (nothing stored is deleted). When the logger has moved on to
a new version, or several fits resume one checkpoint, or the run is archived read-only, the
resumed fit writes its own outputs beside its events, starting from copies of the recorded ones up
to the checkpoint, and the recorded ones stay as they are.

The store keeps the probe inputs themselves (:meth:`~lightning_repsim.store.SnapshotStore.save_probe`):
a resumed fit whose default probe now yields other examples takes the saved ones
(:func:`stored_probe`, :func:`resumed_probe`).
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_repsim.capture import Probe
from lightning_repsim.errors import RepSimError, RepSimWarning
from lightning_repsim.store import SnapshotStore, default_store_dir, open_store
from lightning_repsim.store.format import occupied

#: The figures of one logging point, under ``<output dir>/figures``.
STEP_FOLDER = "step-{:08d}"

Warn = Callable[[str, str], None]  # warn(key, message): once per key


@dataclass
class Checkpointed:
    """What a checkpoint says about the outputs of the fit it was taken from."""

    last_logged_step: int | None = None
    output_dir: str | None = None  # absent from checkpoints of state version 1
    run_id: str | None = None
    probe_hash: str | None = None

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Checkpointed:
        """From RepresentationSimilarity's checkpoint state (any version)."""
        keys = ("last_logged_step", "output_dir", "run_id", "probe_hash")
        return cls(**{key: state.get(key) for key in keys})


@dataclass
class RunOutputs:
    """One fit's outputs: the directory of its store and figures, the store (if kept), its run id."""

    directory: Path
    store: SnapshotStore | None
    run_id: str


def open_run_outputs(
    run_dir: Path,
    *,
    probe_hash: str,
    n: int,
    keep_store: bool,
    write_files: bool,
    max_store_bytes: int,
    settings: Mapping[str, Any],
    resumed: Checkpointed | None,
    warn: Warn,
    name: str | None = None,
) -> RunOutputs:
    """Place this fit's outputs under ``run_dir`` and open (or create) its store.

    ``resumed`` is the checkpoint's record when the fit resumes, else ``None``; ``name`` a named
    monitor's name (its outputs go to ``repsim-<name>``).
    """
    directory, continued, seed_from, run_id = _place(run_dir, probe_hash, keep_store, write_files, resumed, warn, name)
    run_id = run_id or secrets.token_hex(8)
    store = None
    if seed_from is not None and resumed is not None and resumed.last_logged_step is not None:
        store = _seed(seed_from, directory, resumed.last_logged_step, probe_hash, keep_store, warn)
    if keep_store and store is None:
        if continued:
            store = SnapshotStore.open(directory, mode="a", probe_hash=probe_hash)
            run_id = store.run_id or run_id
        else:
            store = SnapshotStore.create(
                directory, probe_hash=probe_hash, n=n, settings=settings, max_bytes=max_store_bytes, run_id=run_id
            )
    if continued and resumed is not None and resumed.last_logged_step is not None:
        _set_aside_after(directory, store, resumed.last_logged_step, warn)
    return RunOutputs(directory, store, run_id)


def stored_probe(resumed: Checkpointed, run_dir: Path, name: str | None = None) -> tuple[torch.Tensor, Path] | None:
    """The probe inputs saved with the checkpointed fit's store, and where: the store the checkpoint records,
    else this run directory's, when it is that fit's (same probe hash and run id) and its saved probe hashes as
    the checkpoint's did. None when there is none (an older store, a probe that was not a tensor, damage)."""
    candidates = [Path(resumed.output_dir)] if resumed.output_dir else []
    for directory in dict.fromkeys([*candidates, default_store_dir(run_dir, name=name)]):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RepSimWarning)  # damage is reported once it is opened for appending
                store = open_store(directory)
                if store.probe_hash != resumed.probe_hash or not store.has_probe:
                    continue
                if resumed.run_id is not None and _run_id(store) not in (None, resumed.run_id):
                    continue
                inputs = store.load_probe()
        except (RepSimError, OSError):
            continue
        if isinstance(inputs, torch.Tensor) and Probe(inputs).hash == resumed.probe_hash:
            return inputs, directory
    return None


def resumed_probe(resumed: Checkpointed, probe: Probe, run_dir: Path, source: Any, name: str | None) -> Probe:
    """The probe of a resumed fit whose probe yields other examples than the checkpointed fit's: with a
    probe the user did not give as data (``source`` ``"val:N"``, ``"train:N"`` or None), the one saved with
    the store; else an error."""
    given = source if isinstance(source, str) else None
    spec = given or "the default probe 'val:512'"
    if source is None or given is not None:
        found = stored_probe(resumed, run_dir, name)
        if found is not None:
            rank_zero_info(
                f"RepresentationSimilarity: {spec} now yields other examples than when the checkpoint was saved "
                f"(probe hash {probe.hash}, then {resumed.probe_hash}: random transforms, or changed data?); "
                f"the resumed fit uses the probe saved with its snapshot store {found[1]}, so that every "
                "snapshot stays comparable."
            )
            return Probe(found[0])
        raise RepSimError(
            f"the probe set changed since the checkpoint: {spec} now yields other examples (probe hash "
            f"{probe.hash}, then {resumed.probe_hash}) and no probe saved with the checkpointed fit's snapshot "
            "store was found. Pass the interrupted fit's probe examples as probe= (a tensor), or start a new run "
            "(without ckpt_path, or with a new logger version) to monitor with the new probe."
        )
    raise RepSimError(
        f"the probe set changed since the checkpoint (probe hash {resumed.probe_hash} then, {probe.hash} now): "
        "the snapshots would not be comparable. Resume with the same probe= data as the interrupted fit, or "
        "start a new run (without ckpt_path, or with a new logger version) to monitor with the new probe."
    )


def _run_id(store: SnapshotStore) -> str | None:
    """A store's run id; a format-1 store's is in its settings, where the callback kept it."""
    recorded = store.settings.get("run_id")
    return store.run_id or (recorded if isinstance(recorded, str) else None)


def run_directory(trainer: Any, log_dir: str | None) -> Path:
    """The fit's run directory: its TensorBoardLogger's, else ``log_dir`` (``trainer.log_dir``) or the
    Trainer's root directory."""
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    return Path(log_dir or trainer.default_root_dir) if logger is None else Path(logger.log_dir)


def step_folders(figures: Path) -> dict[int, Path]:
    """The per-step figure folders under ``figures``, by step, ascending."""
    found = {int(f.name[5:]): f for f in figures.glob("step-*") if f.name[5:].isdigit() and f.is_dir()}
    return dict(sorted(found.items()))


def _writable(directory: Path) -> bool:
    """Whether the files of ``directory`` (a store and its figures) can be replaced and added to."""
    return os.access(directory, os.W_OK | os.X_OK) and all(
        os.access(path, os.W_OK) for path in (directory / "figures", directory / "superseded") if path.exists()
    )


def _holds_this_run(directory: Path, probe_hash: str, keep_store: bool, run_id: str | None) -> bool:
    """Whether ``directory`` holds the checkpointed fit's outputs: its store (same run id and probe), or figures."""
    if not keep_store:
        return directory.is_dir()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RepSimWarning)  # damage is reported once it is opened for appending
            store = SnapshotStore.open(directory, mode="r")
    except RepSimError:
        return False
    # a checkpoint without a run id (state version 1) takes the store by its probe alone, as it did then
    return store.probe_hash == probe_hash and run_id in (None, _run_id(store))


def _place(
    run_dir: Path,
    probe_hash: str,
    keep_store: bool,
    write_files: bool,
    resumed: Checkpointed | None,
    warn: Warn,
    name: str | None = None,
) -> tuple[Path, bool, Path | None, str | None]:
    """``(output directory, whether to continue the store there, where to seed it from, run id)``.

    A resumed fit continues its own store when it is in ``run_dir`` and writable (found where the
    checkpoint says, else by its run id in ``run_dir``); when it is elsewhere or read-only, the fit
    starts a new store seeded from it. Otherwise the fit never writes into another fit's outputs:
    when ``<run_dir>/repsim`` holds anything, it takes the first free ``repsim-1``, ``repsim-2``, ...
    """
    default = default_store_dir(run_dir, name=name)
    run_id = None if resumed is None else resumed.run_id
    if not (keep_store or write_files):  # nothing goes to disk
        return default, False, None, run_id
    seed_from = None
    recorded = Path(resumed.output_dir) if resumed is not None and resumed.output_dir else None
    if resumed is not None:
        # the recorded place, else the default one (the run directory was moved since), where a store tells
        # by its run id whether it is this run's; figures alone cannot tell, so then only the recorded place
        candidates = [recorded, default] if recorded is None or keep_store else [recorded]
        holders = [
            c
            for c in dict.fromkeys(p for p in candidates if p is not None)
            if _holds_this_run(c, probe_hash, keep_store, run_id)
        ]
        for candidate in holders:
            if candidate.parent.resolve() == run_dir.resolve() and _writable(candidate):
                return candidate, True, None, run_id
        if holders and resumed.last_logged_step is not None:
            # The logger moved on (a new version), several fits resume one checkpoint (a sweep), or the
            # run is archived read-only: this fit keeps its own outputs beside its events, starting from
            # copies of the recorded ones up to the checkpoint, which stay as they are.
            seed_from = holders[0]
    index = next(i for i in itertools.count() if not occupied(default_store_dir(run_dir, i, name)))
    directory = default_store_dir(run_dir, index, name)
    last = None if resumed is None else resumed.last_logged_step
    if seed_from is not None:
        elsewhere = seed_from.parent.resolve() != run_dir.resolve()
        why = (
            f"outside this fit's run directory {run_dir} (a logger with a new version, or several fits "
            "resuming one checkpoint)"
            if elsewhere
            else "and cannot be written to (read-only)"
        )
        tip = (
            " To continue in one directory, resume with the first fit's logger version, e.g. TensorBoardLogger("
            f"<same save_dir and name>, version={seed_from.parent.name!r})."
            if elsewhere
            else ""
        )
        warn(
            f"seeded:{seed_from}:{directory}",
            (
                f"RepresentationSimilarity: the checkpointed fit's snapshot store and figures are in {seed_from}, "
                f"{why}: this fit writes its own to {directory}, starting from copies of those up to step {last}, "
                f"and {seed_from} stays as it is.{tip}"
            ),
        )
    elif resumed is not None and keep_store and last is not None:
        where = (
            f"the checkpoint's snapshot store {recorded} is gone or another run's"
            if recorded
            else f"the checkpoint does not say where its snapshot store is (it was saved by an older "
            f"lightning_repsim) and {default} holds none of this run"
        )
        warn(
            f"lost:{recorded or default}:{directory}",
            (
                f"RepresentationSimilarity: {where}; a new store starts at {directory}, without the snapshots up to "
                f"step {last}: reference 'final' and its convergence map cover only the steps from here on."
            ),
        )
    elif index and resumed is None:
        warn(
            f"occupied:{default}",
            (
                f"RepresentationSimilarity: {default} already holds the snapshot store or figures of an earlier fit, "
                f"which stay as they are; this fit writes its own to {directory}. To keep fits apart, give each its "
                "own run directory (a new logger version, e.g. TensorBoardLogger(..., version=None), or another "
                "default_root_dir); to continue the earlier fit, pass its checkpoint to fit(ckpt_path=...)."
            ),
        )
    return directory, False, seed_from, run_id


def _seed(
    source: Path, directory: Path, step: int, probe_hash: str, keep_store: bool, warn: Warn
) -> SnapshotStore | None:
    """A resume writing to a new place starts from copies of the snapshots (with their thinning record) and
    figures up to ``step`` that ``source`` holds, so that "final" covers the whole run. A copy that fails
    (a full disk, say) leaves this fit with a store of its own steps only, and a warning: never a failed fit."""
    store = None
    try:
        if keep_store:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RepSimWarning)  # damage there is that store's own business
                earlier = SnapshotStore.open(source, mode="r", probe_hash=probe_hash)
                store = earlier.copy_until(directory, step)
        for folder_step, folder in step_folders(source / "figures").items():
            if folder_step <= step:
                shutil.copytree(folder, directory / "figures" / folder.name, dirs_exist_ok=True)
    except Exception as err:  # only copies were written: start this fit's outputs afresh
        shutil.rmtree(directory, ignore_errors=True)
        warn(
            f"seed-failed:{directory}",
            (
                f"RepresentationSimilarity could not copy the snapshots and figures up to step {step} from {source} "
                f"to {directory} ({type(err).__name__}: {err}); this fit's store starts without them, and "
                "reference 'final' covers only the steps from here on."
            ),
        )
        return None
    return store


def _set_aside_after(directory: Path, store: SnapshotStore | None, step: int, warn: Warn) -> None:
    """Resuming at ``step``: what the interrupted fit stored and drew after it leaves the store and figures
    for ``superseded/after-step-<step>/`` (nothing stored is deleted), so the resumed fit has every step once."""
    figures = directory / "figures"
    later = [folder for folder_step, folder in step_folders(figures).items() if folder_step > step]
    later += [figures / "final"] if (figures / "final").exists() else []
    stored_later = store is not None and any(s > step for s in store.steps)
    if not later and not stored_later:
        return
    base = aside = directory / "superseded" / f"after-step-{step:08d}"
    for k in itertools.count(1):  # a second resume at the same step keeps the first one's
        if not aside.exists():
            break
        aside = base.with_name(f"{base.name}-{k}")
    moved = store.truncate_after(step, move_to=aside / "store") if store is not None else []
    for folder in later:
        (aside / "figures").mkdir(parents=True, exist_ok=True)
        os.replace(folder, aside / "figures" / folder.name)
    if moved:  # a finished fit trained further only has its old final-snapshot figures moved: no news
        warn(
            "superseded",
            f"RepresentationSimilarity resumes at step {step}; what the interrupted fit stored "
            f"after it (steps {moved}) and its figures were moved to {aside}, so the store holds every step once.",
        )

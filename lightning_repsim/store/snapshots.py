"""Snapshot store: each layer's probe-set representation, per logging step, on disk.

During training a callback captures, at each logging point ("step"), one 2-D float tensor per
layer: rows are the ``n`` probe examples (always in the same order), columns are either the
layer's reduced features or a Gram factor ``F`` with ``F @ F.T == X @ X.T`` (the caller decides
and records the layer's ``kind``, e.g. ``"features"`` or ``"gram_factor"``). Nothing is centred
here: tensors are stored exactly as given (cast to float32), and similarity measures centre
them later. The store keeps them so that any two steps, or two runs, can be compared later
without re-running a model (:func:`lightning_repsim.analysis.similarity_between`).

The on-disk format, its integrity checks (probe hash, run id, checksums) and its crash safety are
:mod:`lightning_repsim.store.format`; nothing is ever pickled, so opening someone else's run reads
data and never executes code. Reading is :class:`~lightning_repsim.store.reading.StoreReader`, which
this class extends with writing. The probe inputs themselves can be saved with the store
(:meth:`SnapshotStore.save_probe`), so that a resumed fit or a later comparison uses the very same
examples.

A store has one writer at a time (global rank zero); any number of readers may open it, also
while it is being written.

Example:
    >>> import tempfile, torch
    >>> from lightning_repsim.store import SnapshotStore, open_store
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     store = SnapshotStore.create(tmp + "/repsim", probe_hash="3f2a", n=4)
    ...     store.add(0, {"conv1": torch.ones(4, 3), "fc": torch.zeros(4, 2)})
    ...     store.add(50, {"conv1": torch.ones(4, 3), "fc": torch.ones(4, 2)})
    ...     reader = open_store(tmp + "/repsim")
    ...     print(reader.steps, reader.layers, reader.kinds["fc"], reader.get("last", "fc").shape)
    [0, 50] ['conv1', 'fc'] features torch.Size([4, 2])
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import secrets
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import lightning_repsim
from lightning_repsim._io import TMP_SUFFIX, PathLike, atomic_write
from lightning_repsim.errors import RepSimError, RepSimValueError, RepSimWarning, one_line
from lightning_repsim.store.format import (
    DEFAULT_MAX_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PROBE_FILE,
    STEP_FILE_RE,
    as_step,
    encode_probe,
    encode_snapshot,
    occupied,
    read_manifest,
    step_file_name,
    write_manifest,
)
from lightning_repsim.store.reading import StepLike, StoreReader
from lightning_repsim.store.thinning import THINNING_RULE, plan_for_new

__all__ = ["SnapshotStore", "StepLike", "open_store"]


def open_store(path: PathLike, *, probe_hash: str | None = None, skip_damaged: bool = False) -> SnapshotStore:
    """Open an existing store read-only (same as ``SnapshotStore.open(path, mode="r", ...)``).

    Args:
        path: the store directory.
        probe_hash: if given, the store's probe hash must equal it.
        skip_damaged: read every step file whole and leave out a damaged or foreign one, with one
            :class:`~lightning_repsim.errors.RepSimWarning` each, instead of raising.

    Raises:
        RepSimError: no store at ``path``, a corrupt or newer-format store, or a probe-hash
            mismatch; the one-line message names the file and what is wrong.
        RepSimIntegrityError: (without ``skip_damaged``) a step file that is another run's, recorded
            on another probe, or does not match the manifest.
    """
    return SnapshotStore.open(path, mode="r", probe_hash=probe_hash, skip_damaged=skip_damaged)


class SnapshotStore(StoreReader):
    """Per-step, per-layer ``(n, r)`` float32 tensors of one run, in a directory on disk.

    Rows are the ``n`` probe examples (the same examples, in the same order, at every step);
    columns are neurons (``kind="features"``) or the columns of a Gram factor ``F`` with
    ``F @ F.T == X @ X.T`` (``kind="gram_factor"``). ``r`` may differ between layers and steps.
    Nothing is centred: tensors are stored as given, cast to float32.

    Make one with :meth:`create`, reopen it with :meth:`open` (``mode="a"`` to append) or
    :func:`open_store` (read-only). See the module docstring for the on-disk format.

    Disk budget: the step files never exceed ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`,
    1 GB, which holds 20 layers x n=1024 x 30 snapshots at r <= 400: 30 x 32.8 MB = 983 MB).
    When adding a snapshot would exceed it, older snapshots are thinned: the store keeps the
    first snapshot, the newest, and every ``stride``-th snapshot in logging order, doubling
    ``stride`` (1, 2, 4, ...) until the kept ones fit. Kept snapshots therefore stay evenly
    spaced over the whole run, and between doublings the store holds half to all of what fits.
    Once the stride is above 1, the previous newest snapshot is dropped when a new one arrives
    if it is off the stride grid. Dropped steps are listed in the manifest (``thinned``); one
    :class:`~lightning_repsim.errors.RepSimWarning` is emitted the first time it happens. The
    stride never decreases, also when the store is reopened with a larger budget.

    Steps strictly increase. To resume from a checkpoint taken at step ``s``, call
    :meth:`truncate_after` ``(s)`` (drops later snapshots so no step appears twice), or add with
    ``overwrite=True``, which replaces a stored step and drops every step after it.

    Attributes:
        path: the store directory.
        mode: ``"r"`` (read-only) or ``"a"`` (append).
    """

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        path: PathLike,
        *,
        probe_hash: str,
        n: int,
        settings: Mapping[str, Any] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        exist_ok: bool = False,
        run_id: str | None = None,
    ) -> SnapshotStore:
        """Make a new, empty store at ``path`` (created with parents) and open it for appending.

        Args:
            path: the store directory, by convention :func:`default_store_dir` of the run.
            probe_hash: identifies the probe set (its examples and order); stores are only
                comparable when their probe hashes agree.
            n: number of probe examples, the row count of every stored tensor.
            settings: free-form JSON-serialisable record of how the snapshots were made
                (reduction, layer selection, ...), stored verbatim in the manifest.
            max_bytes: disk budget of the step files in bytes, default 1 GB (see the class
                docstring for the thinning rule).
            exist_ok: if a store already exists at ``path``, open it for appending instead of
                failing (its probe hash and ``n`` must match; its settings are kept and the
                ``max_bytes`` given here applies).
            run_id: the store's run id, written in the manifest and in every step file so that a
                file of another run is refused (default: 16 random hex digits).

        Raises:
            RepSimValueError: an invalid argument.
            RepSimError: a store already exists at ``path`` (and ``exist_ok`` is false), or it
                exists with a different probe hash or ``n``.
        """
        path = Path(path)
        if not isinstance(probe_hash, str) or not probe_hash:
            raise RepSimValueError(f"probe_hash must be a non-empty str, got {probe_hash!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RepSimValueError(f"n (probe examples) must be an int >= 1, got {n!r}")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise RepSimValueError(f"run_id must be a non-empty str, got {run_id!r}")
        max_bytes = cls._check_max_bytes(max_bytes)
        settings = {} if settings is None else settings
        if not isinstance(settings, Mapping):
            raise RepSimValueError(f"settings must be a dict, got {type(settings).__name__}")
        try:
            settings = json.loads(json.dumps(dict(settings), allow_nan=False))
        except (TypeError, ValueError) as err:
            message = f"settings must be JSON-serialisable: {one_line(err)}"
            raise RepSimValueError(message) from None

        if (path / MANIFEST_NAME).exists():
            if not exist_ok:
                raise RepSimError(
                    f"{path / MANIFEST_NAME}: a snapshot store already exists here; open it with "
                    "SnapshotStore.open(path, mode='a') to append, or pass exist_ok=True"
                )
            store = cls.open(path, mode="a", probe_hash=probe_hash, max_bytes=max_bytes)
            if store.n != n:
                raise RepSimError(f"{path / MANIFEST_NAME}: existing store has n={store.n} probe examples, not n={n}")
            return store

        path.mkdir(parents=True, exist_ok=True)
        manifest: dict[str, Any] = {
            "probe_hash": probe_hash,
            "run_id": run_id or secrets.token_hex(8),
            "n": n,
            "layers": [],
            "kinds": {},
            "settings": settings,
            "max_bytes": max_bytes,
            "steps": [],
            "thinned": {"stride": 1, "dropped_steps": []},
            "lost_steps": [],
            "probe": None,
        }
        store = cls(path, "a", manifest)
        store._commit()
        return store

    @classmethod
    def open(
        cls,
        path: PathLike,
        mode: str = "r",
        *,
        probe_hash: str | None = None,
        max_bytes: int | None = None,
        skip_damaged: bool = False,
    ) -> SnapshotStore:
        """Open an existing store.

        Every step file's header is checked against the manifest: step, layers, shapes, probe hash
        and run id. A manifest step whose file is missing or shorter than recorded (a copy or crash
        artefact) is dropped with one :class:`~lightning_repsim.errors.RepSimWarning`; in
        ``mode="a"`` this is written back to the manifest (``lost_steps``) and leftover temporary and
        unlisted step files are deleted. Appending to a store of ``format_version`` 1 upgrades its
        manifest (a run id is drawn); its old step files keep their lighter checks.

        Args:
            path: the store directory.
            mode: ``"r"`` read-only, ``"a"`` append.
            probe_hash: if given, the store's probe hash must equal it.
            max_bytes: ``mode="a"`` only: a new disk budget (recorded in the manifest); by
                default the store keeps its own.
            skip_damaged: ``mode="r"`` only: read every step file whole (checksums included) and
                leave out each damaged or foreign one with a RepSimWarning naming it, instead of
                raising.

        Raises:
            RepSimValueError: an invalid ``mode`` or ``max_bytes``.
            RepSimError: no store at ``path``; bad JSON, a wrong format name or a newer
                ``format_version`` in the manifest; a step file that does not match the
                manifest; a probe-hash mismatch. The one-line message names the file.
            RepSimIntegrityError: (the RepSimError of a step file) another run's or probe's file,
                or one that does not match the manifest.
        """
        if mode not in ("r", "a"):
            raise RepSimValueError(f"mode must be 'r' (read-only) or 'a' (append), got {mode!r}")
        if max_bytes is not None and mode != "a":
            raise RepSimValueError("max_bytes can only be changed when opening with mode='a'")
        if skip_damaged and mode != "r":
            raise RepSimValueError("skip_damaged=True reads a store: open it with mode='r'")
        path = Path(path)
        manifest = read_manifest(path)
        if probe_hash is not None and probe_hash != manifest["probe_hash"]:
            raise RepSimError(
                f"{path / MANIFEST_NAME}: probe hash mismatch: the store was made with probe "
                f"hash {manifest['probe_hash']!r}, expected {probe_hash!r}; the probe set changed "
                "(use a new store directory) or this is another run's store"
            )
        store = cls(path, mode, manifest)
        lost = store._check_files(skip_damaged)
        if mode == "a":
            changed = bool(lost) or manifest["format_version"] < FORMAT_VERSION or store._probe != manifest["probe"]
            if store._run_id is None:  # a format-1 store: its run id, if the callback kept one, else a new one
                recorded = store._settings.get("run_id")
                store._run_id = recorded if isinstance(recorded, str) and recorded else secrets.token_hex(8)
            if max_bytes is not None and cls._check_max_bytes(max_bytes) != store._max_bytes:
                store._max_bytes = max_bytes
                changed = True
            if changed:
                store._commit()
            store._remove_debris()
        return store

    @staticmethod
    def _check_max_bytes(max_bytes: Any) -> int:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise RepSimValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
        return max_bytes

    # ------------------------------------------------------------------ writing

    def add(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        kinds: Mapping[str, str] | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        """Store one snapshot: a ``(n, r)`` tensor per layer, rows the probe examples.

        The first call fixes the layer set, its order (the dict's order) and each layer's
        kind; later calls must give the same layers (any order) and, if they pass ``kinds``,
        the same kinds. Tensors may live on any device and have any floating dtype; they are
        stored as float32, uncentred. When the disk budget would be exceeded, older snapshots
        are thinned first (see the class docstring), so the step files never exceed it.

        Args:
            step: the logging step (e.g. ``trainer.global_step``), ``>= 0``, greater than every
                stored step unless ``overwrite`` is true.
            tensors: layer name -> ``(n, r)`` tensor.
            kinds: layer name -> kind (``"features"``, ``"gram_factor"``, ...); layers left out
                get ``"features"`` on the first call and keep their stored kind afterwards.
            overwrite: allow ``step`` to be at or before the last stored step (e.g. after
                resuming from an earlier checkpoint): that step and every later one are
                dropped, then the new snapshot is added, so the store keeps one linear history.

        Raises:
            RepSimValueError: a step that is not after the last stored one (without
                ``overwrite``), a layer set, row count or kind that differs from the store's,
                a tensor that is not 2-D floating point, or a snapshot too large for the budget.
            RepSimError: the store was opened read-only.
            OSError: writing failed (disk full, ...); the store on disk and in memory is as
                before the call, or thinned when only the final write failed.
        """
        self._require_writable()
        step = as_step(step)
        if not isinstance(tensors, Mapping) or not tensors:
            raise RepSimValueError(f"step {step}: tensors must be a non-empty dict of layer name -> (n, r) tensor")
        layers = self._layers or [self._check_layer_name(name) for name in tensors]
        if set(tensors) != set(layers):
            missing = [name for name in layers if name not in tensors]
            extra = [name for name in tensors if name not in layers]
            raise RepSimValueError(
                f"step {step}: layers differ from the store's {layers} (fixed at the first add): "
                f"missing {missing}, unexpected {extra}"
            )
        new_kinds = self._merge_kinds(step, layers, kinds)
        data = {name: self._as_float32(step, name, tensors[name]) for name in layers}
        last = self._entries[-1]["step"] if self._entries else None
        if last is not None and step <= last:
            if not overwrite:
                where = "is already stored" if step in self else f"is before the last step {last}"
                raise RepSimValueError(
                    f"step {step} {where}; steps must strictly increase. When resuming from a "
                    f"checkpoint, call truncate_after(<checkpoint step>) first, or pass "
                    f"overwrite=True to replace step {step} and drop the steps after it"
                )
        blob = encode_snapshot(step, self._probe_hash, data, self._run_id)

        # Plan the thinning before touching the disk, so an impossible budget changes nothing.
        kept = [e for e in self._entries if e["step"] < step]
        mask, stride = plan_for_new(kept, self._dropped + self._lost, step, len(blob), self._stride, self._max_bytes)

        if overwrite and last is not None and step <= last:
            self.truncate_after(step - 1)
        drop = [e for e, keep in zip(kept, mask) if not keep]
        if drop:
            first_time = self._stride == 1 and stride > 1
            dropped = sorted(set(self._dropped) | {e["step"] for e in drop})
            self._commit(
                entries=[e for e, keep in zip(kept, mask) if keep],
                stride=stride,
                dropped=dropped,
            )
            self._unlink([e["file"] for e in drop])
            if first_time:
                warnings.warn(
                    f"{self.path}: snapshots would exceed the disk budget max_bytes="
                    f"{self._max_bytes} at step {step}; thinning older snapshots to one in "
                    f"{stride} (the first and the newest are always kept; dropped steps are listed "
                    f"in {MANIFEST_NAME}). To keep them all, give the store a larger budget: "
                    "RepresentationSimilarity(max_store_bytes=...) or SnapshotStore.create/open(..., max_bytes=...)",
                    RepSimWarning,
                    stacklevel=2,
                )

        name = step_file_name(step)
        atomic_write(self.path / name, blob, durable=True)
        entry = {"step": step, "file": name, "nbytes": len(blob), "format_version": FORMAT_VERSION}
        self._commit(
            entries=self._entries + [entry],
            layers=layers,
            kinds=new_kinds,
            stride=stride,
            lost=[s for s in self._lost if s < step],
        )

    def save_probe(self, inputs: Any) -> None:
        """Save the probe inputs with the store (``probe.safetensors``, checksummed; replaces a saved one).

        Args:
            inputs: the probe inputs: a tensor (any dtype safetensors holds), a tuple of tensors or a
                dict of str -> tensor; :meth:`load_probe` gives them back as such, on the CPU.

        Raises:
            RepSimValueError: ``inputs`` of another type, or of a dtype safetensors cannot hold.
            RepSimError: the store was opened read-only.
            OSError: writing failed; the store is as before the call.

        Example:
            >>> import tempfile, torch
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     store = SnapshotStore.create(tmp, probe_hash="p", n=3)
            ...     store.save_probe(torch.arange(6).reshape(3, 2))
            ...     open_store(tmp).load_probe().tolist()
            [[0, 1], [2, 3], [4, 5]]
        """
        self._require_writable()
        blob = encode_probe(inputs, self._probe_hash, self._run_id)
        atomic_write(self.path / PROBE_FILE, blob, durable=True)
        self._commit(probe={"file": PROBE_FILE, "nbytes": len(blob)})

    def truncate_after(self, step: int, *, move_to: PathLike | None = None) -> list[int]:
        """Drop every snapshot after ``step`` (used when resuming from an earlier checkpoint).

        The manifest is rewritten first, then the files are deleted (or moved into ``move_to``),
        so a crash in between leaves unlisted files that are ignored. Dropped-by-thinning records
        after ``step`` are forgotten too; the layer set and the thinning stride are kept.

        Args:
            step: the last step to keep (the checkpoint's step); ``-1`` empties the store.
            move_to: a new or empty directory (created if needed) that receives the dropped step
                files, with a manifest listing them (a store :func:`open_store` reads), instead of
                deleting them.

        Returns:
            The steps removed, ascending.

        Raises:
            RepSimError: the store was opened read-only.
            RepSimValueError: ``move_to`` is a directory that is not empty.
        """
        self._require_writable()
        try:
            if isinstance(step, bool):
                raise TypeError
            step = operator.index(step)
        except TypeError:
            raise RepSimValueError(f"step must be an int, got {step!r}") from None
        removed = [e for e in self._entries if e["step"] > step]
        if removed and move_to is not None and occupied(Path(move_to)):
            raise RepSimValueError(
                f"move_to={str(move_to)!r} is not empty; give a new directory for the "
                f"{len(removed)} snapshot(s) after step {step}."
            )
        dropped = [s for s in self._dropped if s <= step]
        lost = [s for s in self._lost if s <= step]
        if removed or dropped != self._dropped or lost != self._lost:
            if removed and move_to is not None:  # the moved steps stay a store of their own
                aside = Path(move_to)
                aside.mkdir(parents=True, exist_ok=True)
                if self._probe is not None:
                    _link_or_copy(self.path / PROBE_FILE, aside / PROBE_FILE)
                write_manifest(aside, {**self._manifest(), "steps": [dict(e) for e in removed]})
            self._commit(
                entries=[e for e in self._entries if e["step"] <= step],
                dropped=dropped,
                lost=lost,
            )
            if removed and move_to is not None:
                for entry in removed:
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(self.path / entry["file"], Path(move_to) / entry["file"])
            else:
                self._unlink([e["file"] for e in removed])
        return [e["step"] for e in removed]

    def copy_until(self, path: PathLike, step: int) -> SnapshotStore:
        """A new store at ``path`` with this store's snapshots up to ``step``, opened for appending.

        The copy keeps the layers, settings, disk budget and thinning record (stride and dropped
        steps), so thinning goes on as it would have here. Step files are hard-linked where the
        file system allows it (they are never rewritten in place), else copied; the manifest is
        written last, so a copy cut short is not a store.

        Args:
            path: a new or empty directory.
            step: the last step to copy.

        Raises:
            RepSimValueError: ``path`` is not empty.

        Example:
            >>> import tempfile, torch
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     store = SnapshotStore.create(f"{tmp}/a", probe_hash="p", n=4)
            ...     for step in (0, 10, 20):
            ...         store.add(step, {"fc": torch.ones(4, 2) * step})
            ...     copy = store.copy_until(f"{tmp}/b", 10)
            ...     copy.add(15, {"fc": torch.zeros(4, 2)})
            ...     store.steps, copy.steps
            ([0, 10, 20], [0, 10, 15])
        """
        dest = Path(path)
        if occupied(dest):
            raise RepSimValueError(f"copy_until: {dest} is not empty; give a new directory.")
        dest.mkdir(parents=True, exist_ok=True)
        kept = [e for e in self._entries if e["step"] <= step]
        for name in [e["file"] for e in kept] + ([PROBE_FILE] if self._probe is not None else []):
            _link_or_copy(self.path / name, dest / name)
        manifest = self._manifest()
        manifest["steps"] = [dict(e) for e in kept]
        manifest["thinned"]["dropped_steps"] = [s for s in self._dropped if s <= step]
        manifest["lost_steps"] = [s for s in self._lost if s <= step]
        write_manifest(dest, manifest)
        return SnapshotStore.open(dest, mode="a", probe_hash=self._probe_hash)

    # ------------------------------------------------------------------ helpers

    def _require_writable(self) -> None:
        if self.mode != "a":
            raise RepSimError(f"{self.path}: store is open read-only; use SnapshotStore.open(path, mode='a')")

    @staticmethod
    def _check_layer_name(name: Any) -> str:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise RepSimValueError(f"layer names must be non-empty str (not '__metadata__'), got {name!r}")
        return name

    def _merge_kinds(self, step: int, layers: Sequence[str], kinds: Mapping[str, str] | None) -> dict[str, str]:
        merged = {name: self._kinds.get(name, "features") for name in layers}
        for name, kind in (kinds or {}).items():
            if name not in merged:
                raise RepSimValueError(f"step {step}: kinds names layer {name!r}, which is not among {list(layers)}")
            if not isinstance(kind, str) or not kind:
                raise RepSimValueError(f"layer {name!r}: kind must be a non-empty str, got {kind!r}")
            if name in self._kinds and self._kinds[name] != kind:
                raise RepSimValueError(
                    f"layer {name!r}: kind {kind!r} differs from the stored kind "
                    f"{self._kinds[name]!r} (kinds are fixed at the first add)"
                )
            merged[name] = kind
        return merged

    def _as_float32(self, step: int, name: str, tensor: Any) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise RepSimValueError(f"step {step}, layer {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2 or tensor.shape[0] != self._n:
            raise RepSimValueError(
                f"step {step}, layer {name!r}: expected a 2-D tensor (n examples x r columns) "
                f"with n={self._n} rows, got shape {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise RepSimValueError(f"step {step}, layer {name!r}: expected a floating-point tensor, got {tensor.dtype}")
        # A fresh contiguous CPU copy: safetensors refuses tensors sharing memory.
        return torch.empty(tuple(tensor.shape), dtype=torch.float32).copy_(tensor.detach())

    def _manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": lightning_repsim.__version__,
            "run_id": self._run_id,
            "probe_hash": self._probe_hash,
            "n": self._n,
            "dtype": "float32",
            "layers": list(self._layers),
            "kinds": dict(self._kinds),
            "settings": self._settings,
            "max_bytes": self._max_bytes,
            "steps": [dict(e) for e in self._entries],
            "thinned": {
                "rule": THINNING_RULE,
                "stride": self._stride,
                "dropped_steps": list(self._dropped),
            },
            "lost_steps": list(self._lost),
            "probe": None if self._probe is None else dict(self._probe),
        }

    def _commit(self, **changes: Any) -> None:
        """Write the manifest with ``changes`` applied; adopt them only once it has landed."""
        saved = {key: getattr(self, "_" + key) for key in changes}
        for key, value in changes.items():
            setattr(self, "_" + key, value)
        try:
            write_manifest(self.path, self._manifest())
        except BaseException:
            for key, value in saved.items():
                setattr(self, "_" + key, value)
            raise

    def _unlink(self, files: Sequence[str]) -> None:
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()

    def _remove_debris(self) -> None:
        """Delete temporary files and step files the manifest does not list (append mode)."""
        listed = {e["file"] for e in self._entries}
        for child in self.path.iterdir():
            name = child.name
            debris = (name.startswith(".") and name.endswith(TMP_SUFFIX)) or (
                STEP_FILE_RE.match(name) is not None and name not in listed
            )
            if debris and child.is_file():
                with contextlib.suppress(OSError):
                    child.unlink()


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link ``source`` to ``dest`` (a store's data files are never rewritten in place), else copy it."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)

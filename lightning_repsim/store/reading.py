"""Reading a snapshot store: its index, its snapshots and its saved probe, every file checked on the way.

:class:`StoreReader` is what :func:`~lightning_repsim.store.open_store` gives (read-only) and what
:class:`~lightning_repsim.store.SnapshotStore` extends with writing. Every read checks the file against
the manifest: its step, layers, shapes, probe hash and run id, and each tensor read against its
checksum (:mod:`lightning_repsim.store.format`); a damaged or foreign file is a one-line
:class:`~lightning_repsim.errors.RepSimIntegrityError` naming it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_repsim.errors import RepSimError, RepSimIntegrityError, RepSimValueError, RepSimWarning, one_line
from lightning_repsim.store.format import MANIFEST_NAME, as_step, read_probe_file, read_step_file

__all__ = ["StepLike", "StoreReader"]

StepLike = int | str
_STEPS_SHOWN = 20


class StoreReader:
    """A snapshot store's index and data, read-only; see :class:`~lightning_repsim.store.SnapshotStore`.

    Attributes:
        path: the store directory.
        mode: ``"r"`` (read-only) or ``"a"`` (append).
    """

    def __init__(self, path: Path, mode: str, manifest: dict[str, Any]) -> None:
        # Private: use SnapshotStore.create(), SnapshotStore.open() or open_store().
        self.path = path
        self.mode = mode
        self._probe_hash: str = manifest["probe_hash"]
        self._run_id: str | None = manifest["run_id"]
        self._n: int = manifest["n"]
        self._layers: list[str] = list(manifest["layers"])
        self._kinds: dict[str, str] = dict(manifest["kinds"])
        self._settings: dict[str, Any] = manifest["settings"]
        self._max_bytes: int = manifest["max_bytes"]
        self._entries: list[dict[str, Any]] = [dict(e) for e in manifest["steps"]]
        self._stride: int = manifest["thinned"]["stride"]
        self._dropped: list[int] = list(manifest["thinned"]["dropped_steps"])
        self._lost: list[int] = list(manifest["lost_steps"])
        self._probe: dict[str, Any] | None = manifest["probe"]

    @property
    def steps(self) -> list[int]:
        """The stored steps, ascending."""
        return [e["step"] for e in self._entries]

    @property
    def layers(self) -> list[str]:
        """Layer names in capture order (empty until the first :meth:`add`)."""
        return list(self._layers)

    @property
    def kinds(self) -> dict[str, str]:
        """Layer name -> what its columns are, e.g. ``"features"`` or ``"gram_factor"``."""
        return dict(self._kinds)

    @property
    def run_id(self) -> str | None:
        """A random id drawn when the store was created: every step file carries it (None: a format-1 store)."""
        return self._run_id

    @property
    def probe_hash(self) -> str:
        """Identifies the probe set; compare stores only when these agree."""
        return self._probe_hash

    @property
    def n(self) -> int:
        """Number of probe examples: the row count of every stored tensor."""
        return self._n

    @property
    def settings(self) -> dict[str, Any]:
        """The caller's free-form settings record (a copy)."""
        return json.loads(json.dumps(self._settings))

    @property
    def max_bytes(self) -> int:
        """Disk budget of the step files, in bytes."""
        return self._max_bytes

    @property
    def nbytes(self) -> int:
        """Bytes taken by the kept step files (the manifest is not counted)."""
        return sum(e["nbytes"] for e in self._entries)

    @property
    def thinned(self) -> dict[str, Any]:
        """``{"stride": int, "dropped_steps": list[int]}``: what budget thinning removed."""
        return {"stride": self._stride, "dropped_steps": list(self._dropped)}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[int]:
        """Iterate over the stored steps, ascending (``for step in store: store.get(step)``)."""
        return iter(self.steps)

    def __contains__(self, step: object) -> bool:
        return any(e["step"] == step for e in self._entries)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, mode={self.mode!r}, steps={len(self)}, "
            f"layers={len(self._layers)}, n={self._n}, nbytes={self.nbytes})"
        )

    def get(self, step: StepLike, layer: str | None = None) -> dict[str, torch.Tensor] | torch.Tensor:
        """Load one step's tensors.

        Args:
            step: a stored step (int) or ``"last"``.
            layer: one layer name; by default all layers.

        Returns:
            ``{layer: (n, r) float32 CPU tensor}`` in capture order, or the single tensor when
            ``layer`` is given.

        Raises:
            RepSimValueError: an unknown step (the message lists the stored ones) or layer.
            RepSimError: the step file is missing or does not match the manifest.
        """
        if layer is None:
            return self.read(step)
        if layer not in self._kinds:
            raise RepSimValueError(f"unknown layer {layer!r}; the store has layers {self._layers}")
        return self.read(step, [layer])[layer]

    def read(self, step: StepLike, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Load the tensors of ``layers`` (default: every layer, in capture order) at one step.

        Raises:
            RepSimValueError: an unknown step or layer.
            RepSimError: the step file is missing or does not match the manifest.
        """
        entry = self._entry(step)
        names = list(self._layers) if layers is None else list(layers)
        unknown = [name for name in names if name not in self._kinds]
        if unknown:
            raise RepSimValueError(f"unknown layer(s) {unknown}; the store has layers {self._layers}")
        file = self.path / entry["file"]
        size = _file_size(file)
        if size is None:
            raise RepSimIntegrityError(f"{file}: missing (thinned, truncated or deleted after the store was opened)")
        if size != entry["nbytes"]:
            raise RepSimIntegrityError(f"{file}: {size} bytes, the manifest says {entry['nbytes']}")
        return read_step_file(
            file, step=entry["step"], layers=self._layers, n=self._n, names=names, **self._expect(entry)
        )

    def resolve_step(self, step: StepLike) -> int:
        """The stored step that ``step`` (an int or ``"last"``) names.

        Raises:
            RepSimValueError: not an int or ``"last"``, an empty store, or a step that is not stored
                (the message lists the stored ones and says when thinning dropped it).
        """
        return int(self._entry(step)["step"])

    def _entry(self, step: StepLike) -> dict[str, Any]:
        if isinstance(step, str):
            if step != "last":
                raise RepSimValueError(f"step must be an int or 'last', got {step!r}")
            if not self._entries:
                raise RepSimValueError(f"{self.path}: the store holds no steps yet")
            return self._entries[-1]
        value = as_step(step, expected="an int or 'last'")
        for entry in self._entries:
            if entry["step"] == value:
                return entry
        hint = f"; step {value} was dropped by budget thinning" if value in self._dropped else ""
        raise RepSimValueError(f"{self.path}: no step {value}{hint}; stored steps: {_show_steps(self.steps)}")

    def _expect(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """What a step file must carry: this store's probe hash, and its run id and checksums from format 2 on."""
        return {
            "probe_hash": self._probe_hash,
            "run_id": self._run_id,
            "checked": entry.get("format_version", 1) >= 2,
        }

    def _check_file(self, entry: Mapping[str, Any], *, full: bool) -> str | None:
        """None when ``entry``'s file is intact; why not (``"missing"``, ``"truncated, ..."``) when it is missing or
        short. A longer or foreign file, or (``full``) one whose tensors fail their checksums, raises."""
        file = self.path / entry["file"]
        size = _file_size(file)
        if size is None or size < entry["nbytes"]:
            return "missing" if size is None else f"truncated, {size} of {entry['nbytes']} bytes"
        if size > entry["nbytes"]:
            raise RepSimIntegrityError(f"{file}: {size} bytes, the manifest says {entry['nbytes']}")
        names = self._layers if full else ()
        read_step_file(file, step=entry["step"], layers=self._layers, n=self._n, names=names, **self._expect(entry))
        return None

    def _check_files(self, skip_damaged: bool = False) -> list[int]:
        """Drop manifest steps whose file is missing or truncated; check every header (``skip_damaged``: every
        byte too, and drop a damaged or foreign file with one warning each instead of raising)."""
        kept, lost = [], []
        for entry in self._entries:
            try:
                why = self._check_file(entry, full=skip_damaged)
            except RepSimIntegrityError as err:
                if not skip_damaged:
                    raise
                warnings.warn(f"skipping step {entry['step']}: {one_line(err)}", RepSimWarning, stacklevel=3)
                continue
            if why is None:
                kept.append(entry)
            else:
                lost.append((entry["step"], why))
        if lost:
            what = ", ".join(f"step {s} ({why})" for s, why in lost)
            warnings.warn(
                f"{self.path}: dropping {len(lost)} snapshot(s) listed in {MANIFEST_NAME} whose "
                f"file is damaged: {what}; the other {len(kept)} step(s) are intact",
                RepSimWarning,
                stacklevel=3,
            )
            self._lost = sorted(set(self._lost) | {s for s, _ in lost})
        self._entries = kept
        if self._probe is not None and _file_size(self.path / self._probe["file"]) != self._probe["nbytes"]:
            warnings.warn(
                f"{self.path / self._probe['file']}: the saved probe is missing or not the size the manifest "
                "says; the store is used without it",
                RepSimWarning,
                stacklevel=3,
            )
            self._probe = None
        return [s for s, _ in lost]

    def verify(self) -> list[str]:
        """Read every byte of every listed step file and of the saved probe, and check it: one line per problem.

        Returns:
            One line per damaged or foreign file, naming it and what is wrong (empty: the store is intact).
            Steps of ``format_version`` 1 have no checksums: their headers, sizes and probe hash are checked.

        Example:
            >>> import tempfile, torch
            >>> from lightning_repsim.store import SnapshotStore
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     store = SnapshotStore.create(tmp, probe_hash="p", n=4)
            ...     store.add(0, {"fc": torch.ones(4, 2)})
            ...     store.verify()
            []
        """
        problems = []
        for entry in self._entries:
            try:
                why = self._check_file(entry, full=True)
            except RepSimIntegrityError as err:
                why = one_line(err)
            if why is not None:
                problems.append(why if why.startswith(str(self.path)) else f"{self.path / entry['file']}: {why}")
        if self._probe is not None:
            try:
                self.load_probe()
            except RepSimError as err:
                problems.append(one_line(err))
        return problems

    # ------------------------------------------------------------------ the saved probe

    @property
    def has_probe(self) -> bool:
        """Whether the probe inputs are saved with the store (:meth:`load_probe`)."""
        return self._probe is not None

    def load_probe(self) -> Any:
        """The probe inputs saved with the store, as saved: a tensor, a tuple of tensors or a dict of them.

        Raises:
            RepSimError: the store holds no probe (:attr:`has_probe` is false).
            RepSimIntegrityError: the probe file is missing, damaged or another run's.
        """
        if self._probe is None:
            raise RepSimError(
                f"{self.path}: no probe is saved with this store (written by an older lightning_repsim, or its "
                "probe was not a tensor); pass the probe yourself"
            )
        file = self.path / self._probe["file"]
        size = _file_size(file)
        if size != self._probe["nbytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise RepSimIntegrityError(f"{file}: {found}, the manifest says {self._probe['nbytes']} bytes")
        return read_probe_file(file, probe_hash=self._probe_hash, run_id=self._run_id)


def _show_steps(steps: Sequence[int]) -> str:
    if len(steps) <= _STEPS_SHOWN:
        return str(list(steps))
    half = _STEPS_SHOWN // 2
    head = ", ".join(map(str, steps[:half]))
    tail = ", ".join(map(str, steps[-half:]))
    return f"[{head}, ... ({len(steps) - 2 * half} more) ..., {tail}]"


def _file_size(file: Path) -> int | None:
    """The size of ``file`` in bytes, or None when it is missing."""
    try:
        return file.stat().st_size
    except FileNotFoundError:
        return None

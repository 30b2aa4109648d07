"""Snapshot store: each layer's probe-set representation, per logging step, on disk.

During training a callback captures, at each logging point ("step"), one 2-D float tensor per
layer: rows are the ``n`` probe examples (always in the same order), columns are either the
layer's reduced features or a Gram factor ``F`` with ``F @ F.T == X @ X.T`` (the caller decides
and records the layer's ``kind``, e.g. ``"features"`` or ``"gram_factor"``). Nothing is centred
here: tensors are stored exactly as given (cast to float32), and similarity measures centre
them later. The store keeps them so that any two steps, or two runs, can be compared later
without re-running a model (:func:`similarity_between`).

Format (``format_version`` 1), one directory (by convention :func:`default_store_dir`)::

    repsim/
      manifest.json                      the index; the only file that says what is stored
      step-0000000000.safetensors        one file per kept step
      step-0000000500.safetensors

``manifest.json`` holds ``format`` (``"lightning_repsim.store"``), ``format_version``,
``library_version``, ``probe_hash``, ``n``, ``dtype`` (``"float32"``), ``layers`` (in capture
order), ``kinds`` (layer -> kind), ``settings`` (free-form JSON from the caller),
``max_bytes``, ``steps`` (a list of ``{"step", "file", "nbytes"}``, ascending), ``thinned``
(``{"rule", "stride", "dropped_steps"}``) and ``lost_steps`` (steps found damaged when the store
was reopened for appending). Each step file is a safetensors file whose tensor names are the
layer names, each an ``(n, r)`` float32 tensor, with metadata ``format``, ``format_version``,
``step`` and ``probe_hash``. Nothing is ever pickled, so opening someone else's run reads
data and never executes code.

Crash safety: every file is written to a temporary file in the same directory (a hidden name
ending in ``.tmp``), flushed, ``os.fsync``-ed and moved into place with ``os.replace``; the
manifest is rewritten the same way after each step file lands. Whenever the process dies, the
directory holds a valid store with every snapshot completed before the kill. On opening,
temporary files and step files absent from the manifest are ignored (and deleted when opened
for appending); a manifest step whose file is missing or truncated is dropped with a
:class:`~lightning_repsim.errors.RepSimWarning`.

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
import fnmatch
import json
import operator
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

import lightning_repsim
from lightning_repsim.errors import RepSimError, RepSimValueError, RepSimWarning
from lightning_repsim.functional import Representations, similarity_matrix
from lightning_repsim.functional._measures import resolve_measures

if TYPE_CHECKING:
    from lightning_repsim.comparison import Comparison

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SnapshotStore",
    "default_store_dir",
    "open_store",
    "run_store_dirs",
    "similarity_between",
]

FORMAT_NAME = "lightning_repsim.store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

#: Default disk budget of a store: 1 GB (10**9 bytes), counting the step files (the manifest,
#: a few kB, is not counted). It holds 20 layers x n=1024 examples x 30 snapshots at r <= 400
#: float32 columns: 20 * 1024 * 400 * 4 B = 32,768,000 B per snapshot (+ ~2 kB safetensors
#: header), x 30 = 983,040,000 B (+ ~60 kB) < 1,000,000,000 B.
DEFAULT_MAX_BYTES = 1_000_000_000

_THINNING_RULE = (
    "keep the first snapshot, the newest, and every stride-th snapshot in logging order; "
    "the stride doubles each time the budget is exceeded"
)
_STEP_FILE_RE = re.compile(r"^step-(\d+)\.safetensors$")
_STORE_DIR_RE = re.compile(r"^repsim(?:-([1-9]\d*))?$")
_TMP_SUFFIX = ".tmp"
_STEPS_SHOWN = 20

PathLike = Union[str, "os.PathLike[str]"]
StepLike = Union[int, str]


def default_store_dir(log_dir: PathLike, index: int = 0) -> Path:
    """Where a run's snapshot store lives: ``<log_dir>/repsim``.

    The store sits inside the logger's run directory (e.g. ``lightning_logs/version_3``) so
    that a run and its snapshots travel together when the directory is copied or shared. A
    later fit into a run directory that already holds a store (a fixed logger version, a
    re-run notebook cell) gets its own sibling, ``repsim-1``, ``repsim-2``, ... (``index``), so
    that no fit overwrites or mixes with another's snapshots.

    Args:
        log_dir: the logger's run directory (``trainer.log_dir``).
        index: 0 for the run directory's first store, k for the k-th further one.

    Returns:
        ``Path(log_dir) / "repsim"``, or ``Path(log_dir) / f"repsim-{index}"`` for ``index >= 1``.

    Example:
        >>> default_store_dir("lightning_logs/version_3").as_posix()
        'lightning_logs/version_3/repsim'
        >>> default_store_dir("lightning_logs/version_3", 2).as_posix()
        'lightning_logs/version_3/repsim-2'
    """
    index = _as_step(index, "index", "an int")
    return Path(log_dir) / ("repsim" if index == 0 else f"repsim-{index}")


def run_store_dirs(log_dir: PathLike) -> List[Path]:
    """The stores directly inside a run directory: ``repsim``, ``repsim-1``, ... holding a manifest.

    Ordered by index, i.e. by the fit that made them (:func:`default_store_dir`).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for index in (0, 2):
        ...         _ = SnapshotStore.create(default_store_dir(tmp, index), probe_hash="3f2a", n=4)
        ...     print([p.name for p in run_store_dirs(tmp)])
        ['repsim', 'repsim-2']
    """
    found = []
    for child in Path(log_dir).glob("repsim*"):
        match = _STORE_DIR_RE.match(child.name)
        if match and (child / MANIFEST_NAME).is_file():
            found.append((int(match.group(1) or 0), child))
    return [path for _, path in sorted(found)]


def open_store(path: PathLike, *, probe_hash: Optional[str] = None) -> "SnapshotStore":
    """Open an existing store read-only (same as ``SnapshotStore.open(path, mode="r")``).

    Args:
        path: the store directory.
        probe_hash: if given, the store's probe hash must equal it.

    Raises:
        RepSimError: no store at ``path``, a corrupt or newer-format store, or a probe-hash
            mismatch; the one-line message names the file and what is wrong.
    """
    return SnapshotStore.open(path, mode="r", probe_hash=probe_hash)


def _step_file_name(step: int) -> str:
    return f"step-{step:010d}.safetensors"


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened (Windows)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    Temporary file in the same directory (so ``os.replace`` is a rename on one file system),
    flush, ``os.fsync``, ``os.replace``, then fsync the directory so the rename survives a
    power loss. On an exception the temporary file is removed; after a kill it stays and is
    ignored by readers and removed by the next writer.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _show_steps(steps: Sequence[int]) -> str:
    if len(steps) <= _STEPS_SHOWN:
        return str(list(steps))
    half = _STEPS_SHOWN // 2
    head = ", ".join(map(str, steps[:half]))
    tail = ", ".join(map(str, steps[-half:]))
    return f"[{head}, ... ({len(steps) - 2 * half} more) ..., {tail}]"


def _as_step(step: Any, what: str = "step", expected: str = "an int") -> int:
    if isinstance(step, bool):
        raise RepSimValueError(f"{what} must be {expected}, got {step!r}")
    try:
        value = operator.index(step)
    except TypeError:
        raise RepSimValueError(f"{what} must be {expected}, got {step!r}") from None
    if value < 0:
        raise RepSimValueError(f"{what} must be >= 0, got {value}")
    return value


def _encode_snapshot(step: int, probe_hash: str, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The bytes of one step file: safetensors, float32 tensors named by layer, no pickle."""
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "step": str(step),
        "probe_hash": probe_hash,
    }
    return _safetensors_bytes(dict(tensors), metadata=metadata)


def _plan_thinning(
    indices: Sequence[int], sizes: Sequence[int], stride: int, max_bytes: int
) -> Tuple[List[bool], int]:
    """Which snapshots to keep once a new one (the last entry) is added; pure, for testing.

    ``indices`` are the snapshots' positions in logging order (0 for the first ever added),
    ascending; ``sizes`` their file sizes. Keeps the first, the last and every ``stride``-th
    snapshot; while the kept ones exceed ``max_bytes`` the stride doubles.

    Returns:
        ``(keep_mask, stride)``.

    Raises:
        RepSimValueError: even the first and the last snapshot alone exceed ``max_bytes``.
    """
    last = len(indices) - 1

    def mask_for(s: int) -> List[bool]:
        return [j == 0 or j == last or indices[j] % s == 0 for j in range(len(indices))]

    mask = mask_for(stride)
    while sum(size for size, keep in zip(sizes, mask) if keep) > max_bytes:
        if sum(mask) <= 2:
            kept = sum(size for size, keep in zip(sizes, mask) if keep)
            raise RepSimValueError(
                f"a snapshot of {sizes[-1]} bytes cannot be stored: the first and the newest "
                f"snapshot together need {kept} bytes > max_bytes={max_bytes}; raise max_bytes "
                "(SnapshotStore.create/open(..., max_bytes=...)) or store fewer columns per layer"
            )
        stride *= 2
        mask = mask_for(stride)
    return mask, stride


class SnapshotStore:
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

    def __init__(self, path: Path, mode: str, manifest: Dict[str, Any]) -> None:
        # Private: use create(), open() or open_store().
        self.path = path
        self.mode = mode
        self._probe_hash: str = manifest["probe_hash"]
        self._n: int = manifest["n"]
        self._layers: List[str] = list(manifest["layers"])
        self._kinds: Dict[str, str] = dict(manifest["kinds"])
        self._settings: Dict[str, Any] = manifest["settings"]
        self._max_bytes: int = manifest["max_bytes"]
        self._entries: List[Dict[str, Any]] = [dict(e) for e in manifest["steps"]]
        self._stride: int = manifest["thinned"]["stride"]
        self._dropped: List[int] = list(manifest["thinned"]["dropped_steps"])
        self._lost: List[int] = list(manifest["lost_steps"])

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        path: PathLike,
        *,
        probe_hash: str,
        n: int,
        settings: Optional[Mapping[str, Any]] = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        exist_ok: bool = False,
    ) -> "SnapshotStore":
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
        max_bytes = cls._check_max_bytes(max_bytes)
        settings = {} if settings is None else settings
        if not isinstance(settings, Mapping):
            raise RepSimValueError(f"settings must be a dict, got {type(settings).__name__}")
        try:
            settings = json.loads(json.dumps(dict(settings), allow_nan=False))
        except (TypeError, ValueError) as err:
            message = f"settings must be JSON-serialisable: {_one_line(err)}"
            raise RepSimValueError(message) from None

        if (path / MANIFEST_NAME).exists():
            if not exist_ok:
                raise RepSimError(
                    f"{path / MANIFEST_NAME}: a snapshot store already exists here; open it with "
                    "SnapshotStore.open(path, mode='a') to append, or pass exist_ok=True"
                )
            store = cls.open(path, mode="a", probe_hash=probe_hash, max_bytes=max_bytes)
            if store.n != n:
                raise RepSimError(
                    f"{path / MANIFEST_NAME}: existing store has n={store.n} probe examples, "
                    f"not n={n}"
                )
            return store

        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "probe_hash": probe_hash,
            "n": n,
            "layers": [],
            "kinds": {},
            "settings": settings,
            "max_bytes": max_bytes,
            "steps": [],
            "thinned": {"stride": 1, "dropped_steps": []},
            "lost_steps": [],
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
        probe_hash: Optional[str] = None,
        max_bytes: Optional[int] = None,
    ) -> "SnapshotStore":
        """Open an existing store.

        Every step file's header is checked against the manifest. A manifest step whose file
        is missing or shorter than recorded (a copy or crash artefact) is dropped with one
        :class:`~lightning_repsim.errors.RepSimWarning`; in ``mode="a"`` this is written back to
        the manifest (``lost_steps``) and leftover temporary and unlisted step files are deleted.

        Args:
            path: the store directory.
            mode: ``"r"`` read-only, ``"a"`` append.
            probe_hash: if given, the store's probe hash must equal it.
            max_bytes: ``mode="a"`` only: a new disk budget (recorded in the manifest); by
                default the store keeps its own.

        Raises:
            RepSimValueError: an invalid ``mode`` or ``max_bytes``.
            RepSimError: no store at ``path``; bad JSON, a wrong format name or a newer
                ``format_version`` in the manifest; a step file that does not match the
                manifest; a probe-hash mismatch. The one-line message names the file.
        """
        if mode not in ("r", "a"):
            raise RepSimValueError(f"mode must be 'r' (read-only) or 'a' (append), got {mode!r}")
        if max_bytes is not None and mode != "a":
            raise RepSimValueError("max_bytes can only be changed when opening with mode='a'")
        path = Path(path)
        manifest = _read_manifest(path)
        if probe_hash is not None and probe_hash != manifest["probe_hash"]:
            raise RepSimError(
                f"{path / MANIFEST_NAME}: probe hash mismatch: the store was made with probe "
                f"hash {manifest['probe_hash']!r}, expected {probe_hash!r}; the probe set changed "
                "(use a new store directory) or this is another run's store"
            )
        store = cls(path, mode, manifest)
        lost = store._check_files()
        if mode == "a":
            changed = bool(lost)
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

    # ------------------------------------------------------------------ reading

    @property
    def steps(self) -> List[int]:
        """The stored steps, ascending."""
        return [e["step"] for e in self._entries]

    @property
    def layers(self) -> List[str]:
        """Layer names in capture order (empty until the first :meth:`add`)."""
        return list(self._layers)

    @property
    def kinds(self) -> Dict[str, str]:
        """Layer name -> what its columns are, e.g. ``"features"`` or ``"gram_factor"``."""
        return dict(self._kinds)

    @property
    def probe_hash(self) -> str:
        """Identifies the probe set; compare stores only when these agree."""
        return self._probe_hash

    @property
    def n(self) -> int:
        """Number of probe examples: the row count of every stored tensor."""
        return self._n

    @property
    def settings(self) -> Dict[str, Any]:
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
    def thinned(self) -> Dict[str, Any]:
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
            f"SnapshotStore({str(self.path)!r}, mode={self.mode!r}, steps={len(self)}, "
            f"layers={len(self._layers)}, n={self._n}, nbytes={self.nbytes})"
        )

    def get(
        self, step: StepLike, layer: Optional[str] = None
    ) -> Union[Dict[str, torch.Tensor], torch.Tensor]:
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
        entry = self._entry(step)
        if layer is None:
            names = list(self._layers)
        elif layer in self._kinds:
            names = [layer]
        else:
            raise RepSimValueError(f"unknown layer {layer!r}; the store has layers {self._layers}")
        tensors = self._read(entry, names)
        return tensors if layer is None else tensors[layer]

    def _entry(self, step: StepLike) -> Dict[str, Any]:
        if isinstance(step, str):
            if step != "last":
                raise RepSimValueError(f"step must be an int or 'last', got {step!r}")
            if not self._entries:
                raise RepSimValueError(f"{self.path}: the store holds no steps yet")
            return self._entries[-1]
        value = _as_step(step, expected="an int or 'last'")
        for entry in self._entries:
            if entry["step"] == value:
                return entry
        hint = f"; step {value} was dropped by budget thinning" if value in self._dropped else ""
        raise RepSimValueError(
            f"{self.path}: no step {value}{hint}; stored steps: {_show_steps(self.steps)}"
        )

    def _read(self, entry: Dict[str, Any], names: Sequence[str]) -> Dict[str, torch.Tensor]:
        file = self.path / entry["file"]
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise RepSimError(
                f"{file}: missing (thinned, truncated or deleted after the store was opened)"
            ) from None
        if size != entry["nbytes"]:
            raise RepSimError(f"{file}: {size} bytes, the manifest says {entry['nbytes']}")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                self._check_header(f, file, entry["step"])
                return {name: f.get_tensor(name) for name in names}
        except RepSimError:
            raise
        except Exception as err:  # safetensors raises its own SafetensorError and others
            raise RepSimError(
                f"{file}: not a readable safetensors file: {_one_line(err)}"
            ) from None

    def _check_header(self, f: Any, file: Path, step: int) -> None:
        keys = set(f.keys())
        if keys != set(self._layers):
            missing = sorted(set(self._layers) - keys)
            extra = sorted(keys - set(self._layers))
            raise RepSimError(
                f"{file}: tensors do not match the manifest's layers "
                f"(missing {missing}, unexpected {extra})"
            )
        meta = f.metadata() or {}
        if meta.get("step") != str(step):
            raise RepSimError(
                f"{file}: holds step {meta.get('step')!r}, the manifest says step {step}"
            )
        for name in self._layers:
            piece = f.get_slice(name)
            shape, dtype = list(piece.get_shape()), piece.get_dtype()
            if dtype != "F32" or len(shape) != 2 or shape[0] != self._n:
                raise RepSimError(
                    f"{file}: layer {name!r} is {dtype} of shape {tuple(shape)}, expected F32 of "
                    f"shape ({self._n}, r)"
                )

    def _check_files(self) -> List[int]:
        """Drop manifest steps whose file is missing or truncated; check every header."""
        kept, lost = [], []
        for entry in self._entries:
            file = self.path / entry["file"]
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                lost.append((entry["step"], "missing"))
                continue
            if size < entry["nbytes"]:
                lost.append((entry["step"], f"truncated, {size} of {entry['nbytes']} bytes"))
                continue
            if size > entry["nbytes"]:
                raise RepSimError(f"{file}: {size} bytes, the manifest says {entry['nbytes']}")
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    self._check_header(f, file, entry["step"])
            except RepSimError:
                raise
            except Exception as err:
                raise RepSimError(
                    f"{file}: not a readable safetensors file: {_one_line(err)}"
                ) from None
            kept.append(entry)
        if lost:
            what = ", ".join(f"step {s} ({why})" for s, why in lost)
            warnings.warn(
                f"{self.path}: dropping {len(lost)} snapshot(s) listed in {MANIFEST_NAME} whose "
                f"file is damaged: {what}; the other {len(kept)} step(s) are intact",
                RepSimWarning,
                stacklevel=3,
            )
            self._entries = kept
            self._lost = sorted(set(self._lost) | {s for s, _ in lost})
        return [s for s, _ in lost]

    # ------------------------------------------------------------------ writing

    def add(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        kinds: Optional[Mapping[str, str]] = None,
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
        step = _as_step(step)
        if not isinstance(tensors, Mapping) or not tensors:
            raise RepSimValueError(
                f"step {step}: tensors must be a non-empty dict of layer name -> (n, r) tensor"
            )
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
        blob = _encode_snapshot(step, self._probe_hash, data)

        # Plan the thinning before touching the disk, so an impossible budget changes nothing.
        kept = [e for e in self._entries if e["step"] < step]
        history = sorted(
            [e["step"] for e in kept]
            + [s for s in self._dropped if s < step]
            + [s for s in self._lost if s < step]
        )
        position = {s: i for i, s in enumerate(history)}
        indices = [position[e["step"]] for e in kept] + [len(history)]
        sizes = [e["nbytes"] for e in kept] + [len(blob)]
        mask, stride = _plan_thinning(indices, sizes, self._stride, self._max_bytes)

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

        name = _step_file_name(step)
        _atomic_write(self.path / name, blob)
        entry = {"step": step, "file": name, "nbytes": len(blob)}
        self._commit(
            entries=self._entries + [entry],
            layers=layers,
            kinds=new_kinds,
            stride=stride,
            lost=[s for s in self._lost if s < step],
        )

    def truncate_after(self, step: int, *, move_to: Optional[PathLike] = None) -> List[int]:
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
        if removed and move_to is not None and _occupied(Path(move_to)):
            raise RepSimValueError(f"move_to={str(move_to)!r} is not empty; give a new directory for the "
                                   f"{len(removed)} snapshot(s) after step {step}.")
        dropped = [s for s in self._dropped if s <= step]
        lost = [s for s in self._lost if s <= step]
        if removed or dropped != self._dropped or lost != self._lost:
            if removed and move_to is not None:  # the moved steps stay a store of their own
                aside = Path(move_to)
                aside.mkdir(parents=True, exist_ok=True)
                _write_manifest(aside, {**self._manifest(), "steps": [dict(e) for e in removed]})
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

    def copy_until(self, path: PathLike, step: int) -> "SnapshotStore":
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
        if _occupied(dest):
            raise RepSimValueError(f"copy_until: {dest} is not empty; give a new directory.")
        dest.mkdir(parents=True, exist_ok=True)
        kept = [e for e in self._entries if e["step"] <= step]
        for entry in kept:
            try:
                os.link(self.path / entry["file"], dest / entry["file"])
            except OSError:
                shutil.copy2(self.path / entry["file"], dest / entry["file"])
        manifest = self._manifest()
        manifest["steps"] = [dict(e) for e in kept]
        manifest["thinned"]["dropped_steps"] = [s for s in self._dropped if s <= step]
        manifest["lost_steps"] = [s for s in self._lost if s <= step]
        _write_manifest(dest, manifest)
        return SnapshotStore.open(dest, mode="a", probe_hash=self._probe_hash)

    # ------------------------------------------------------------------ helpers

    def _require_writable(self) -> None:
        if self.mode != "a":
            raise RepSimError(
                f"{self.path}: store is open read-only; use SnapshotStore.open(path, mode='a')"
            )

    @staticmethod
    def _check_layer_name(name: Any) -> str:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise RepSimValueError(
                f"layer names must be non-empty str (not '__metadata__'), got {name!r}"
            )
        return name

    def _merge_kinds(
        self, step: int, layers: Sequence[str], kinds: Optional[Mapping[str, str]]
    ) -> Dict[str, str]:
        merged = {name: self._kinds.get(name, "features") for name in layers}
        for name, kind in (kinds or {}).items():
            if name not in merged:
                raise RepSimValueError(
                    f"step {step}: kinds names layer {name!r}, which is not among {list(layers)}"
                )
            if not isinstance(kind, str) or not kind:
                raise RepSimValueError(
                    f"layer {name!r}: kind must be a non-empty str, got {kind!r}"
                )
            if name in self._kinds and self._kinds[name] != kind:
                raise RepSimValueError(
                    f"layer {name!r}: kind {kind!r} differs from the stored kind "
                    f"{self._kinds[name]!r} (kinds are fixed at the first add)"
                )
            merged[name] = kind
        return merged

    def _as_float32(self, step: int, name: str, tensor: Any) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise RepSimValueError(
                f"step {step}, layer {name!r}: expected a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.dim() != 2 or tensor.shape[0] != self._n:
            raise RepSimValueError(
                f"step {step}, layer {name!r}: expected a 2-D tensor (n examples x r columns) "
                f"with n={self._n} rows, got shape {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise RepSimValueError(
                f"step {step}, layer {name!r}: expected a floating-point tensor, got {tensor.dtype}"
            )
        # A fresh contiguous CPU copy: safetensors refuses tensors sharing memory.
        return torch.empty(tuple(tensor.shape), dtype=torch.float32).copy_(tensor.detach())

    def _manifest(self) -> Dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": lightning_repsim.__version__,
            "probe_hash": self._probe_hash,
            "n": self._n,
            "dtype": "float32",
            "layers": list(self._layers),
            "kinds": dict(self._kinds),
            "settings": self._settings,
            "max_bytes": self._max_bytes,
            "steps": [dict(e) for e in self._entries],
            "thinned": {
                "rule": _THINNING_RULE,
                "stride": self._stride,
                "dropped_steps": list(self._dropped),
            },
            "lost_steps": list(self._lost),
        }

    def _commit(self, **changes: Any) -> None:
        """Write the manifest with ``changes`` applied; adopt them only once it has landed."""
        saved = {key: getattr(self, "_" + key) for key in changes}
        for key, value in changes.items():
            setattr(self, "_" + key, value)
        try:
            _write_manifest(self.path, self._manifest())
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
            debris = (name.startswith(".") and name.endswith(_TMP_SUFFIX)) or (
                _STEP_FILE_RE.match(name) is not None and name not in listed
            )
            if debris and child.is_file():
                with contextlib.suppress(OSError):
                    child.unlink()


def _write_manifest(directory: Path, manifest: Dict[str, Any]) -> None:
    _atomic_write(directory / MANIFEST_NAME, json.dumps(manifest, indent=1).encode("utf-8"))


def _occupied(path: Path) -> bool:
    """Whether ``path`` is a file or a directory with something in it (where no new store may go)."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _read_manifest(path: Path) -> Dict[str, Any]:
    """Parse and validate ``manifest.json``; every failure is a one-line RepSimError."""
    file = path / MANIFEST_NAME
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise RepSimError(
            f"{file}: not found; {path} is not a snapshot store (make one with "
            "SnapshotStore.create)"
        ) from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise RepSimError(f"{file}: not valid JSON ({_one_line(err)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise RepSimError(f"{file}: format is {found!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RepSimError(f"{file}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise RepSimError(
            f"{file}: format_version {version} (written by lightning_repsim "
            f"{manifest.get('library_version', '?')}) is newer than the {FORMAT_VERSION} this "
            f"lightning_repsim {lightning_repsim.__version__} reads; upgrade lightning_repsim"
        )

    def bad(what: str) -> RepSimError:
        return RepSimError(f"{file}: {what}")

    def is_int(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if not isinstance(manifest.get("probe_hash"), str):
        raise bad("probe_hash missing or not a string")
    if not is_int(manifest.get("n"), 1):
        raise bad(f"n must be an int >= 1, got {manifest.get('n')!r}")
    if manifest.get("dtype", "float32") != "float32":
        raise bad(f"dtype {manifest.get('dtype')!r} is not supported, expected 'float32'")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
        raise bad("layers must be a list of non-empty strings")
    if len(set(layers)) != len(layers):
        raise bad("layers has duplicate names")
    kinds = manifest.get("kinds")
    if (
        not isinstance(kinds, dict)
        or set(kinds) != set(layers)
        or not all(isinstance(v, str) for v in kinds.values())
    ):
        raise bad("kinds must map every layer (and only those) to a string")
    settings = manifest.get("settings", {})
    if not isinstance(settings, dict):
        raise bad("settings must be a JSON object")
    max_bytes = manifest.get("max_bytes", DEFAULT_MAX_BYTES)
    if not is_int(max_bytes, 1):
        raise bad(f"max_bytes must be an int >= 1, got {max_bytes!r}")
    steps = manifest.get("steps")
    if not isinstance(steps, list):
        raise bad("steps must be a list")
    previous = -1
    for entry in steps:
        if not isinstance(entry, dict) or not is_int(entry.get("step"), 0):
            raise bad(f"invalid steps entry {entry!r}")
        step = entry["step"]
        if step <= previous:
            raise bad(f"steps are not strictly increasing at step {step}")
        previous = step
        if entry.get("file") != _step_file_name(step):
            expected = _step_file_name(step)
            raise bad(f"step {step}: file must be {expected!r}, got {entry.get('file')!r}")
        if not is_int(entry.get("nbytes"), 1):
            raise bad(f"step {step}: nbytes must be a positive int, got {entry.get('nbytes')!r}")
    if steps and not layers:
        raise bad("steps are listed but layers is empty")
    thinned = manifest.get("thinned", {"stride": 1, "dropped_steps": []})
    if (
        not isinstance(thinned, dict)
        or not is_int(thinned.get("stride"), 1)
        or not isinstance(thinned.get("dropped_steps"), list)
        or not all(is_int(s, 0) for s in thinned["dropped_steps"])
    ):
        raise bad("thinned must be {'stride': int >= 1, 'dropped_steps': [int, ...]}")
    lost = manifest.get("lost_steps", [])
    if not isinstance(lost, list) or not all(is_int(s, 0) for s in lost):
        raise bad("lost_steps must be a list of ints")
    manifest["settings"], manifest["max_bytes"], manifest["lost_steps"] = settings, max_bytes, lost
    manifest["thinned"] = thinned
    return manifest


def similarity_to_final(
    store: "SnapshotStore",
    measure_options: Mapping[str, Mapping[str, Any]],
    *,
    progress: Optional[Callable[[Iterable[str]], Iterable[str]]] = None,
) -> Dict[str, torch.Tensor]:
    """Every stored snapshot of each layer against that layer's last snapshot.

    The convergence view of Raghu et al. (2017): ``{measure: (L, S) float64}``, rows the layers
    in store order, columns the stored steps; the last column is 1 for a finite layer. One layer
    at a time (memory: one layer's snapshots), one similarity call per layer and measure. PWCCA
    needs the neurons, so it is NaN for layers stored as Gram factors (``kind="gram_factor"``).

    Args:
        store: an open store with at least one snapshot.
        measure_options: ``{measure: options}``, e.g. ``{"linear_cka": {}, "svcca": {"keep": 0.99}}``.
        progress: wraps the iteration over layers (e.g. a tqdm factory).
    """
    steps, layers = store.steps, store.layers
    values = {m: torch.full((len(layers), len(steps)), float("nan"), dtype=torch.float64) for m in measure_options}
    for i, name in enumerate(layers if progress is None else progress(layers)):
        snapshots = [store.get(step, name) for step in steps]
        series, final = Representations(snapshots), Representations(snapshots[-1:])  # shared by the measures
        for measure, options in measure_options.items():
            if measure == "pwcca" and store.kinds.get(name) != "features":
                continue
            values[measure][i] = similarity_matrix(series, final, measure, **options)[:, 0].cpu()
    return values


def _as_store(store: Any, what: str) -> "SnapshotStore":
    if isinstance(store, SnapshotStore):
        return store
    if isinstance(store, (str, os.PathLike)):
        return open_store(store)
    raise RepSimValueError(
        f"{what} must be a SnapshotStore or the path of a store directory (e.g. "
        f"'lightning_logs/version_3/repsim'), got {type(store).__name__}"
    )


def _select_layers(
    store: "SnapshotStore", selector: Union[str, Sequence[str], None], what: str
) -> List[str]:
    """The store's layers matching ``selector`` (names or fnmatch globs), in store order."""
    if selector is None:
        return store.layers
    patterns = [selector] if isinstance(selector, str) else list(selector)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise RepSimValueError(
            f"{what} must be a layer name, a glob such as 'block.*', or a non-empty list of them "
            f"(None: every layer), got {selector!r}"
        )
    keep = set()
    for pattern in patterns:
        glob = any(c in pattern for c in "*?[")
        hits = {
            n for n in store.layers if n == pattern or (glob and fnmatch.fnmatchcase(n, pattern))
        }
        if not hits:
            raise RepSimValueError(
                f"{what}: {pattern!r} matches no layer of {store.path}; its layers are "
                f"{store.layers}"
            )
        keep |= hits
    return [n for n in store.layers if n in keep]


def _step_entry(store: "SnapshotStore", step: Optional[StepLike], what: str) -> Dict[str, Any]:
    """The manifest entry of ``step`` (``None``: the last); errors name the argument."""
    try:
        return store._entry("last" if step is None else step)
    except RepSimValueError as err:
        raise RepSimValueError(f"{what}={step!r}: {err}") from None


def similarity_between(
    store_a: Union["SnapshotStore", PathLike],
    store_b: Union["SnapshotStore", PathLike],
    measures: Union[str, Sequence[str]] = ("linear_cka",),
    *,
    step_a: Optional[StepLike] = None,
    step_b: Optional[StepLike] = None,
    layers_a: Union[str, Sequence[str], None] = None,
    layers_b: Union[str, Sequence[str], None] = None,
    measure_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    names: Tuple[str, str] = ("store A", "store B"),
    progress: Optional[Callable[[Iterable[str]], Iterable[str]]] = None,
) -> "Comparison":
    """Every layer of one stored snapshot against every layer of another, from two stores.

    The store counterpart of :func:`lightning_repsim.compare`: ``matrices[measure][i, j]`` is the
    similarity of layer ``layers_a[i]`` of ``store_a`` at ``step_a`` with layer ``layers_b[j]`` of
    ``store_b`` at ``step_b`` (float64, CPU), computed over the same ``n`` probe examples, so the
    stores must share a probe hash. Both may be one store (two steps of one run). Centring is the
    measure's own (see :mod:`lightning_repsim.functional.matrix`); the store keeps
    tensors uncentred. A layer stored as a Gram factor (``kind="gram_factor"``, ``F Fᵀ = X Xᵀ``)
    gives every Gram-based measure and SVCCA the values its features would; PWCCA needs the
    neurons, so its cells are NaN wherever either layer is a Gram factor.

    Args:
        store_a: a :class:`SnapshotStore` or the path of a store directory (opened read-only).
        store_b: the other store, on the same probe set.
        measures: one measure name or several (see :data:`lightning_repsim.functional.MEASURES`).
        step_a: a stored step of ``store_a``; ``None`` or ``"last"``: its last snapshot.
        step_b: the same for ``store_b``.
        layers_a: layer names or fnmatch globs (``"block.*"``) of ``store_a``, kept in store
            order; ``None``: every layer.
        layers_b: the same for ``store_b``.
        measure_options: per-measure options, e.g. ``{"rbf_cka": {"sigma": 0.5}}``; others take
            their defaults (the CLI passes the options each run was logged with).
        names: labels of the two stores in figures.
        progress: wraps the iteration over measures (e.g. a tqdm factory).

    Returns:
        A :class:`~lightning_repsim.comparison.Comparison` (``.plot()``, ``.to_csv()``) whose
        ``steps`` are the two steps compared.

    Raises:
        RepSimValueError: the probe hashes differ, an unknown step, layer, measure or option.
        RepSimError: a store that cannot be opened or read.

    Example:
        >>> import tempfile, torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(20, 5, generator=g)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     a = SnapshotStore.create(tmp + "/a", probe_hash="3f2a", n=20)
        ...     a.add(0, {"conv": x, "fc": torch.randn(20, 3, generator=g)})
        ...     b = SnapshotStore.create(tmp + "/b", probe_hash="3f2a", n=20)
        ...     b.add(7, {"conv": 2 * x + 1})
        ...     result = similarity_between(a, tmp + "/b", ("linear_cka", "rv2"))
        >>> result.layers_a, result.layers_b, result.steps
        (['conv', 'fc'], ['conv'], (0, 7))
        >>> round(float(result["linear_cka"][0, 0]), 6)  # the same features, scaled and shifted
        1.0
    """
    # Imported here, so that reading a store does not import Matplotlib (comparison.py draws).
    from lightning_repsim.comparison import Comparison

    store_a, store_b = _as_store(store_a, "store_a"), _as_store(store_b, "store_b")
    if store_a.probe_hash != store_b.probe_hash:
        raise RepSimValueError(
            f"probe hashes differ: {store_a.path} has {store_a.probe_hash!r}, {store_b.path} "
            f"has {store_b.probe_hash!r}; similarities are meaningful only on the same probe set, "
            "so compare stores of runs logged with the same probe (same examples, same order)"
        )
    options = resolve_measures(measures, measure_options)
    measures = list(options)
    entry_a, entry_b = _step_entry(store_a, step_a, "step_a"), _step_entry(store_b, step_b, "step_b")
    names_a = _select_layers(store_a, layers_a, "layers_a")
    names_b = _select_layers(store_b, layers_b, "layers_b")
    # One snapshot against itself: read once and take the symmetric route (exact unit diagonal).
    same = (
        store_a.path.resolve() == store_b.path.resolve()
        and entry_a["step"] == entry_b["step"]
        and names_a == names_b
    )
    xs = store_a._read(entry_a, names_a)
    ys = xs if same else store_b._read(entry_b, names_b)

    series_a = Representations(xs)  # shared by the measures
    series_b = series_a if same else Representations(ys)
    matrices: Dict[str, torch.Tensor] = {}
    for measure in measures if progress is None else progress(measures):
        if measure != "pwcca":
            values = similarity_matrix(series_a, series_b, measure, **options[measure])
            matrices[measure] = values.cpu()
            continue
        # PWCCA weights by the neurons: only layers stored as features have them.
        values = torch.full((len(names_a), len(names_b)), float("nan"), dtype=torch.float64)
        rows = [i for i, name in enumerate(names_a) if store_a.kinds[name] == "features"]
        cols = [j for j, name in enumerate(names_b) if store_b.kinds[name] == "features"]
        if rows and cols:
            sub_a = {names_a[i]: xs[names_a[i]] for i in rows}
            sub_b = None if same else {names_b[j]: ys[names_b[j]] for j in cols}
            sub = similarity_matrix(sub_a, sub_b, measure, **options[measure])
            values[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = sub.cpu()
        matrices[measure] = values
    return Comparison(
        names_a, names_b, matrices, store_a.probe_hash, store_a.n, tuple(names),
        steps=(entry_a["step"], entry_b["step"]),
    )

"""The snapshot store's on-disk format: directory layout, manifest, step files, the saved probe.

Format (``format_version`` 2), one directory (by convention :func:`default_store_dir`)::

    repsim/
      manifest.json                      the index; the only file that says what is stored
      step-0000000000.safetensors        one file per kept step
      step-0000000500.safetensors
      probe.safetensors                  the probe inputs themselves (optional)

``manifest.json`` holds ``format`` (``"lightning_repsim.store"``), ``format_version``,
``library_version``, ``run_id`` (a random hex id drawn when the store is created), ``probe_hash``,
``n``, ``dtype`` (``"float32"``), ``layers`` (in capture order), ``kinds`` (layer -> kind),
``settings`` (free-form JSON from the caller), ``max_bytes``, ``steps`` (a list of ``{"step",
"file", "nbytes", "format_version"}``, ascending), ``thinned`` (``{"rule", "stride",
"dropped_steps"}``), ``lost_steps`` (steps found damaged when the store was reopened for appending)
and ``probe`` (``{"file", "nbytes"}`` of the saved probe, or null). Each step file is a safetensors
file whose tensor names are the layer names, each an ``(n, r)`` float32 tensor, with metadata
``format``, ``format_version``, ``step``, ``probe_hash``, ``run_id`` and ``crc32`` (JSON: layer ->
the CRC-32 of the tensor's raw bytes, 8 hex digits). ``probe.safetensors`` holds the probe inputs
(any dtype; one tensor ``inputs``, or a tuple's ``0``, ``1``, ... or a dict's keys, as its metadata
``structure`` says) with the same identity and checksum metadata. Nothing is ever pickled, so
opening someone else's run reads data and never executes code.

Integrity: a step file must carry the store's probe hash and run id (a file copied from another
run or recorded on another probe is refused) and each tensor read must match its CRC-32 (a flipped
byte is refused, also one that leaves the value finite); every such failure is a one-line
:class:`~lightning_repsim.errors.RepSimIntegrityError` naming the file and what differs. Stores of
``format_version`` 1 (no run id, no checksums) stay readable: their step files are checked by
probe hash, step, layers and shapes only. Appending to such a store upgrades its manifest to
version 2 (with a new run id); its old step files keep the version-1 checks, each new one gets the
full ones (a step entry's ``format_version`` says which).

Crash safety: every file is written to a temporary file in the same directory (a hidden name
ending in ``.tmp``), flushed, ``os.fsync``-ed and moved into place with ``os.replace``; the
manifest is rewritten the same way after each step file lands. Whenever the process dies, the
directory holds a valid store with every snapshot completed before the kill. On opening,
temporary files and step files absent from the manifest are ignored (and deleted when opened
for appending); a manifest step whose file is missing or truncated is dropped with a
:class:`~lightning_repsim.errors.RepSimWarning`.

Every function here reads or writes the format and nothing more; :class:`~lightning_repsim.store.SnapshotStore`
keeps a store's state and its thinning rule on top of it.
"""

from __future__ import annotations

import json
import operator
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

import lightning_repsim
from lightning_repsim._io import PathLike, atomic_write
from lightning_repsim.errors import RepSimError, RepSimIntegrityError, RepSimValueError, one_line

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PROBE_FILE",
    "compact_features",
    "default_store_dir",
    "encode_snapshot",
    "run_store_dirs",
]

FORMAT_NAME = "lightning_repsim.store"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
#: The saved probe inputs, beside the manifest.
PROBE_FILE = "probe.safetensors"

#: Default disk budget of a store: 1 GB (10**9 bytes), counting the step files (the manifest,
#: a few kB, is not counted). It holds 20 layers x n=1024 examples x 30 snapshots at r <= 400
#: float32 columns: 20 * 1024 * 400 * 4 B = 32,768,000 B per snapshot (+ ~2 kB safetensors
#: header), x 30 = 983,040,000 B (+ ~60 kB) < 1,000,000,000 B.
DEFAULT_MAX_BYTES = 1_000_000_000

STEP_FILE_RE = re.compile(r"^step-(\d+)\.safetensors$")
# repsim, repsim-2; a named monitor's repsim-<name>, repsim-<name>-2 (a name never starts with a digit)
_STORE_DIR_RE = re.compile(r"^repsim(?:-([A-Za-z_][\w.]*?))?(?:-([1-9]\d*))?$")


def default_store_dir(log_dir: PathLike, index: int = 0, name: str | None = None) -> Path:
    """Where a run's snapshot store lives: ``<log_dir>/repsim``.

    The store sits inside the logger's run directory (e.g. ``lightning_logs/version_3``) so
    that a run and its snapshots travel together when the directory is copied or shared. A
    later fit into a run directory that already holds a store (a fixed logger version, a
    re-run notebook cell) gets its own sibling, ``repsim-1``, ``repsim-2``, ... (``index``), so
    that no fit overwrites or mixes with another's snapshots.

    Args:
        log_dir: the logger's run directory (``trainer.log_dir``).
        index: 0 for the run directory's first store, k for the k-th further one.
        name: a named monitor's name (several monitors in one Trainer): ``repsim-<name>``,
            ``repsim-<name>-1``, ...

    Returns:
        ``Path(log_dir) / "repsim"``, or ``Path(log_dir) / f"repsim-{index}"`` for ``index >= 1``.

    Example:
        >>> default_store_dir("lightning_logs/version_3").as_posix()
        'lightning_logs/version_3/repsim'
        >>> default_store_dir("lightning_logs/version_3", 2).as_posix()
        'lightning_logs/version_3/repsim-2'
        >>> default_store_dir("lightning_logs/version_3", name="val").as_posix()
        'lightning_logs/version_3/repsim-val'
    """
    index = as_step(index, "index", "an int")
    stem = "repsim" if name is None else f"repsim-{name}"
    return Path(log_dir) / (stem if index == 0 else f"{stem}-{index}")


def run_store_dirs(log_dir: PathLike) -> list[Path]:
    """The stores directly inside a run directory: ``repsim``, ``repsim-1``, ... (and a named monitor's
    ``repsim-<name>``, ``repsim-<name>-1``, ...) holding a manifest.

    Ordered by name, then by index, i.e. by the fit that made them (:func:`default_store_dir`).

    Example:
        >>> import tempfile
        >>> from lightning_repsim.store import SnapshotStore
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
            found.append((match.group(1) or "", int(match.group(2) or 0), child))
    return [path for _, _, path in sorted(found)]


def step_file_name(step: int) -> str:
    """The file of one step: ``step-<10 digits>.safetensors``."""
    return f"step-{step:010d}.safetensors"


def as_step(step: Any, what: str = "step", expected: str = "an int") -> int:
    if isinstance(step, bool):
        raise RepSimValueError(f"{what} must be {expected}, got {step!r}")
    try:
        value = operator.index(step)
    except TypeError:
        raise RepSimValueError(f"{what} must be {expected}, got {step!r}") from None
    if value < 0:
        raise RepSimValueError(f"{what} must be >= 0, got {value}")
    return value


def checksum(tensor: torch.Tensor) -> str:
    """The CRC-32 of a contiguous CPU tensor's raw bytes, as 8 hex digits.

    Example:
        >>> checksum(torch.zeros(2, dtype=torch.float32))
        '6522df69'
    """
    raw = tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy()
    return f"{zlib.crc32(raw.data):08x}"


def _identity(probe_hash: str, run_id: str | None, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The metadata every data file carries: format, probe hash, run id, checksums."""
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "probe_hash": probe_hash}
    if run_id is not None:
        meta["run_id"] = run_id
    meta["crc32"] = json.dumps({name: checksum(t) for name, t in tensors.items()})
    return meta


def encode_snapshot(
    step: int, probe_hash: str, tensors: Mapping[str, torch.Tensor], run_id: str | None = None
) -> bytes:
    """The bytes of one step file: safetensors, float32 tensors named by layer, no pickle, each checksummed."""
    metadata = {**_identity(probe_hash, run_id, tensors), "step": str(step)}
    return _safetensors_bytes(dict(tensors), metadata=metadata)


def read_step_file(
    file: Path,
    *,
    step: int,
    layers: Sequence[str],
    n: int,
    names: Sequence[str] = (),
    probe_hash: str | None = None,
    run_id: str | None = None,
    checked: bool = False,
) -> dict[str, torch.Tensor]:
    """Open one step file, check it holds ``step`` with exactly ``layers``, each an F32 ``(n, r)``
    tensor, recorded on ``probe_hash`` by run ``run_id`` (when given), and read the tensors of
    ``names`` (none: only check), each verified against its checksum. ``checked``: the file must carry
    a run id and checksums (a format-2 step). Every failure is one RepSimIntegrityError line naming
    the file."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            _check_header(f, file, step, layers, n)
            meta = f.metadata() or {}
            sums = _check_identity(meta, file, probe_hash, run_id, checked, "step file")
            tensors = {name: f.get_tensor(name) for name in names}
    except RepSimError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError and others
        raise RepSimIntegrityError(f"{file}: not a readable safetensors file: {one_line(err)}") from None
    _verify(file, tensors, sums)
    return tensors


def _check_header(f: Any, file: Path, step: int, layers: Sequence[str], n: int) -> None:
    keys = set(f.keys())
    if keys != set(layers):
        missing = sorted(set(layers) - keys)
        extra = sorted(keys - set(layers))
        raise RepSimIntegrityError(
            f"{file}: tensors do not match the manifest's layers (missing {missing}, unexpected {extra})"
        )
    meta = f.metadata() or {}
    if meta.get("step") != str(step):
        raise RepSimIntegrityError(f"{file}: holds step {meta.get('step')!r}, the manifest says step {step}")
    for name in layers:
        piece = f.get_slice(name)
        shape, dtype = list(piece.get_shape()), piece.get_dtype()
        if dtype != "F32" or len(shape) != 2 or shape[0] != n:
            raise RepSimIntegrityError(
                f"{file}: layer {name!r} is {dtype} of shape {tuple(shape)}, expected F32 of shape ({n}, r)"
            )


def _check_identity(
    meta: Mapping[str, str], file: Path, probe_hash: str | None, run_id: str | None, checked: bool, what: str
) -> dict[str, str]:
    """Refuse a file of another probe or run; return its checksums (name -> hex), empty for a format-1 file."""
    if probe_hash is not None and meta.get("probe_hash") != probe_hash:
        raise RepSimIntegrityError(
            f"{file}: a {what} recorded on probe {meta.get('probe_hash')!r}, but this store's probe is "
            f"{probe_hash!r}: it belongs to another run or probe set"
        )
    if checked and ("run_id" not in meta or "crc32" not in meta):
        lacking = [key for key in ("run_id", "crc32") if key not in meta]
        raise RepSimIntegrityError(f"{file}: a {what} without {' or '.join(lacking)}, which this store's files carry")
    if run_id is not None and "run_id" in meta and meta["run_id"] != run_id:
        raise RepSimIntegrityError(
            f"{file}: a {what} written by run {meta['run_id']!r}, but this store is run {run_id!r}: "
            "it was copied from another run"
        )
    if "crc32" not in meta:
        return {}
    try:
        sums = json.loads(meta["crc32"])
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise ValueError("not an object of hex strings")
    except ValueError as err:
        raise RepSimIntegrityError(f"{file}: unreadable crc32 metadata ({one_line(err)})") from None
    return sums


def _verify(file: Path, tensors: Mapping[str, torch.Tensor], sums: Mapping[str, str]) -> None:
    if not sums:
        return
    for name, tensor in tensors.items():
        recorded, found = sums.get(name), checksum(tensor)
        if recorded != found:
            raise RepSimIntegrityError(
                f"{file}: tensor {name!r} fails its checksum (crc32 {found}, recorded {recorded}): the file is damaged"
            )


_PROBE_STRUCTURES = ("tensor", "tuple", "dict")


def probe_tensors(inputs: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """``(structure, name -> tensor)`` of probe inputs: a tensor, a tuple/list of tensors or a dict of
    str -> tensor; copies on the CPU, contiguous. Anything else is a RepSimValueError."""

    def cpu(t: torch.Tensor) -> torch.Tensor:  # a fresh copy: safetensors refuses shared memory
        return t.detach().to("cpu").contiguous().clone()

    if isinstance(inputs, torch.Tensor):
        return "tensor", {"inputs": cpu(inputs)}
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return "tuple", {str(i): cpu(t) for i, t in enumerate(inputs)}
    if (
        isinstance(inputs, Mapping)
        and inputs
        and all(isinstance(k, str) and k and k != "__metadata__" for k in inputs)
        and all(isinstance(t, torch.Tensor) for t in inputs.values())
    ):
        return "dict", {k: cpu(t) for k, t in inputs.items()}
    raise RepSimValueError(
        f"a probe is saved as a tensor, a tuple of tensors or a dict of str -> tensor; got {type(inputs).__name__}"
    )


def encode_probe(inputs: Any, probe_hash: str, run_id: str | None) -> bytes:
    """The bytes of ``probe.safetensors``: the probe inputs, checksummed, with the store's identity."""
    structure, tensors = probe_tensors(inputs)
    metadata = {**_identity(probe_hash, run_id, tensors), "structure": structure}
    try:
        return _safetensors_bytes(tensors, metadata=metadata)
    except (TypeError, ValueError) as err:  # a dtype safetensors cannot hold
        raise RepSimValueError(f"cannot save the probe: {one_line(err)}") from None


def read_probe_file(file: Path, *, probe_hash: str, run_id: str | None) -> Any:
    """The probe inputs saved in ``file``, in the structure they were saved in, each tensor verified."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sums = _check_identity(meta, file, probe_hash, run_id, True, "probe file")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except RepSimError:
        raise
    except Exception as err:
        raise RepSimIntegrityError(f"{file}: not a readable safetensors file: {one_line(err)}") from None
    structure = meta.get("structure")
    if (
        structure not in _PROBE_STRUCTURES
        or set(sums) != set(tensors)
        or (structure == "tensor" and set(tensors) != {"inputs"})
        or (structure == "tuple" and set(tensors) != {str(i) for i in range(len(tensors))})
    ):
        raise RepSimIntegrityError(f"{file}: not a probe file (structure {structure!r}, tensors {sorted(tensors)})")
    _verify(file, tensors, sums)
    if structure == "tensor":
        return tensors["inputs"]
    if structure == "tuple":
        return tuple(tensors[str(i)] for i in range(len(tensors)))
    return tensors


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` durably and atomically (the store's index: written after its step files)."""
    atomic_write(directory / MANIFEST_NAME, json.dumps(manifest, indent=1).encode("utf-8"), durable=True)


def occupied(path: Path) -> bool:
    """Whether ``path`` is a file or a directory with something in it (where no new store may go)."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and validate ``manifest.json``; every failure is a one-line RepSimError."""
    file = path / MANIFEST_NAME
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise RepSimError(
            f"{file}: not found; {path} is not a snapshot store (make one with SnapshotStore.create)"
        ) from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise RepSimError(f"{file}: not valid JSON ({one_line(err)})") from None
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
    run_id = manifest.get("run_id")
    if not (isinstance(run_id, str) and run_id) and not (run_id is None and version < 2):
        raise bad(f"run_id must be a non-empty string, got {run_id!r}")
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
    if not isinstance(kinds, dict) or set(kinds) != set(layers) or not all(isinstance(v, str) for v in kinds.values()):
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
        if entry.get("file") != step_file_name(step):
            expected = step_file_name(step)
            raise bad(f"step {step}: file must be {expected!r}, got {entry.get('file')!r}")
        if not is_int(entry.get("nbytes"), 1):
            raise bad(f"step {step}: nbytes must be a positive int, got {entry.get('nbytes')!r}")
        if not is_int(entry.get("format_version", 1), 1):
            raise bad(f"step {step}: format_version must be an int >= 1, got {entry.get('format_version')!r}")
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
    probe = manifest.get("probe")
    if probe is not None and (
        not isinstance(probe, dict) or probe.get("file") != PROBE_FILE or not is_int(probe.get("nbytes"), 1)
    ):
        raise bad(f"probe must be null or {{'file': {PROBE_FILE!r}, 'nbytes': int >= 1}}, got {probe!r}")
    manifest["settings"], manifest["max_bytes"], manifest["lost_steps"] = settings, max_bytes, lost
    manifest["run_id"], manifest["probe"] = run_id, probe
    manifest["thinned"] = thinned
    return manifest


def compact_features(features: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What the store keeps of each ``(n, p)`` layer, and its kind: the features when p <= n, else a Gram factor.

    With Xᵀ = QR, X Xᵀ = Rᵀ R exactly, so the n x n factor Rᵀ gives every Gram-based measure and
    SVCCA as the features would, in at most n columns; PWCCA needs the neurons themselves and is
    unavailable for such layers. A layer with NaN/Inf is stored as one NaN column.

    Example:
        >>> import torch
        >>> tensors, kinds = compact_features({"conv": torch.randn(8, 100), "fc": torch.randn(8, 3)})
        >>> tuple(tensors["conv"].shape), kinds
        ((8, 8), {'conv': 'gram_factor', 'fc': 'features'})
    """
    tensors, kinds = {}, {}
    for name, x in features.items():
        x = x.detach().to("cpu", torch.float64)
        n = x.shape[0]
        if x.shape[1] <= n:
            tensors[name], kinds[name] = x.float(), "features"
        elif not bool(torch.isfinite(x).all()):
            tensors[name], kinds[name] = torch.full((n, 1), float("nan"), dtype=torch.float32), "gram_factor"
        else:
            tensors[name], kinds[name] = torch.linalg.qr(x.T, mode="r").R.T.float(), "gram_factor"
    return tensors, kinds

"""The snapshot store: each layer's probe-set representation, per logging step, on disk.

* :mod:`~lightning_repsim.store.format` — the on-disk format: directory layout, manifest, step files,
  the saved probe, and the integrity checks (probe hash, run id, checksums);
* :mod:`~lightning_repsim.store.reading` — :class:`~lightning_repsim.store.reading.StoreReader`, which
  reads a store and checks every file it reads;
* :mod:`~lightning_repsim.store.snapshots` — :class:`SnapshotStore`, which also writes a store,
  thinning older snapshots past its disk budget, and saves the probe with it.

Comparing stored snapshots (two steps, two runs, every step against the last) is
:mod:`lightning_repsim.analysis`: :func:`~lightning_repsim.analysis.similarity_between` and
:func:`~lightning_repsim.analysis.similarity_to_final`.
"""

from lightning_repsim.store.format import (
    DEFAULT_MAX_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PROBE_FILE,
    compact_features,
    default_store_dir,
    run_store_dirs,
)
from lightning_repsim.store.snapshots import SnapshotStore, StepLike, open_store

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PROBE_FILE",
    "SnapshotStore",
    "StepLike",
    "compact_features",
    "default_store_dir",
    "open_store",
    "run_store_dirs",
]

"""The snapshot store: each layer's probe-set representation, per logging step, on disk.

* :mod:`~lightning_repsim.store.format` — the on-disk format: directory layout, manifest, step files;
* :mod:`~lightning_repsim.store.snapshots` — :class:`SnapshotStore`, which writes and reads a store,
  thinning older snapshots past its disk budget.

Comparing stored snapshots (two steps, two runs, every step against the last) is
:mod:`lightning_repsim.analysis`: :func:`~lightning_repsim.analysis.similarity_between` and
:func:`~lightning_repsim.analysis.similarity_to_final`.
"""

from lightning_repsim.store.format import (
    DEFAULT_MAX_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
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
    "SnapshotStore",
    "StepLike",
    "compact_features",
    "default_store_dir",
    "open_store",
    "run_store_dirs",
]

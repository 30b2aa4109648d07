"""Atomic file writes: readers, and a process killed mid-write, never see a half-written file.

The one writer of the package: the snapshot store writes its step files and manifest through it
with ``durable=True``; the report writes figures, CSV and JSON with ``durable=False``.

Every write goes to a hidden temporary file beside the target (``.<name>.<pid>.<random>.tmp``, in
the same directory, so the final :func:`os.replace` is a rename on one file system), then replaces
the target. On an exception the temporary file is removed and an existing target is left as it
was; after a kill it stays behind, and the snapshot store deletes such debris when it next opens
for appending. Missing parent directories are created. New files get ``0o666`` minus the umask, as
:func:`open` would give them.

``durable=True`` also ``fsync``s the file before the rename and the directory after it, so the
new file survives a power loss or an OS crash (the snapshot store: data that cannot be
regenerated). ``durable=False`` skips both: every such file is derived output that a rerun
regenerates, and syncing costs milliseconds per file on a real disk at every logging step (after a
power loss such a file may be missing or empty; a killed process cannot cause that).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike[str]

#: Suffix of the temporary files; together with a leading "." it marks write debris.
TMP_SUFFIX = ".tmp"


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


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", *, durable: bool = False, **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    Args:
        path: the target file; missing parent directories are created.
        mode: a write mode of :func:`open` (``"w"``, ``"wb"``).
        durable: fsync the file before and the directory after the rename (see the module docstring).
        **kwargs: passed to :func:`os.fdopen` (``encoding``, ``newline``).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "out" / "a.txt"
        >>> with atomic_open(target, "w", encoding="utf-8") as handle:
        ...     _ = handle.write("done")
        >>> target.read_text()
        'done'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(target.parent)


def atomic_write(path: PathLike, data: bytes | str, *, durable: bool = False) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; returns ``path`` as a Path.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.bin"
        >>> atomic_write(target, b"\\x00\\x01", durable=True).read_bytes()
        b'\\x00\\x01'
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_open(path, "wb", durable=durable) as handle:
        handle.write(payload)
    return Path(path)

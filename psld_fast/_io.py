"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A reader (or a resumed run) sees either the old file or the complete new one, never a partial
write; a killed writer leaves at most a ``.<name>.*.tmp`` file, which resumable commands remove.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["write_atomic"]


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, Callable[[BinaryIO], None]], *,
                 fsync: bool = False) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    ``fsync=True`` also flushes the file to disk before the rename (checkpoints); the file gets the
    usual mode (0666 & ~umask) rather than mkstemp's 0600.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path

"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``; and the
writability checks that commands run before any expensive work.

A reader (or a resumed run) sees either the old file or the complete new one, never a partial
write; a killed writer leaves at most a ``.<name>.*.tmp`` file, which resumable commands remove.
Writability is probed by creating (and removing) a temporary file in the nearest existing folder:
``os.access`` says yes for root on read-only mounts and pseudo file systems such as ``/proc``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["write_atomic", "check_writable_dir", "check_writable_file"]


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


def _probe_dir(folder: Path) -> str | None:
    """Why no file can be created in the existing folder ``folder``, or None when one can."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "is not writable"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".psld_fast_probe.", suffix=".tmp", dir=folder)
    except OSError as exc:
        return f"is not writable (creating a file there failed: {exc.strerror or exc})"
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:
        pass
    return None


def check_writable_dir(folder: Union[str, os.PathLike], what: str = "output folder",
                       _file: Union[str, os.PathLike, None] = None) -> None:
    """ValueError unless ``folder`` is (or can be created as) a writable folder (nothing is created
    but a probe file, removed at once)."""
    folder = Path(folder)
    head = f"{what} {_file if _file is not None else folder}"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{head}: {folder} is an existing file, not a folder; choose another path"
                         if _file is not None else f"{head} is an existing file, not a folder; choose another path")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{head}: {probe} is an existing file, not a folder; choose another path")
    why = _probe_dir(probe)
    if why is not None:
        raise ValueError(f"{head}: {probe} {why}; choose a writable location")


def check_writable_file(path: Union[str, os.PathLike], suffixes: tuple[str, ...] | None = None,
                        what: str = "output file") -> None:
    """ValueError unless ``path`` names a file that can be written (checked before any work)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is an existing folder; give a file name"
                         + (f" ending in {' or '.join(suffixes)}" if suffixes else ""))
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {path}: unsupported suffix {path.suffix or '(none)'!r}; use one of "
                         f"{', '.join(suffixes)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} exists and is not writable")
    check_writable_dir(path.parent if str(path.parent) else Path("."), what=what, _file=path)

"""Atomic file writing: a reader (or an interrupted run) sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(blocker))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file the caller asked for, not a temporary one
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; give the file the permissions open() would
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def file_in_the_way(folder: str | Path) -> Path | None:
    """The file (not folder) at ``folder`` or at one of its ancestors, which would stop mkdir; None if none."""
    for p in (Path(folder), *Path(folder).parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def chmod_as_created(path: str | Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (0600/0700) the mode open()/mkdir() would: umask applies."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~umask())


def os_error_message(exc: OSError) -> str:
    """One line for an OSError: the file, what happened, what to do."""
    what = exc.strerror or str(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.filename2:
        where = f"{exc.filename} -> {exc.filename2}: "
    hint = {errno.ENOSPC: "free some space and run the command again",
            errno.EDQUOT: "free some space (disk quota) and run the command again",
            errno.EFBIG: "the file system or a limit refuses files this large",
            errno.EACCES: "choose a location you can write to, or fix the permissions",
            errno.EPERM: "choose a location you can write to, or fix the permissions",
            errno.EROFS: "the file system is read-only: choose another location",
            errno.ENOTDIR: "a file is in the way where a folder is needed",
            errno.EISDIR: "give a file name, not a folder",
            errno.ENOENT: "check the path"}.get(exc.errno)
    return f"{where}{what}" + (f" ({hint})" if hint else "")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt: a group of files written
    together (a checkpoint and its copies) is then all old or all new. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)

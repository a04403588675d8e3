"""The right to write one output (a feature store, a run directory), held by one process at a time.

:func:`exclusive_lock` takes a POSIX record lock (``fcntl.lockf``) on a small file beside the output,
``OUT.lock``, which names its holder's pid while it is held and is removed when it is released.

Record locks belong to the process that took them. They are not inherited by the children it forks
(DataLoader workers, writer processes), and the kernel drops them the moment their holder dies. So a
run killed by SIGKILL or by the OOM killer never blocks the next one, even while its orphaned workers
are still exiting. (An ``flock`` would be shared with those children and outlive the killed holder for
as long as they do: the next run was refused for a few seconds, naming a dead process.)

Being per process, a second record lock of the same file from the same process would succeed, and
closing its descriptor would silently drop the first; so this module also keeps the set of locks this
process holds, and refuses a second one before opening the file.

The holder removes the file while it still holds the lock. Another process may have opened the file
just before: its lock then succeeds on the removed file, which proves nothing, so after locking a
process checks that the name still refers to the file it locked (same device and inode), and starts
over if not.

The lock file sits beside the output, not in it: Zarr treats unknown files in a store as errors, and a
lock inside a run directory would make a new one non-empty. Every failure to make it (a read-only
disk, a missing permission, a path under a file) is a :class:`~fusion_seg.errors.UserError` naming
the lock file and the fix, before any work is done.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

from fusion_seg.errors import UserError, write_error

_held: set[str] = set()  # the lock files this process holds (absolute paths)
_guard = threading.Lock()


def lock_path(out: str | Path) -> Path:
    """The lock file of the output ``out``: ``OUT.lock`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


@contextlib.contextmanager
def exclusive_lock(out: str | Path, busy: Callable[[str], UserError], *, option: str = "--out") -> Iterator[Path]:
    """Hold the right to write ``out`` for the ``with`` block; yields the lock file's path.

    ``busy(owner)`` is the error raised when another process (pid ``owner``, or ``"unknown"``) or
    this one already holds it. A lock file that cannot be made raises a UserError naming it and the
    fix (``option`` is the command-line option that chose ``out``).
    """
    path = lock_path(out)
    key = os.path.abspath(path)
    with _guard:
        if key in _held:
            raise busy(f"{os.getpid()}, this process")
        _held.add(key)
    try:
        fh = _acquire(path, busy, option)
        try:
            try:
                fh.seek(0)
                fh.truncate()
                fh.write(str(os.getpid()))
                fh.flush()
            except OSError as exc:  # a full disk: the file is there, its holder's pid is not
                raise write_error(path, exc, what="the lock file", option=option) from None
            yield path
        finally:
            with contextlib.suppress(OSError):  # still locked: nobody else holds this file; a failure
                path.unlink()                   # to remove it must not hide the error that ended the block
            with contextlib.suppress(OSError):
                fh.close()
    finally:
        with _guard:
            _held.discard(key)


def _acquire(path: Path, busy: Callable[[str], UserError], option: str):
    """The open, locked lock file at ``path`` (see the module docstring for the inode check)."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(path, exc, what="the lock file", option=option) from None
        fh = os.fdopen(fd, "r+")
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = "unknown"
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                with contextlib.suppress(OSError):
                    fh.seek(0)
                    owner = fh.read().strip() or "unknown"
            fh.close()
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise busy(owner) from None
            raise write_error(path, exc, what="the lock file", option=option) from None
        except BaseException:
            fh.close()
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fh.fileno()), current):
            return fh
        fh.close()  # its holder removed it as this process opened it: lock the file now under the name

"""User-facing errors.

Every error a user can cause (a bad file, a wrong root, a mismatched cache)
is raised as a :class:`UserError` whose message names the offending file or
setting *and* the fix. The CLI prints these without a traceback; library
callers catch them like any other exception.
"""
from __future__ import annotations

import errno


class UserError(Exception):
    """An error caused by input or settings, with a message that says how to fix it."""


class DataError(UserError):
    """A dataset file is missing, unreadable, or inconsistent."""


class CacheError(UserError):
    """A feature store is missing, corrupt, or does not match the request."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not match the request."""


class Failed:
    """A dataset item that could not be made, returned instead of raising.

    DataLoader workers re-raise exceptions wrapped in a worker traceback; returning
    the error as an item lets the main process raise it as the plain one-line
    user error it is, or skip the item (``--skip-bad``) and report why.
    """

    def __init__(self, index: int, error: UserError, **info):
        self.index, self.error, self.info = index, error, info

    def __reduce__(self):  # picklable across worker processes
        return (_rebuild_failed, (self.index, type(self.error), str(self.error), self.info))

    @staticmethod
    def first(items) -> "Failed | None":
        """The first failed item of a batch. Collate functions return it (they run inside the
        worker), and the consumer in the main process raises it with :meth:`check`."""
        return next((item for item in items if isinstance(item, Failed)), None)

    @staticmethod
    def check(batch):
        """Raise the error a collate function returned in place of a batch; else return the batch."""
        if isinstance(batch, Failed):
            raise batch.error
        return batch


def _rebuild_failed(index, error_type, message, info):
    return Failed(index, error_type(message), **info)


def write_error(path, exc: OSError, *, what: str = "", option: str = "--out", then: str = "") -> UserError:
    """A :class:`UserError` for a failed write of ``path``: what failed, why (the OS's reason) and the fix.

    ``what`` names the file for the user ("the checkpoint", "the lock file"; default: nothing), ``option``
    is the option that chose the location (the fix names it), and ``then`` is said after the fix (what
    was kept, how to continue). One place for every command's write failures: a read-only disk, a
    missing permission, a full disk, a path under a file or a folder where a file goes.
    """
    code = getattr(exc, "errno", None)
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    fixes = {
        errno.EROFS: f"the file system is read-only: pass an {option} on a writable disk",
        errno.EACCES: f"no permission to write there: fix the folder's permissions, or pass another {option}",
        errno.EPERM: f"no permission to write there: fix the folder's permissions, or pass another {option}",
        errno.ENOSPC: f"the disk is full: free space there, or pass an {option} on another disk",
        errno.EDQUOT: f"the disk quota is used up: free space there, or pass an {option} on another disk",
        errno.ENOTDIR: f"a part of the path is a file, not a folder: pass another {option}",
        errno.EEXIST: f"a part of the path is a file, not a folder: pass another {option}",
        errno.EISDIR: f"it is a folder: move it, or pass another {option}",
        errno.ENAMETOOLONG: f"the name is too long: pass a shorter {option}",
    }
    fix = fixes.get(code, f"fix the location, or pass another {option}")
    target = f"{what} {path}" if what else str(path)
    return UserError(f"cannot write {target} ({reason}); {fix}.{' ' + then if then else ''}")


def require_type(what: str, value, kind: type) -> None:
    """Refuse a value of the wrong type where the Python API takes a request or config object (a ``str`` or a
    ``dict`` where a ``TrainConfig`` or a ``DatasetRef`` goes), with a UserError that says what to pass."""
    if isinstance(value, kind):
        return
    name = kind.__name__
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    fix = (f"fusion_seg.{name}(**that_dict)" if isinstance(value, dict)
           else f"fusion_seg.{name}(...) (see help(fusion_seg.{name}))")
    article = "an" if name[0] in "AEIOU" else "a"
    raise UserError(f"{what} must be {article} {name}, not {type(value).__name__} {shown}; pass {fix}.")


def os_error_message(exc: OSError) -> str:
    """One line for a failed file-system call that no check caught: a failed write says why and the fix
    (:func:`write_error`), anything else names the file and the OS's reason."""
    path = exc.filename or "a file"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
        return str(write_error(path, exc, option="output location"))
    return f"{path}: {exc.strerror or exc}. Check that path and try again."


def require_path(name: str, value, what: str) -> None:
    """Refuse a value that is not a path (a ``str`` or ``os.PathLike``) where the Python API takes a file or
    folder (``out``, ``checkpoint``, ``cache``), with a UserError that says what to pass."""
    import os

    if not isinstance(value, (str, os.PathLike)):
        shown = type(value).__name__ if hasattr(value, "shape") or isinstance(value, (list, tuple)) else repr(value)
        raise UserError(f"{name}={shown}: pass {what}, a path (str or pathlib.Path).")

"""Writing a file so that a reader sees the old file or the new one, never half of one.

Every file fusion-seg writes for a user (checkpoints, masks and overlays, figures, JSON
results, markdown tables) goes through :func:`atomic_write`: the bytes go to a temporary
file in the target's own folder (the same file system, so the rename is atomic), which is
flushed and fsync'ed, then renamed over the target with :func:`os.replace`. On any failure
-- a full disk, an exception in the writer, Ctrl-C -- the temporary file is removed and the
previous target, if any, is left as it was.

Errors are not reworded here: the caller knows what the file is and what the user should
do (a checkpoint's full disk says to resume), so it wraps the exception it gets.

Also the checks of an output location that predict, evaluate, visualize and compare share: refused before
any work when it cannot be written (:func:`check_out_folder`, :func:`check_out_file`), and a write that
fails all the same (a full disk) reported as one line naming the file (:func:`reporting_write_errors`).
"""
from __future__ import annotations

import errno
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

from fusion_seg.errors import UserError, write_error

__all__ = ["atomic_write", "check_out_file", "check_out_folder", "file_listing", "folder_problem", "listing_digest",
           "reporting_write_errors", "temp_path", "write_json_atomic", "write_text_atomic"]


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (``.name.<pid>.<random>.tmp``), unique across processes and threads."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _open_exclusive(tmp: Path) -> BinaryIO:
    # Not tempfile.mkstemp: its 0600 mode would survive the rename; open() honours the umask as a plain write does.
    return open(tmp, "xb")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], *, durable: bool = True,
                 opener: Callable[[Path], BinaryIO] | None = None) -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a binary temporary file, which then replaces ``path``.

    A missing parent folder is created. With ``durable`` (the default) the temporary file is
    fsync'ed before the rename and the folder after it, so a power cut leaves the old or the
    new file too; without it (many small files a rerun rewrites, such as predicted masks) only
    the rename's atomicity is kept. ``opener(tmp)`` opens the temporary file (default: a new
    file, ``open(tmp, "xb")``). Any exception is re-raised as it was, after the temporary file
    is removed. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with (opener or _open_exclusive)(tmp) as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a failed cleanup (a file system gone read-only) must not hide the error that stopped the write
        raise
    if durable:
        _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Best effort: the file is in place already, and some file
    systems (network mounts, some FUSE ones) refuse to open or fsync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str, *, encoding: str = "utf-8", durable: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    data = text.encode(encoding)
    return atomic_write(path, lambda fh: fh.write(data), durable=durable)


def write_json_atomic(path: str | Path, obj, *, indent: int | None = 2, durable: bool = True) -> Path:
    """Write ``obj`` as JSON (``json.dumps(obj, indent=indent)``, no trailing newline) atomically.

    The object is serialised before anything is written, so one that is not JSON-serialisable
    raises ``TypeError`` and leaves ``path`` untouched.
    """
    return write_text_atomic(path, json.dumps(obj, indent=indent), durable=durable)


def file_listing(paths) -> list[list]:
    """``[[path, size, mtime_ns], ...]`` of ``paths``, sorted: the identity of input files by their listing.

    One ``stat`` a file, so it is cheap for thousands of images. A file added, removed, replaced or
    rewritten changes it (its size or modification time); one that cannot be stat'ed (a dangling
    link, say) is listed with ``None`` for both, so it changes the listing too.
    """
    out = []
    for p in sorted(str(p) for p in paths):
        try:
            st = os.stat(p)
        except OSError:
            out.append([p, None, None])
        else:
            out.append([p, st.st_size, st.st_mtime_ns])
    return out


def listing_digest(paths) -> str:
    """A sha256 of :func:`file_listing` (``paths``): the same files, unchanged, give the same digest."""
    import hashlib

    return hashlib.sha256(json.dumps(file_listing(paths)).encode()).hexdigest()


# Suffixes that name a file of some format: a folder named so (``--out model.pt``) is not what its name says.
FILE_SUFFIXES = frozenset(".pt .pth .ckpt .bin .safetensors .onnx .json .jsonl .toml .yaml .yml .txt .md .csv .log "
                          ".png .jpg .jpeg .tif .tiff .webp .bmp .gif .pdf .svg .h5 .hdf5 .npz .npy .pkl .zip .tar .gz "
                          ".tgz".split())


def folder_problem(path: str | Path, what: str) -> str | None:
    """Why ``path`` cannot be the output folder ``what`` ("the run folder"), or None: its name says it is a file
    (``model.pt``, ``preds.png``), or it lies inside a Zarr store (a folder above it holds ``zarr.json``),
    among whose arrays it would be written."""
    path = Path(os.path.abspath(path))
    if path.suffix.lower() in FILE_SUFFIXES:
        return (f"{path.name} names a {path.suffix} file, but {what} is a folder; pass a folder name without "
                f"{path.suffix}")
    for folder in path.parents:
        if (folder / "zarr.json").is_file():
            return f"it lies inside the Zarr store {folder}, among whose arrays it would be written; pass a folder outside it"
    return None


# --------------------------------------------------------------------------- output locations
def check_out_folder(out: Path, files: dict[Path, str], option: str = "--out") -> None:
    """Refuse, before any work, an output folder that is a file, lies under one or cannot be written (a
    read-only file system, no permission), and an output path (``files``: path -> what goes there) that is
    a folder: each would fail only after the work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a folder; pass a folder (it is created if missing).")
    problem = folder_problem(out, "the output folder")
    if problem:
        raise UserError(f"{option} {out}: {problem}.")
    _check_writable(out, out, "the output folder", option)
    for path, what in files.items():
        if path.is_dir():
            raise UserError(f"{path} is a folder, where {what} would be written; move it, or pass another {option}.")


def check_out_file(path: Path, what: str, option: str = "--out") -> None:
    """Refuse, before any work, an output file (``what``: "the figure") that is a folder, lies under a file
    or cannot be written (a read-only file system, no permission)."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder, where {what} would be written; pass a file name, "
                        f"e.g. {path / 'figure.png'}.")
    _check_writable(path, path.parent, what, option)


def _check_writable(shown: Path, folder: Path, what: str, option: str) -> None:
    """Refuse ``shown`` (written in ``folder``, which is made if missing) when the nearest existing folder at
    or above ``folder`` is a file, or is on a read-only file system or not writable for this user."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # ends at "/" or "."
    if not existing.is_dir():
        raise UserError(f"{option} {shown} lies under {existing}, which is a file, not a folder; "
                        f"pass another {option}.")
    code = (errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY
            else errno.EACCES if not os.access(existing, os.W_OK | os.X_OK) else None)
    if code is not None:
        raise write_error(shown, OSError(code, os.strerror(code)), what=what, option=option)


@contextmanager
def reporting_write_errors(path: Path, what: str, option: str = "--out"):
    """Turn a failed write of ``path`` (an ``OSError``: a full disk, a file system gone read-only) into
    :func:`~fusion_seg.errors.write_error`'s one-line :class:`UserError` naming it, ``what`` it is, and the fix."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc, what=what, option=option) from exc

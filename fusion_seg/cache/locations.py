"""Where a feature store lives: a local folder, or a URL that fsspec reaches.

A store is named by a path (``cache/train.zarr``), a ``file://`` URL, or a remote
URL (``s3://bucket/train.zarr``, ``gs://…``, ``az://…``). Local ones are plain
folders opened with zarr's ``LocalStore``; remote ones go through zarr's
``FsspecStore``, which needs the protocol's fsspec package (s3fs for ``s3://``:
``pip install fusion-seg[s3]``; gcsfs for ``gs://``; adlfs for ``az://``).

Credentials and endpoint come from the filesystem's usual configuration, never
from fusion-seg options. For S3 that is botocore's: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE`` and ``~/.aws``), and for an
S3-compatible server (MinIO, Ceph, moto) ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``. fsspec's own ``FSSPEC_S3_ENDPOINT_URL`` (read when fsspec
is imported) works as well.

Remote stores never hang: every S3 request has a connect timeout (5 s) and a read
timeout (10 s: how long the server may stay silent; the time to upload a chunk is not
counted), and is tried at most 4 times (botocore's 2 attempts, each tried twice by s3fs,
which also retries a read cut short), so an endpoint that accepts connections and never
answers fails with a CacheError within a minute. ``FUSION_SEG_REMOTE_TIMEOUT=SECONDS``
sets both timeouts (tests use a fraction of a second). These settings replace botocore's
own retry count (``AWS_MAX_ATTEMPTS``) for fusion-seg's stores; gs:// and az:// stores
use their filesystem's defaults.

Before an extraction makes anything, :func:`check_out` refuses a local ``--out`` that
cannot become a store: a file, a path under a file or inside another Zarr store, or a
folder of other files.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
from pathlib import Path

import zarr

from fusion_seg.errors import CacheError, UserError
from fusion_seg.files import folder_problem
from fusion_seg.locks import exclusive_lock

# protocol -> (the fsspec implementation it needs, how to install it)
BACKENDS = {
    "s3": ("s3fs", "pip install fusion-seg[s3]"),
    "s3a": ("s3fs", "pip install fusion-seg[s3]"),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
    "abfss": ("adlfs", "pip install adlfs"),
}
EXCLUSIVE_CREATE = ("s3", "s3a")  # conditional PUT (If-None-Match: *), see create_group
# Bounds of every S3 request (see the module docstring); worst case RETRIES * ATTEMPTS * (CONNECT + READ) s.
CONNECT_TIMEOUT = 5.0   # seconds to open a connection
READ_TIMEOUT = 10.0     # seconds the server may stay silent (after the request is sent, or between its bytes)
ATTEMPTS = 2            # botocore's attempts of one request (retrying timeouts, throttling, 5xx)
RETRIES = 2             # s3fs's tries around botocore's (also retrying a response body cut short)
TIMEOUT_ENV = "FUSION_SEG_REMOTE_TIMEOUT"  # seconds: both timeouts
HINTS = {  # by backend package
    "s3fs": "Check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and, for a "
          "server other than AWS, the endpoint (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL).",
    "gcsfs": "Check the credentials (GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`).",
}


def protocol(path) -> str:
    """``"s3"`` for ``s3://bucket/x``; ``""`` for a plain path."""
    text = str(path)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_local(path) -> bool:
    return protocol(path) in ("", "file", "local")


def local_path(path) -> Path:
    """The folder of a local store (a plain path or a ``file://`` URL)."""
    text = str(path)
    return Path(text.split("://", 1)[1] if "://" in text else text)


def join(path, *parts) -> str:
    """A location inside the store, spelled like the store was (``s3://b/x.zarr/s4/c/0``)."""
    return "/".join([str(path).rstrip("/"), *map(str, parts)])


def zarr_store(path, mode: str = "r") -> zarr.abc.store.Store:
    """The zarr store object for ``path``: read-only for mode ``"r"``."""
    read_only = mode == "r"
    if is_local(path):
        return zarr.storage.LocalStore(local_path(path), read_only=read_only)
    _require_backend(path)
    with reaching(path, "open"):
        store = zarr.storage.FsspecStore.from_url(str(path), read_only=read_only, storage_options=_options(path))
    _bound_retries(path, store.fs)
    return store


def _is_s3(path) -> bool:
    return BACKENDS.get(protocol(path), ("",))[0] == "s3fs"


def _options(path) -> dict:
    """The fsspec options of a remote store: for S3, the timeouts and attempts of every request."""
    if not _is_s3(path):
        return {}
    connect, read = CONNECT_TIMEOUT, READ_TIMEOUT
    if os.environ.get(TIMEOUT_ENV):
        try:
            connect = read = float(os.environ[TIMEOUT_ENV])
        except ValueError:
            connect = read = math.nan
        if not 0 < connect < math.inf:
            raise CacheError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds > 0: "
                             f"set it to e.g. 10, or unset it for the defaults.")
    return {"config_kwargs": {"connect_timeout": connect, "read_timeout": read,
                              "retries": {"total_max_attempts": ATTEMPTS}}}


def _bound_retries(path, fs) -> None:
    """s3fs's own tries of each request, which it takes only as an attribute of the filesystem (default 5)."""
    if _is_s3(path):
        fs.retries = RETRIES


def exists(path) -> bool:
    """Whether a Zarr group (its ``zarr.json``) is at ``path``."""
    if is_local(path):
        return (local_path(path) / "zarr.json").is_file()
    fs, root = filesystem(path)
    with reaching(path, "reach"):
        return fs.exists(f"{root}/zarr.json")


def require_bucket(path) -> None:
    """Raise a CacheError naming the fix if the bucket of a remote ``path`` does not exist."""
    if is_local(path) or protocol(path) not in BACKENDS:
        return
    fs, root = filesystem(path)
    bucket = root.split("/", 1)[0]
    with reaching(path, "reach"):
        found = fs.exists(bucket)
    if not found:
        raise CacheError(
            f"{path}: bucket {bucket!r} does not exist, or these credentials cannot see it. "
            f"Create it first, or fix the URL. {_hint(path)}".rstrip()
        )


def bytes_used(path) -> int:
    """Total size of the store's files or objects."""
    if is_local(path):
        return sum(p.stat().st_size for p in local_path(path).rglob("*") if p.is_file())
    fs, root = filesystem(path)
    with reaching(path, "list"):
        total = fs.du(root)
    fs.invalidate_cache(root)  # du lists every object; don't let a later exists() answer from that listing
    return int(total)


def create_group(path, attributes: dict) -> zarr.Group:
    """Create the store's root group, raising FileExistsError if one is already there.

    On S3 the group's ``zarr.json`` is written with a conditional PUT (``If-None-Match: *``),
    so of two processes creating the same store exactly one succeeds and the other sees
    FileExistsError. Elsewhere remote creation is zarr's mode ``"w-"`` (check, then write),
    which does not exclude a concurrent creator. Local stores are created with mode ``"a"``:
    their callers hold :func:`writer_lock`.
    """
    if is_local(path):
        return zarr.open_group(zarr_store(path, "a"), mode="a", attributes=attributes, zarr_format=3)
    require_bucket(path)
    if protocol(path) in EXCLUSIVE_CREATE:
        metadata: dict = {}  # the zarr.json zarr itself would write, made in memory
        zarr.open_group(zarr.storage.MemoryStore(metadata), mode="w", attributes=attributes, zarr_format=3)
        fs, root = filesystem(path)
        with reaching(path, "create"):
            fs.pipe_file(f"{root}/zarr.json", metadata["zarr.json"].to_bytes(), mode="create")
        return zarr.open_group(zarr_store(path, "r+"), mode="r+", zarr_format=3)
    with reaching(path, "create"):
        return zarr.open_group(zarr_store(path, "w-"), mode="w-", attributes=attributes, zarr_format=3)


def filesystem(path):
    """``(fsspec filesystem, path inside it)`` of a remote store."""
    import fsspec

    _require_backend(path)
    with reaching(path, "open"):
        fs, root = fsspec.url_to_fs(str(path), **_options(path))
    _bound_retries(path, fs)
    return fs, root


def put(path, key: str, data: bytes) -> None:
    """Write the object ``key`` of the store at ``path`` whole: a file replaced atomically, or one PUT."""
    if is_local(path):
        from fusion_seg.files import atomic_write

        atomic_write(local_path(path) / key, lambda fh: fh.write(data))
        return
    fs, root = filesystem(path)
    with reaching(path, "write"):
        fs.pipe_file(f"{root}/{key}", data)


def check_out(path) -> None:
    """Refuse an ``--out`` where no feature store can be made, before anything is written (UserError).

    A local path that is a file, lies under a file or inside another Zarr store (a folder above it
    has a ``zarr.json``), or is a folder of other files (Zarr would write its arrays among them) is
    refused, naming it and the fix. An empty folder and an existing store are accepted. Remote stores
    are checked when they are opened.
    """
    if not is_local(path):
        return
    out = Path(os.path.abspath(local_path(path)))
    fix = "pass another --out: a new folder, or a store made by `fusion-seg extract`"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a feature store folder; {fix}.")
    for folder in out.parents:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {out} cannot be made: {folder} is a file, not a folder; {fix}.")
        if (folder / "zarr.json").is_file():
            raise UserError(f"--out {out} is inside the Zarr store {folder}, and would be written among its "
                            f"arrays; {fix}, outside {folder}.")
    if out.is_dir() and not (out / "zarr.json").exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is a folder of other files, not a fusion-seg feature store, and the store's "
                        f"arrays would be written among them; {fix} (or empty that folder).")
    problem = None if (out / "zarr.json").exists() else folder_problem(out, "a feature store")
    if problem:  # a new store named x.h5 or x.zip would be a Zarr folder, not what its name says
        raise UserError(f"--out {out}: {problem} (e.g. {out.with_suffix('.zarr').name}).")


def _require_backend(path) -> None:
    module, install = BACKENDS.get(protocol(path), (None, None))
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError:
        raise CacheError(
            f"{path}: {protocol(path)}:// stores need the {module} package, which is not installed. "
            f"Install it with `{install}`."
        ) from None


@contextlib.contextmanager
def reaching(path, action: str):
    """Turn a filesystem's own errors (no credentials, unknown protocol, refused, timed out) into a CacheError."""
    try:
        yield
    except (UserError, FileExistsError):
        raise
    except Exception as exc:
        raise reach_error(path, action, exc) from exc


def reach_error(path, action: str, exc: Exception) -> CacheError:
    """The CacheError for a store that could not be reached: the failed ``action``, why, and what to check."""
    reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower():
        reason = f"timed out, the server did not answer ({reason})"
    return CacheError(f"cannot {action} {path}: {reason}. {_hint(path)}".rstrip())


def _hint(path) -> str:
    return HINTS.get(BACKENDS.get(protocol(path), ("", ""))[0], "")


@contextlib.contextmanager
def writer_lock(path: str | Path):
    """Exclusive right to write a local store: a lock on ``STORE.lock`` (:func:`fusion_seg.locks.exclusive_lock`).

    A second extraction into the same store is refused rather than interleaved. The lock is a POSIX
    record lock, which the kernel drops the moment its holder dies and which its forked DataLoader
    workers do not hold: a re-run right after a kill or an OOM just works. The file sits beside the
    store because Zarr treats unknown files inside it as errors.

    A remote store (``s3://…``) has no lock: its creation is exclusive (see :func:`create_group`),
    so two runs with different settings cannot both make it, but two concurrent extractions into the
    same remote store are the user's to avoid. Each chunk is still written whole and both runs
    write the same views, so the store stays usable, but the work is done twice and the store may
    not be bit-identical to one run's (features can differ in the last bit with the batch size).
    """
    if not is_local(path):
        yield
        return

    def busy(owner: str) -> CacheError:
        return CacheError(f"{path} is being written by another fusion-seg process (pid {owner}). Wait for it to "
                          "finish or stop it, then re-run this command: the views it wrote are kept.")

    with exclusive_lock(local_path(path), busy):
        yield

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
"""
from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import zarr

from fusion_seg.errors import CacheError

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
    with _reaching(path, "open"):
        return zarr.storage.FsspecStore.from_url(str(path), read_only=read_only)


def exists(path) -> bool:
    """Whether a Zarr group (its ``zarr.json``) is at ``path``."""
    if is_local(path):
        return (local_path(path) / "zarr.json").is_file()
    fs, root = filesystem(path)
    with _reaching(path, "reach"):
        return fs.exists(f"{root}/zarr.json")


def require_bucket(path) -> None:
    """Raise a CacheError naming the fix if the bucket of a remote ``path`` does not exist."""
    if is_local(path) or protocol(path) not in BACKENDS:
        return
    fs, root = filesystem(path)
    bucket = root.split("/", 1)[0]
    with _reaching(path, "reach"):
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
    with _reaching(path, "list"):
        total = fs.du(root)
    fs.invalidate_cache(root)  # du lists every object; don't let a later exists() answer from that listing
    return int(total)


def create_group(path, attributes: dict) -> zarr.Group:
    """Create the store's root group, raising FileExistsError if one is already there.

    On S3 the group's ``zarr.json`` is written with a conditional PUT (``If-None-Match: *``),
    so of two processes creating the same store exactly one succeeds and the other sees
    FileExistsError. Elsewhere remote creation is zarr's mode ``"w-"`` (check, then write),
    which does not exclude a concurrent creator. Local stores are created with mode ``"a"``:
    their callers hold :func:`fusion_seg.cache.store.writer_lock`.
    """
    if is_local(path):
        return zarr.open_group(zarr_store(path, "a"), mode="a", attributes=attributes, zarr_format=3)
    require_bucket(path)
    if protocol(path) in EXCLUSIVE_CREATE:
        metadata: dict = {}  # the zarr.json zarr itself would write, made in memory
        zarr.open_group(zarr.storage.MemoryStore(metadata), mode="w", attributes=attributes, zarr_format=3)
        fs, root = filesystem(path)
        with _reaching(path, "create"):
            fs.pipe_file(f"{root}/zarr.json", metadata["zarr.json"].to_bytes(), mode="create")
        return zarr.open_group(zarr_store(path, "r+"), mode="r+", zarr_format=3)
    with _reaching(path, "create"):
        return zarr.open_group(zarr_store(path, "w-"), mode="w-", attributes=attributes, zarr_format=3)


def filesystem(path):
    """``(fsspec filesystem, path inside it)`` of a remote store."""
    import fsspec

    _require_backend(path)
    with _reaching(path, "open"):
        return fsspec.url_to_fs(str(path))


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
def _reaching(path, action: str):
    """Turn a filesystem's own errors (no credentials, unknown protocol, refused) into a CacheError."""
    try:
        yield
    except (CacheError, FileExistsError):
        raise
    except Exception as exc:
        raise CacheError(f"cannot {action} {path}: {type(exc).__name__}: {exc}. {_hint(path)}".rstrip()) from exc


def _hint(path) -> str:
    return HINTS.get(BACKENDS.get(protocol(path), ("", ""))[0], "")

"""The feature cache: one Zarr v3 store per (dataset, split, extraction settings).

Layout of a store::

    STORE/
      zarr.json            group attributes: {"fusion_seg": <CacheSpec>}
      s2, s4, ..., s32     (views, C, h, w) in the storage dtype (float16 by default), one view per chunk
      scale_s2, ...        (views, C) float32 per-channel scales, only for --dtype uint8
      labels               (views, H, W) uint8, one view per chunk, ignore = spec.ignore_index
      views                (views, 9) float64, one view per chunk: per-view metadata, see VIEW_FIELDS

Every chunk is compressed (the codec is a store setting, see storage.py) and carries a
crc32c checksum, so a flipped bit is an error rather than a silently wrong feature.

Arrays are sized for the largest view; a smaller view (a whole image of a smaller
size) is stored top-left and its valid size is in its metadata row, with the
padding holding zeros in the features and the ignore index in the labels.

Completion record: a view's row in ``views`` is written *after* its features and
labels, and zarr writes each chunk atomically, so a view is complete exactly when
its row is present. An interrupted extraction resumes by filling the missing rows.

Chunk presence: Zarr reads an absent chunk as the array's fill value, so a deleted or
lost chunk of a completed view would read as zero features or an all-ignore view. Every
completed view therefore has every chunk of every data array (features, scales, labels):
they are written even when they equal the fill value (``write_empty_chunks``), and a
read of an absent one raises (:class:`MissingChunkError` from the store, a CacheError
naming the view and the chunk from the readers, a bad view in :meth:`FeatureStore.verify`,
re-extracted by ``extract --repair``). The check is made by the read itself: no extra
request. Only ``views`` may have absent chunks (a view not completed yet). Stores written
before this rule open and train unchanged (same schema); in them, a view whose labels were
all ignore (or whose features were all zero) has no such chunk and reads as missing until
``extract --repair`` rewrites it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import WrapperStore

from fusion_seg.cache import codecs as storage

from fusion_seg.cache import locations as store_url
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import CacheError
from fusion_seg.locks import exclusive_lock
from fusion_seg.shapes import ShapeSpec

SCHEMA_VERSION = 1
ATTRS_KEY = "fusion_seg"
SKIPPED_KEY = "fusion_seg_skipped"
INPUTS_KEY = "fusion_seg_inputs"  # the listing of the input files a store was extracted from (extract/)
VIEW_FIELDS = ("image_index", "view_index", "scale", "flip", "resized_h", "resized_w", "valid_h", "valid_w", "seed")
OPTIONAL_CHUNKS = ("views",)  # the one array whose absent chunks are meaningful (views not completed yet)


class MissingChunkError(Exception):
    """A chunk of a data array is absent from the store (Zarr would have read it as the fill value)."""


async def _store_set(store, key: str, value) -> None:
    """Write one object of an open FeatureStore (a chunk, or its attributes): ``store.set(key, value)``.

    Every write of an open FeatureStore passes here (see :class:`_ChunksRequired`): the one place a
    test replaces to make the store fail as a full disk does, with zarr and the files still real.
    """
    await store.set(key, value)


class _ChunksRequired(WrapperStore):
    """The store, except that reading an absent chunk of a data array raises :class:`MissingChunkError`.

    Costs nothing: the absence is the answer of the read that fetches the chunk anyway. Writes go
    through :func:`_store_set`.
    """

    async def get(self, key, prototype=None, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is None and "/c/" in key and key.split("/", 1)[0] not in OPTIONAL_CHUNKS:
            raise MissingChunkError(f"chunk {key} is missing")
        return value

    async def set(self, key, value) -> None:
        await _store_set(self._store, key, value)


def _chunks_required(group: zarr.Group) -> zarr.Group:
    """``group`` read through :class:`_ChunksRequired` (unchanged if it already is)."""
    if isinstance(group.store, _ChunksRequired):
        return group
    mode = "r" if group.store.read_only else "r+"
    return zarr.open_group(_ChunksRequired(group.store), mode=mode, zarr_format=3)


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines a store's contents. Two runs with equal specs write identical stores."""

    encoder: dict                     # EncoderIdentity.to_dict(); typed: encoder_identity
    dataset: dict                     # SegDataset.describe()
    classes: tuple[str, ...]
    ignore_index: int
    image_ids: tuple[str, ...]
    views_per_image: int
    augment: dict                     # {"enabled", "crop", "scale_range", "flip", "seed"}
    resize: dict                      # {"short_side", "size"}
    label_shape: tuple[int, int]      # (H, W) of the labels array
    feature_shapes: dict              # {name: [C, h, w]} of the feature arrays
    dtype: str = storage.DEFAULT_DTYPE   # storage dtype: float16, bfloat16 or uint8 (see storage.py)
    codec: dict = field(default_factory=lambda: storage.codec_spec(storage.DEFAULT_CODEC))
    schema_version: int = SCHEMA_VERSION

    @property
    def num_views(self) -> int:
        return len(self.image_ids) * self.views_per_image

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, plain JSON

    @classmethod
    def from_json(cls, d: dict) -> "CacheSpec":
        d = dict(d)
        d["classes"] = tuple(d["classes"])
        d["image_ids"] = tuple(d["image_ids"])
        d["label_shape"] = tuple(d["label_shape"])
        return cls(**d)

    @property
    def encoder_identity(self) -> EncoderIdentity:
        """The encoder the features were made with, typed (``encoder`` is its JSON, as stored)."""
        return EncoderIdentity.from_dict(self.encoder)

    def input_shapes(self) -> dict[str, ShapeSpec]:
        return self.encoder_identity.output_shape()

    def differences(self, other: "CacheSpec") -> list[str]:
        """``key: stored A, requested B`` for each setting that differs; for a dict setting (augment,
        resize, encoder, ...) only its differing entries, and a long list (image ids) by its length."""
        a, b = self.to_json(), other.to_json()
        out = []
        for k in a:
            if a[k] == b[k]:
                continue
            if isinstance(a[k], dict) and isinstance(b[k], dict):
                out += [f"{k}.{sub}: stored {a[k].get(sub)!r}, requested {b[k].get(sub)!r}"
                        for sub in sorted(set(a[k]) | set(b[k])) if a[k].get(sub) != b[k].get(sub)]
            elif isinstance(a[k], list) and max(len(a[k]), len(b[k])) > 8:
                out.append(f"{k}: stored {len(a[k])} entries, requested {len(b[k])} (they differ)")
            else:
                out.append(f"{k}: stored {a[k]!r}, requested {b[k]!r}")
        return out


class FeatureStore:
    """Read and write access to one feature store."""

    def __init__(self, path: str | Path, group: zarr.Group, spec: CacheSpec):
        self.path = str(path)
        self.group = group = _chunks_required(group)
        self.spec = spec
        # Written even where a chunk equals the fill value: a completed view has every chunk (see above).
        data = lambda name: group[name].with_config({"write_empty_chunks": True})  # noqa: E731
        self._arrays = {name: data(name) for name in spec.feature_shapes}
        self._scales = ({name: data(f"scale_{name}") for name in spec.feature_shapes}
                        if storage.has_scales(spec.dtype) else {})
        self._labels = data("labels")
        self._views = group["views"]
        self._strides = {name: spec.input_shapes()[name].stride for name in spec.feature_shapes}

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "FeatureStore":
        """Open an existing store, checking that it is one and that its schema is readable.

        ``path`` is a folder or a URL (``s3://bucket/x.zarr``, ``file:///abs/x.zarr``), see store_url.py.
        """
        if not store_url.exists(path):
            store_url.require_bucket(path)
            raise CacheError(
                f"{path} is not a fusion-seg feature store (no zarr.json). "
                "Create it with `fusion-seg extract ... --out STORE`."
            )
        try:
            group = zarr.open_group(_ChunksRequired(store_url.zarr_store(path, mode)), mode=mode, zarr_format=3)
            attrs = group.attrs.asdict()
        except CacheError:
            raise
        except Exception as exc:
            raise CacheError(f"cannot open feature store {path}: {exc}") from exc
        if ATTRS_KEY not in attrs:
            raise CacheError(f"{path} is a Zarr group but not a fusion-seg feature store (no '{ATTRS_KEY}' attributes).")
        stored = attrs[ATTRS_KEY]
        version = stored.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise CacheError(
                f"{path} has cache schema version {version}, newer than this fusion-seg understands "
                f"({SCHEMA_VERSION}). Upgrade fusion-seg, or re-extract the store with this version."
            )
        return cls(path, group, CacheSpec.from_json(stored))

    @classmethod
    def create_or_resume(cls, path: str | Path, spec: CacheSpec) -> "FeatureStore":
        """Create a new store for ``spec``, or reopen an existing one made with exactly the same settings."""
        if not store_url.exists(path):
            try:
                # The attributes go in with the group, and any array a killed creation left out is made
                # on the next open: a store is never stranded half-created.
                group = store_url.create_group(path, {ATTRS_KEY: spec.to_json()})
            except FileExistsError:
                pass  # another process created it first: resume it, checking its settings
            else:
                _ensure_arrays(group, spec)
                return cls(path, group, spec)
        group = zarr.open_group(store_url.zarr_store(path, "r+"), mode="r+", zarr_format=3)
        stored = group.attrs.asdict().get(ATTRS_KEY)
        if stored is None:
            raise CacheError(f"{path} exists but is not a fusion-seg feature store; choose another --out.")
        _ensure_arrays(group, CacheSpec.from_json(stored))
        store = cls.open(path, mode="r+")
        diffs = store.spec.differences(spec)
        if diffs:
            raise CacheError(
                f"{path} was extracted with different settings and cannot be resumed with these: "
                + "; ".join(diffs)
                + ". Use a new --out, or delete the store to start over."
            )
        return store

    # ----------------------------------------------------------------- writing
    def write_view(self, v: int, features: dict[str, np.ndarray], labels: np.ndarray, meta: dict) -> None:
        """Write view ``v``; its metadata row goes last and marks it complete."""
        for name, arr in features.items():
            c, h, w = arr.shape
            target = self._arrays[name]
            stored, scale = storage.encode(arr, self.spec.dtype)
            if (h, w) != tuple(target.shape[2:]):
                full = np.zeros(target.shape[1:], dtype=stored.dtype)
                full[:, :h, :w] = stored
                stored = full
            target[v] = stored
            if scale is not None:
                self._scales[name][v] = scale
        lh, lw = labels.shape
        if (lh, lw) == tuple(self.spec.label_shape):
            self._labels[v] = labels
        else:
            full = np.full(self.spec.label_shape, self.spec.ignore_index, dtype=np.uint8)
            full[:lh, :lw] = labels
            self._labels[v] = full
        self._views[v] = np.array([float(meta[k]) for k in VIEW_FIELDS], dtype=np.float64)

    def mark_skipped(self, v: int, image_index: int, view_index: int) -> None:
        """Record view ``v`` as done but unusable (its source was bad and ``--skip-bad`` was given)."""
        row = np.full(len(VIEW_FIELDS), math.nan)
        row[VIEW_FIELDS.index("image_index")] = image_index
        row[VIEW_FIELDS.index("view_index")] = view_index
        row[VIEW_FIELDS.index("valid_h")] = row[VIEW_FIELDS.index("valid_w")] = 0
        self._views[v] = row

    def skipped_report(self) -> list[dict]:
        """The samples skipped as bad input (``--skip-bad``), with the reason for each."""
        return list(self.group.attrs.asdict().get(SKIPPED_KEY, []))

    def record_skipped(self, entries: list[dict]) -> None:
        known = {e["view"] for e in entries}
        merged = [e for e in self.skipped_report() if e["view"] not in known] + entries
        self.group.attrs[SKIPPED_KEY] = sorted(merged, key=lambda e: e["view"])

    def invalidate(self, views) -> None:
        """Drop the completion record of ``views``, so the next extraction makes them again."""
        for v in views:
            self._views[int(v)] = np.full(len(VIEW_FIELDS), math.nan)

    # ----------------------------------------------------------------- reading
    @property
    def num_views(self) -> int:
        return self.spec.num_views

    def _rows(self) -> np.ndarray:
        return self._views[:]

    def completed(self) -> np.ndarray:
        """Boolean mask of complete views (made, or skipped as bad input)."""
        return ~np.isnan(self._rows()[:, 0])

    def usable_views(self, max_views_per_image: int | None = None) -> np.ndarray:
        """Indices of complete views that hold data (not skipped); optionally only each image's first K views."""
        rows = self._rows()
        usable = ~np.isnan(rows[:, 0]) & (rows[:, VIEW_FIELDS.index("valid_h")] > 0)
        if max_views_per_image is not None:
            if not 1 <= max_views_per_image <= self.spec.views_per_image:
                raise CacheError(f"cannot use {max_views_per_image} views per image: {self.path} holds "
                                 f"{self.spec.views_per_image}. Pass --views between 1 and {self.spec.views_per_image}.")
            usable &= rows[:, VIEW_FIELDS.index("view_index")] < max_views_per_image
        return np.flatnonzero(usable)

    def verify(self, progress: bool = False) -> dict:
        """Read every chunk of every view; report the views that are corrupt, missing or skipped.

        A completed view with an absent chunk is bad (``error`` says the chunk is missing).
        """
        from fusion_seg.progress import Progress

        rows = self._rows()
        bad, incomplete, skipped = [], [], []
        with Progress(self.num_views, f"verify {self.path}", "view", enabled=progress) as bar:
            for v in range(self.num_views):
                bar.update(1)
                self._verify_view(v, rows, bad, incomplete, skipped)
        return {"store": self.path, "views": self.num_views, "bad": bad, "incomplete": incomplete,
                "skipped": skipped, "ok": not bad and not incomplete}

    def _verify_view(self, v: int, rows, bad: list, incomplete: list, skipped: list) -> None:
        """Read every chunk of view ``v``; append it to ``bad``, ``incomplete`` or ``skipped`` as it is."""
        if np.isnan(rows[v, 0]):
            incomplete.append(v)
            return
        if rows[v, VIEW_FIELDS.index("valid_h")] == 0:
            skipped.append(v)
            return
        for name, array in [*self._arrays.items(), *((f"scale_{n}", a) for n, a in self._scales.items()),
                            ("labels", self._labels)]:
            try:
                array[v]
            except MissingChunkError:
                bad.append({"view": v, "array": name, "chunk": self.chunk_path(name, v),
                            "error": "missing: the view is marked complete but this chunk is not in the store"})
            except Exception as exc:
                bad.append({"view": v, "array": name, "chunk": self.chunk_path(name, v),
                            "error": f"{type(exc).__name__}: {exc}"})

    def content_id(self) -> str:
        """A hash of what the store holds: its spec (dataset, image ids, views, augmentation, encoder, format),
        the record of its input files (:data:`INPUTS_KEY`, when extraction wrote one) and every view's
        completion row. A store re-extracted with other images, views or settings has another id; the same
        extraction run again (bit-identical by design) has the same one. What a recipe's stamp and a
        training run's checkpoint record as the identity of the store they read."""
        h = hashlib.sha256(json.dumps(self.spec.to_json(), sort_keys=True).encode())
        h.update(json.dumps(self.group.attrs.asdict().get(INPUTS_KEY), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self._rows()).tobytes())
        return h.hexdigest()

    def check_complete(self) -> None:
        done = self.completed()
        if not done.all():
            missing = np.flatnonzero(~done)
            raise CacheError(
                f"{self.path} is incomplete: {len(missing)} of {len(done)} views missing "
                f"(first: {missing[:5].tolist()}). Re-run the same `fusion-seg extract` command to finish it."
            )

    def view_meta(self, v: int) -> dict:
        row = self._views[v]
        return {k: float(x) for k, x in zip(VIEW_FIELDS, row)}

    def chunk_path(self, name: str, v: int) -> str:
        """Where view ``v``'s chunk of array ``name`` is: a file, or an object of a remote store."""
        ndim = len(self.group[name].shape)
        return store_url.join(self.path, name, "c", v, *["0"] * (ndim - 1))

    def read_view(self, v: int, names: list[str] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
        """Features (cropped to the view's valid region), labels and metadata of view ``v``."""
        if not 0 <= v < self.num_views:
            raise IndexError(v)
        meta = self._read(lambda: self.view_meta(v), "views", v)
        if math.isnan(meta["image_index"]):
            raise CacheError(f"view {v} of {self.path} was never completed. Re-run the extraction command to finish it.")
        if meta["valid_h"] == 0:
            raise CacheError(f"view {v} of {self.path} was skipped as bad input at extraction "
                             "(`fusion-seg info` lists why).")
        vh, vw = int(meta["valid_h"]), int(meta["valid_w"])
        labels = self._read(lambda: self._labels[v], "labels", v)[:vh, :vw]
        features = {}
        for name in names or list(self._arrays):
            arr = self._read(lambda: self._arrays[name][v], name, v)
            scale = self._read(lambda: self._scales[name][v], f"scale_{name}", v) if self._scales else None
            stride = self._strides[name]
            features[name] = storage.decode(arr[:, : -(-vh // stride), : -(-vw // stride)], self.spec.dtype, scale)
        return features, labels, meta

    def read_stored_view(self, v: int, names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        """View ``v`` as stored, not decoded: ``({name: (C, h, w) storage-dtype map}, {name: (C,) scales}
        (uint8 stores only), (H, W) uint8 labels)``, padded to the store's array shapes.

        What a resident cache (resident.py) holds; the caller reads the valid size from the view's row.
        """
        features = {name: self._read(lambda: self._arrays[name][v], name, v) for name in names}
        scales = ({name: self._read(lambda: self._scales[name][v], f"scale_{name}", v) for name in names}
                  if self._scales else {})
        labels = self._read(lambda: self._labels[v], "labels", v)
        return features, scales, labels

    def rows(self) -> np.ndarray:
        """Every view's metadata row (``VIEW_FIELDS``; NaN rows are views not completed)."""
        return self._rows()

    def _read(self, fn, name: str, v: int):
        try:
            return fn()
        except CacheError:
            raise
        except MissingChunkError:
            raise CacheError(
                f"cannot read view {v} of {self.path}: chunk {self.chunk_path(name, v)} is missing, though the view "
                f"is marked complete (deleted, or lost in a copy). Run `fusion-seg verify {self.path}` to list all "
                "bad views, and `fusion-seg extract ... --repair` to re-extract them."
            ) from None
        except Exception as exc:
            raise CacheError(
                f"cannot read view {v} of {self.path}: chunk {self.chunk_path(name, v)} is corrupt or unreadable "
                f"({type(exc).__name__}: {exc}). Run `fusion-seg verify {self.path}` to list all bad views, "
                "and `fusion-seg extract ... --repair` to re-extract them."
            ) from exc

    # ----------------------------------------------------------------- summary
    def info(self) -> dict:
        """Schema, size on disk, compression ratio and encoder identity."""
        raw = sum(math.prod(a.shape) * 2 for a in self._arrays.values())  # as raw fp16
        raw += math.prod(self._labels.shape)
        stored = store_url.bytes_used(self.path)  # files, or a remote store's objects
        done = int(self.completed().sum())
        return {
            "path": self.path,
            "schema_version": self.spec.schema_version,
            "dataset": self.spec.dataset.get("name"),
            "split": self.spec.dataset.get("split"),
            "num_classes": len(self.spec.classes),
            "images": len(self.spec.image_ids),
            "views": self.num_views,
            "views_complete": done,
            "arrays": {n: {"shape": list(a.shape), "dtype": self.spec.dtype} for n, a in self._arrays.items()},
            "label_shape": list(self.spec.label_shape),
            "codec": self.spec.codec,
            "dtype": self.spec.dtype,
            "bytes_raw_complete": int(raw * done / max(1, self.num_views)),
            "bytes_on_disk": stored,
            "compression_ratio": (raw * done / max(1, self.num_views)) / stored if stored else None,
            "encoder": self.spec.encoder,
            "augment": self.spec.augment,
            "resize": self.spec.resize,
            "skipped": self.skipped_report(),
        }


@contextlib.contextmanager
def writer_lock(path: str | Path):
    """Exclusive right to write a local store: a lock on ``STORE.lock`` (:func:`fusion_seg.locks.exclusive_lock`).

    A second extraction into the same store is refused rather than interleaved. The lock is a POSIX
    record lock, which the kernel drops the moment its holder dies and which its forked DataLoader
    workers do not hold: a re-run right after a kill or an OOM just works. The file sits beside the
    store because Zarr treats unknown files inside it as errors.

    A remote store (``s3://…``) has no lock: its creation is exclusive (see store_url.create_group),
    so two runs with different settings cannot both make it, but two concurrent extractions into the
    same remote store are the user's to avoid. Each chunk is still written whole and both runs
    write the same views, so the store stays usable, but the work is done twice and the store may
    not be bit-identical to one run's (features can differ in the last bit with the batch size).
    """
    if not store_url.is_local(path):
        yield
        return

    def busy(owner: str) -> CacheError:
        return CacheError(f"{path} is being written by another fusion-seg process (pid {owner}). Wait for it to "
                          "finish or stop it, then re-run this command: the views it wrote are kept.")

    with exclusive_lock(store_url.local_path(path), busy):
        yield


def _ensure_arrays(group: zarr.Group, spec: CacheSpec) -> None:
    """Create whichever of the store's arrays do not exist yet."""
    existing = set(group.array_keys())
    compressors = storage.compressors(spec.codec)
    n = spec.num_views
    wanted = {name: ((n, *shape), storage.array_dtype(spec.dtype), 0) for name, shape in spec.feature_shapes.items()}
    if storage.has_scales(spec.dtype):
        wanted |= {f"scale_{name}": ((n, shape[0]), "float32", 0) for name, shape in spec.feature_shapes.items()}
    wanted["labels"] = ((n, *spec.label_shape), "uint8", spec.ignore_index)
    wanted["views"] = ((n, len(VIEW_FIELDS)), "float64", math.nan)
    for name, (shape, dtype, fill) in wanted.items():
        if name not in existing:
            group.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype,
                               compressors=compressors, fill_value=fill)

"""The feature cache: one Zarr v3 store per (dataset, split, extraction settings).

Layout of a store::

    STORE/
      zarr.json            group attributes: {"fusion_seg": <CacheSpec>}
      s2, s4, ..., s32     (views, C, h, w) in the storage dtype (float16 by default), one view per chunk
      scale_s2, ...        (views, C) float32 per-channel scales, only for --dtype uint8
      labels               (views, H, W) uint8, one view per chunk, ignore = spec.ignore_index
      views                (views, 9) float64, one view per chunk: per-view metadata, see VIEW_FIELDS
      inputs               (n,) uint8: the listing of the input files, as JSON (file datasets only)

Every chunk is compressed (the codec is a store setting, see codecs.py) and carries a
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

Metadata: every array's ``zarr.json`` must be what the store's settings (the spec, in the root
``zarr.json``) make: a truncated or invalid document, or one whose shape, dtype or chunking was
edited, would misread every chunk. Opening a store checks each (:func:`_open_arrays`, a
:class:`StoreMetadataError` naming the files: ``info`` and training refuse the store, ``verify``
reports it), and ``extract --repair`` rewrites them from the spec, keeping the chunks, which it
then verifies. A damaged root ``zarr.json`` holds the spec itself: it is named, with the fix.

Inputs: a store made from files records them (:data:`INPUTS_KEY`: their number and a sha256 of
their listing in the attributes, the listing itself in the ``inputs`` array), and an extraction
into it refuses input files that were replaced, added or removed since
(:meth:`FeatureStore.check_inputs`). Stores written before this record, and stores of generated
data, which has no files, have none and are not checked.

Skipped views (``--skip-bad``): a view marked done with a zero valid size. That mark, in
``views``, is the one source of every skipped count (:meth:`FeatureStore.skipped_views`); the
attributes (:data:`SKIPPED_KEY`) only add why, when the run lived to record it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import WrapperStore

from fusion_seg.cache import codecs

from fusion_seg.cache import locations
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import CacheError, UserError
from fusion_seg.shapes import ShapeSpec

SCHEMA_VERSION = 1
ATTRS_KEY = "fusion_seg"
SKIPPED_KEY = "fusion_seg_skipped"
INPUTS_KEY = "fusion_seg_inputs"  # {"files", "sha256"} of the listing of the input files (see check_inputs)
INPUTS_ARRAY = "inputs"  # that listing itself, JSON bytes, to name what changed
VIEW_FIELDS = ("image_index", "view_index", "scale", "flip", "resized_h", "resized_w", "valid_h", "valid_w", "seed")
OPTIONAL_CHUNKS = ("views",)  # the one array whose absent chunks are meaningful (views not completed yet)


REPAIR_METADATA = ("Re-run the extract command that made the store with --repair: it rewrites that metadata from the "
                   "store's settings, then checks every chunk and re-extracts the views whose chunks are bad. Or "
                   "delete the store and extract again.")


class MissingChunkError(Exception):
    """A chunk of a data array is absent from the store (Zarr would have read it as the fill value)."""


class StoreMetadataError(CacheError):
    """Arrays of a store whose ``zarr.json`` cannot be used (see :func:`_open_arrays`).

    ``problems``: ``[{"array", "file", "error"}]``, every such array; ``views``: the store's view count.
    """

    def __init__(self, path: str, views: int, problems: list[dict]):
        self.path, self.views, self.problems = path, views, problems
        listed = "; ".join(f"{p['file']}: {p['error']}" for p in problems[:3])
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        arrays = f"{len(problems)} of its arrays is" if len(problems) == 1 else f"{len(problems)} of its arrays are"
        super().__init__(f"{path}: the metadata of {arrays} unusable ({listed}{more}). {REPAIR_METADATA}")


class _InvalidMetadata(Exception):
    """An array's ``zarr.json`` was read but is not usable array metadata (the message says why)."""


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
    dtype: str = codecs.DEFAULT_DTYPE   # storage dtype: float16, bfloat16 or uint8 (see codecs.py)
    codec: dict = field(default_factory=lambda: codecs.codec_spec(codecs.DEFAULT_CODEC))
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
        if _same_folder((a.get("dataset") or {}).get("root"), (b.get("dataset") or {}).get("root")):
            b["dataset"] = {**b["dataset"], "root": a["dataset"]["root"]}  # data/camvid here = /abs/data/camvid
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


def _file_key(path: str) -> str:
    """The file or folder ``path`` names from this working directory (relative or absolute, through links)."""
    return os.path.realpath(path)


def _same_folder(a, b) -> bool:
    """Whether two dataset roots name one folder from this working directory (a relative and an absolute
    spelling): a resume from another folder of the project is not other settings. What the folder holds is
    checked apart, file by file (:meth:`FeatureStore.check_inputs`)."""
    return isinstance(a, str) and isinstance(b, str) and a != b and _file_key(a) == _file_key(b)


class FeatureStore:
    """Read and write access to one feature store."""

    def __init__(self, path: str | Path, group: zarr.Group, spec: CacheSpec):
        """Raises :class:`StoreMetadataError` when an array's metadata does not match ``spec``."""
        self.path = str(path)
        self.group = group = _chunks_required(group)
        self.spec = spec
        arrays = _open_arrays(group, spec, self.path)
        # Written even where a chunk equals the fill value: a completed view has every chunk (see above).
        data = lambda name: arrays[name].with_config({"write_empty_chunks": True})  # noqa: E731
        self._arrays = {name: data(name) for name in spec.feature_shapes}
        self._scales = ({name: data(f"scale_{name}") for name in spec.feature_shapes}
                        if codecs.has_scales(spec.dtype) else {})
        self._labels = data("labels")
        self._views = arrays["views"]
        self._strides = {name: spec.input_shapes()[name].stride for name in spec.feature_shapes}

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "FeatureStore":
        """Open an existing store, checking that it is one, that its schema is readable and that its arrays'
        metadata is what its settings make (:class:`StoreMetadataError` otherwise).

        ``path`` is a folder or a URL (``s3://bucket/x.zarr``, ``file:///abs/x.zarr``), see locations.py.
        """
        if not locations.exists(path):
            locations.require_bucket(path)
            raise CacheError(
                f"{path} is not a fusion-seg feature store (no zarr.json). "
                "Create it with `fusion-seg extract ... --out STORE`."
            )
        group, attrs = _open_root(path, mode)
        return cls(path, group, _spec_of(attrs, path))

    @classmethod
    def create_or_resume(cls, path: str | Path, spec: CacheSpec, *, inputs: list | None = None,
                         repair: bool = False) -> "FeatureStore":
        """Create a new store for ``spec``, or reopen an existing one made with exactly the same settings.

        ``inputs`` (:func:`fusion_seg.files.file_listing` of the files the views are made from) is recorded
        in a new store, for :meth:`check_inputs`. With ``repair``, the metadata of any array that does not
        match the store's settings is first rewritten from them (:func:`_rewrite_metadata`).
        """
        if not locations.exists(path):
            attributes = {ATTRS_KEY: spec.to_json(), **({INPUTS_KEY: _inputs_record(inputs)} if inputs else {})}
            try:
                # The attributes go in with the group, and any array a killed creation left out is made
                # on the next open: a store is never stranded half-created.
                group = locations.create_group(path, attributes)
            except FileExistsError:
                pass  # another process created it first: resume it, checking its settings
            else:
                _ensure_arrays(group, spec, str(path))
                if inputs:
                    _write_listing(group, inputs)
                return cls(path, group, spec)
        group, attrs = _open_root(path, "r+")
        stored = _spec_of(attrs, path)
        diffs = stored.differences(spec)
        if diffs:
            raise CacheError(
                f"{path} was extracted with different settings and cannot be resumed with these: "
                + "; ".join(diffs)
                + ". Use a new --out, or delete the store to start over."
            )
        if repair:
            _rewrite_metadata(group, stored, str(path))
        _ensure_arrays(group, stored, str(path))
        return cls.open(path, mode="r+")

    def check_inputs(self, listing: list, *, may_change=()) -> None:
        """Refuse to go on with this store from input files other than those it was extracted from.

        ``listing`` is :func:`fusion_seg.files.file_listing` of the dataset's input files now. A file added,
        removed or changed (its size or modification time) since the store was created is refused (a
        CacheError saying how many and naming the first few): the store's views would mix features of the
        old and the new data. Only files of ``may_change`` (those of the views ``extract --repair`` is about
        to re-extract, which the user may have fixed) may have changed: the record is then updated to them.
        Stores without a record (written before inputs were recorded, or of generated data) are not checked.
        """
        record = self.group.attrs.asdict().get(INPUTS_KEY)
        if record is None or _inputs_record(listing) == record:
            return
        stored = self._stored_listing()
        if stored is None:  # a creation killed before the listing was written, or an unreadable one
            raise CacheError(
                f"{self.path} was extracted from other input files: their listing changed ({record.get('files')} "
                f"files then, {len(listing)} now). Its views would mix features of the old and the new data: "
                "extract into a new --out, or delete the store to start over."
            )
        # Keyed by the file each path names from here: a root given relatively once and absolutely now is the
        # same files, and the store's record of them stays as it is.
        old = {_file_key(path): rest for path, *rest in stored}
        new = {_file_key(path): rest for path, *rest in listing}
        changes = sorted([(p, "added") for p in new.keys() - old.keys()]
                         + [(p, "removed") for p in old.keys() - new.keys()]
                         + [(p, "changed") for p in old.keys() & new.keys() if old[p] != new[p]])
        if not changes:
            return
        allowed = {_file_key(p) for p in may_change}
        refused = [(p, kind) for p, kind in changes if not (kind == "changed" and p in allowed)]
        if refused:
            counts = ", ".join(f"{n} {kind}" for kind in ("changed", "added", "removed")
                               if (n := sum(k == kind for _, k in refused)))
            files = "1 input file" if len(refused) == 1 else f"{len(refused)} input files"
            raise CacheError(
                f"{self.path} was extracted from other input files: {files} differ since ({counts}; first: "
                + ", ".join(f"{p} ({kind})" for p, kind in refused[:3])
                + "). Its views would mix features of the old and the new data: extract into a new --out, "
                "or delete the store to start over."
            )
        _write_listing(self.group, listing)  # the listing first: a record without its listing names no file
        self.group.attrs[INPUTS_KEY] = _inputs_record(listing)

    def _stored_listing(self) -> list | None:
        """The listing recorded at creation; None when it is absent or cannot be read."""
        try:
            return json.loads(self.group[INPUTS_ARRAY][:].tobytes())
        except Exception:  # absent, missing chunk, corrupt: only the message loses the names
            return None

    # ----------------------------------------------------------------- writing
    def write_view(self, v: int, features: dict[str, np.ndarray], labels: np.ndarray, meta: dict) -> None:
        """Write view ``v``; its metadata row goes last and marks it complete."""
        for name, arr in features.items():
            c, h, w = arr.shape
            target = self._arrays[name]
            stored, scale = codecs.encode(arr, self.spec.dtype)
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

    def skipped_views(self) -> np.ndarray:
        """Indices of the views skipped as bad input (``--skip-bad``): marked done, with no valid pixels.

        The one source of every skipped count (``info``, ``verify``, ``extract``): the mark is written
        before the reason, and a view made again by ``--repair`` loses it.
        """
        return _skipped(self._rows())

    def skipped_report(self) -> list[dict]:
        """Each skipped view (:meth:`skipped_views`) with the reason it was skipped: as recorded at extraction,
        or, when the run was stopped between marking a view and recording why, a reason saying so."""
        rows = self._rows()
        recorded = {e["view"]: e for e in self.group.attrs.asdict().get(SKIPPED_KEY, [])}
        report = []
        for v in _skipped(rows).tolist():
            i = int(rows[v, VIEW_FIELDS.index("image_index")])
            report.append(recorded.get(v) or {
                "view": v, "image_index": i, "view_index": int(rows[v, VIEW_FIELDS.index("view_index")]),
                "image_id": self.spec.image_ids[i],
                "error": "not recorded: the extraction was stopped before it recorded why"})
        return report

    def record_skipped(self, entries: list[dict]) -> None:
        """Add why the views of ``entries`` were skipped; the reasons of views no longer skipped are dropped."""
        keep = set(self.skipped_views().tolist()) - {e["view"] for e in entries}
        merged = [e for e in self.group.attrs.asdict().get(SKIPPED_KEY, []) if e["view"] in keep] + entries
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
        skipped = _skipped(rows).tolist()
        bad, incomplete = [], []
        with Progress(self.num_views, f"verify {self.path}", "view", enabled=progress) as bar:
            for v in range(self.num_views):
                bar.update(1)
                if np.isnan(rows[v, 0]):
                    incomplete.append(v)
                elif rows[v, VIEW_FIELDS.index("valid_h")] > 0:  # not skipped
                    self._verify_view(v, bad)
        return {"store": self.path, "views": self.num_views, "metadata": [], "bad": bad, "incomplete": incomplete,
                "skipped": skipped, "ok": not bad and not incomplete}

    def _verify_view(self, v: int, bad: list) -> None:
        """Read every chunk of the completed view ``v``; append each that cannot be read to ``bad``."""
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
        return locations.join(self.path, name, "c", v, *["0"] * (ndim - 1))

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
            features[name] = codecs.decode(arr[:, : -(-vh // stride), : -(-vw // stride)], self.spec.dtype, scale)
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
        stored = locations.bytes_used(self.path)  # files, or a remote store's objects
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


def verify_store(path: str | Path, progress: bool = False) -> dict:
    """:meth:`FeatureStore.verify` of the store at ``path``. A store whose arrays' metadata is unusable cannot
    be read chunk by chunk: it is reported (``metadata``: each such array, and ``ok`` False), not raised."""
    try:
        store = FeatureStore.open(path)
    except StoreMetadataError as exc:
        return {"store": str(path), "views": exc.views, "metadata": exc.problems, "bad": [], "incomplete": [],
                "skipped": [], "ok": False}
    return store.verify(progress=progress)


def _skipped(rows: np.ndarray) -> np.ndarray:
    """The views of ``rows`` skipped as bad input: done (a row), with a zero valid height."""
    return np.flatnonzero(~np.isnan(rows[:, 0]) & (rows[:, VIEW_FIELDS.index("valid_h")] == 0))


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _open_root(path, mode: str) -> tuple[zarr.Group, dict]:
    """The store's root group and its attributes. A root ``zarr.json`` that is read but is not a Zarr group
    document (truncated, not JSON, not an object) is a CacheError naming it and the fix."""
    try:
        group = zarr.open_group(_ChunksRequired(locations.zarr_store(path, mode)), mode=mode, zarr_format=3)
        return group, group.attrs.asdict()
    except UserError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise CacheError(
            f"{locations.join(path, 'zarr.json')} is not a valid Zarr group document ({_one_line(exc)}). It holds "
            f"the store's settings, without which its views cannot be read: restore it from a copy of the store, "
            f"or delete {path} and extract again."
        ) from None
    except Exception as exc:  # not read: the file system's or the network's error
        raise locations.reach_error(path, "open", exc) from exc


def _spec_of(attrs: dict, path) -> CacheSpec:
    """The store's settings, from its root attributes: refused when absent, of a newer schema, or invalid."""
    root = locations.join(path, "zarr.json")
    stored = attrs.get(ATTRS_KEY)
    if stored is None:
        raise CacheError(f"{path} is a Zarr group but not a fusion-seg feature store (no '{ATTRS_KEY}' attributes "
                         f"in {root}); choose another store (extract: another --out).")
    version = stored.get("schema_version") if isinstance(stored, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise CacheError(
            f"{path} has cache schema version {version}, newer than this fusion-seg understands "
            f"({SCHEMA_VERSION}). Upgrade fusion-seg, or re-extract the store with this version."
        )
    try:
        if not isinstance(version, int):
            raise ValueError(f"schema_version is {version!r}")
        return CacheSpec.from_json(stored)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CacheError(f"{root}: the store's settings (its '{ATTRS_KEY}' attributes) are invalid "
                         f"({_one_line(exc)}); restore that file from a copy of the store, or delete {path} and "
                         "extract again.") from None


def _layout(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], str, float]]:
    """Every array of a store of ``spec``: ``{name: (shape, dtype, fill value)}``, each chunked one view a chunk."""
    n = spec.num_views
    out = {name: ((n, *shape), codecs.array_dtype(spec.dtype), 0) for name, shape in spec.feature_shapes.items()}
    if codecs.has_scales(spec.dtype):
        out |= {f"scale_{name}": ((n, shape[0]), "float32", 0) for name, shape in spec.feature_shapes.items()}
    out["labels"] = ((n, *spec.label_shape), "uint8", spec.ignore_index)
    out["views"] = ((n, len(VIEW_FIELDS)), "float64", math.nan)
    return out


def _create_array(group: zarr.Group, name: str, spec: CacheSpec) -> zarr.Array:
    shape, dtype, fill = _layout(spec)[name]
    return group.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype,
                              compressors=codecs.compressors(spec.codec), fill_value=fill)


def _read_array(group: zarr.Group, name: str, path: str) -> zarr.Array | None:
    """The array ``name`` of ``group``; None when it has no ``zarr.json``. Raises :class:`_InvalidMetadata`
    when that document is read but is not array metadata, and a CacheError when it cannot be read."""
    try:
        node = group[name]
    except KeyError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):  # zarr's answer for an absent zarr.json
            return None
        raise _InvalidMetadata(f"not valid array metadata ({_one_line(exc)})") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise _InvalidMetadata(f"not valid array metadata ({_one_line(exc)})") from None
    except Exception as exc:  # not read: the file system's or the network's error
        raise locations.reach_error(path, "read", exc) from exc
    if not isinstance(node, zarr.Array):
        raise _InvalidMetadata("a group's metadata, not an array's")
    return node


def _mismatch(array: zarr.Array, shape: tuple, dtype: str) -> str | None:
    """How ``array``'s metadata differs from the shape, dtype and chunking the settings make (None: it does not)."""
    expected = {"shape": list(shape), "dtype": str(np.dtype(dtype)), "chunks": [1, *shape[1:]]}
    found = {"shape": list(array.shape), "dtype": str(array.dtype), "chunks": list(array.chunks)}
    return "; ".join(f"{key} {found[key]}, where the store's settings make {expected[key]}"
                     for key in expected if found[key] != expected[key]) or None


def _open_arrays(group: zarr.Group, spec: CacheSpec, path: str) -> dict[str, zarr.Array]:
    """The arrays of ``spec`` (:func:`_layout`) in ``group``. Each ``zarr.json`` that is missing, is not
    valid array metadata, or gives another shape, dtype or chunking than the settings (every chunk
    would be misread) is listed in one :class:`StoreMetadataError`."""
    arrays, problems = {}, []
    for name, (shape, dtype, _) in _layout(spec).items():
        try:
            array = _read_array(group, name, path)
            problem = "missing" if array is None else _mismatch(array, shape, dtype)
        except _InvalidMetadata as exc:
            problem = str(exc)
        if problem:
            problems.append({"array": name, "file": locations.join(path, name, "zarr.json"), "error": problem})
        else:
            arrays[name] = array
    if problems:
        raise StoreMetadataError(path, spec.num_views, problems)
    return arrays


def _ensure_arrays(group: zarr.Group, spec: CacheSpec, path: str) -> None:
    """Create whichever of the store's arrays have no ``zarr.json`` yet (a creation killed half-way).

    One whose ``zarr.json`` is there but unusable is left as it is: opening the store names it, and
    ``--repair`` rewrites it (:func:`_rewrite_metadata`).
    """
    for name in _layout(spec):
        try:
            missing = _read_array(group, name, path) is None
        except _InvalidMetadata:
            missing = False
        if missing:
            _create_array(group, name, spec)


def _rewrite_metadata(group: zarr.Group, spec: CacheSpec, path: str) -> None:
    """Rewrite, from ``spec``, the ``zarr.json`` of each array whose metadata :func:`_open_arrays` refuses.

    Each document is the one zarr writes when it creates the array (made in memory), written over the
    bad one alone: the chunks stay, and are read with the metadata they were written with. Whether they
    are intact is for :meth:`FeatureStore.verify` to tell (``extract --repair`` runs it next).
    """
    try:
        _open_arrays(group, spec, path)
        return
    except StoreMetadataError as exc:
        names = [p["array"] for p in exc.problems]
    documents: dict = {}
    scratch = zarr.open_group(zarr.storage.MemoryStore(documents), mode="w", zarr_format=3)
    for name in names:
        _create_array(scratch, name, spec)
        locations.put(path, f"{name}/zarr.json", documents[f"{name}/zarr.json"].to_bytes())


def _listing_json(listing: list) -> bytes:
    return json.dumps(listing).encode()


def _inputs_record(listing: list) -> dict:
    """What the attributes hold of an input listing: its number of files and its sha256 (which equals
    :func:`fusion_seg.files.listing_digest` of the same files)."""
    return {"files": len(listing), "sha256": hashlib.sha256(_listing_json(listing)).hexdigest()}


def _write_listing(group: zarr.Group, listing: list) -> None:
    """Store ``listing`` in the ``inputs`` array, replacing any earlier one: JSON bytes, zstd-compressed."""
    data = np.frombuffer(_listing_json(listing), dtype=np.uint8)
    array = group.create_array(INPUTS_ARRAY, shape=data.shape, chunks=data.shape, dtype="uint8", fill_value=0,
                               compressors=codecs.compressors(codecs.codec_spec("zstd")), overwrite=True)
    array[:] = data

"""Stage one: run the frozen encoder once per view and store the features.

The loop overlaps its three costs: a DataLoader with workers decodes and augments
the next views while the encoder runs, and a pool of writer threads compresses and
writes finished views (Blosc releases the GIL) while the encoder runs the next batch.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import CacheSpec, FeatureStore, writer_lock
from .datasets import build_dataset
from .datasets.base import SegDataset
from .device import autocast, resolve_device, to_device
from .encoder import DEFAULT_ENCODER, DEFAULT_STRIDES, FrozenEncoder, build_encoder
from .errors import CacheError, DataError, Failed, UserError
from .storage import DEFAULT_CODEC, DEFAULT_DTYPE, check_dtype, codec_spec
from .transforms import resized_shape
from .views import Augment, Resize, ViewSource, collate_list, stack_groups


SKIP_HINT = "(or pass --skip-bad to skip bad samples and go on)"


@dataclass
class ExtractResult:
    store: str
    views_total: int
    views_written: int
    seconds: float
    skipped: list = field(default_factory=list)  # [{"view", "image_id", "error", ...}] with --skip-bad

    @property
    def views_per_second(self) -> float:
        return self.views_written / self.seconds if self.seconds > 0 else 0.0


def label_shape_for(dataset: SegDataset, augment: Augment, resize: Resize, skip_bad: bool = False) -> tuple[int, int]:
    """The labels array's (H, W): the crop, or the largest resized image.

    With ``skip_bad`` an unreadable image is left out here; the extraction loop skips it.
    """
    if augment.enabled:
        return tuple(augment.crop)
    sizes = set()
    for i in range(len(dataset)):
        try:
            sizes.add(resized_shape(dataset.image_size(i), short_side=resize.short_side, size=resize.size))
        except DataError as exc:
            if not skip_bad:
                raise DataError(f"{exc} {SKIP_HINT}") from exc
    if not sizes:
        raise DataError(f"no readable image in {dataset.name}/{dataset.split}; nothing to extract.")
    return max(h for h, _ in sizes), max(w for _, w in sizes)


def feature_shapes_for(encoder: FrozenEncoder, hw: tuple[int, int]) -> dict[str, list[int]]:
    """Shapes of every feature map for an input of size ``hw`` (one probe forward)."""
    probe = encoder(torch.zeros(1, 3, *hw))
    return {name: list(t.shape[1:]) for name, t in probe.items()}


def build_spec(dataset: SegDataset, encoder: FrozenEncoder, views: int, augment: Augment, resize: Resize,
               skip_bad: bool = False, dtype: str = DEFAULT_DTYPE, codec: str | dict = DEFAULT_CODEC) -> CacheSpec:
    label_shape = label_shape_for(dataset, augment, resize, skip_bad)
    return CacheSpec(
        encoder=encoder.identity.to_dict(),
        dataset=dataset.describe(),
        classes=tuple(dataset.classes),
        ignore_index=dataset.ignore_index,
        image_ids=tuple(dataset.ids),
        views_per_image=views,
        augment=augment.to_json(),
        resize=resize.to_json(),
        label_shape=label_shape,
        feature_shapes=feature_shapes_for(encoder, label_shape),
        dtype=check_dtype(dtype),
        codec=codec_spec(codec),
    )


def extract(
    *,
    dataset: str,
    split: str,
    out: str | Path,
    root: str | Path | None = None,
    views: int = 1,
    augment: bool = True,
    crop: tuple[int, int] = (512, 512),
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    short_side: int | None = None,
    size: tuple[int, int] | None = None,
    encoder: str = DEFAULT_ENCODER,
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    strides: tuple[int, ...] = DEFAULT_STRIDES,
    dtype: str = DEFAULT_DTYPE,
    codec: str | dict = DEFAULT_CODEC,
    batch_size: int = 4,
    workers: int = 2,
    writers: int = 2,
    device: str = "auto",
    dataset_options: dict | None = None,
    repair: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
) -> ExtractResult:
    """Extract features of ``views`` views per image of ``dataset``/``split`` into the store ``out``.

    Re-running the same call resumes: only views without a completion record are made.
    A store made with other settings is refused, never mixed; a store being written by
    another process is refused. ``repair`` first verifies every chunk and re-extracts the
    views that are corrupt (or were skipped). ``skip_bad`` records unreadable samples as
    skipped, lists them (with the reason) in the store's attributes, and goes on.
    """
    arguments = dict(locals())
    if views < 1:
        raise UserError("--views must be at least 1.")
    if not augment and views != 1:
        raise UserError("--no-augment stores the whole image once; use it with --views 1.")
    if short_side is not None and size is not None:
        raise UserError("--short-side and --size are mutually exclusive.")
    check_dtype(dtype)
    codec_spec(codec)
    with writer_lock(out):
        return _extract_locked(**arguments)


def _extract_locked(*, dataset, split, out, root, views, augment, crop, scale_range, flip, short_side, size,
                    encoder, weights, random_init, seed, strides, dtype, codec, batch_size, workers, writers, device,
                    dataset_options, repair, skip_bad, progress) -> ExtractResult:
    ds = build_dataset(dataset, root=root, split=split, **(dataset_options or {}))
    if len(ds) == 0:
        raise UserError(f"dataset {dataset!r} split {split!r} has no images; nothing to extract.")
    dev = resolve_device(device)
    enc = build_encoder(encoder, weights_file=weights, random_init=random_init, seed=seed, strides=strides)
    aug = Augment(enabled=augment, crop=tuple(crop) if augment else None, scale_range=tuple(scale_range),
                  flip=flip if augment else False, seed=seed)
    rsz = Resize(short_side=short_side, size=tuple(size) if size else None)
    spec = build_spec(ds, enc, views, aug, rsz, skip_bad, dtype=dtype, codec=codec)
    store = FeatureStore.create_or_resume(out, spec)
    if repair:
        report = store.verify(progress=progress)
        store.invalidate(sorted({b["view"] for b in report["bad"]} | set(report["skipped"])))
    todo = np.flatnonzero(~store.completed()).tolist()
    result = ExtractResult(str(out), spec.num_views, 0, 0.0)
    if not todo:
        return result
    skipped: list[dict] = []

    enc = enc.to(dev)
    source = ViewSource(ds, views, aug, rsz, enc.identity.mean, enc.identity.std)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(source, todo), batch_size=batch_size, num_workers=workers,
        collate_fn=collate_list, pin_memory=dev.type == "cuda", prefetch_factor=4 if workers else None,
    )
    start = time.perf_counter()
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=max(1, writers), thread_name_prefix="zarr-writer") as pool, \
            tqdm(total=len(todo), desc=f"extract {Path(str(out)).name}", unit="view", disable=None if progress else True) as bar:
        for items in loader:
            for bad in [it for it in items if isinstance(it, Failed)]:
                if not skip_bad:
                    raise type(bad.error)(f"{bad.error} {SKIP_HINT}")
                store.mark_skipped(bad.index, bad.info["image_index"], bad.info["view_index"])
                skipped.append({"view": bad.index, **bad.info, "error": str(bad.error)})
                result.views_written += 1
                bar.update(1)
            for group in stack_groups([it for it in items if not isinstance(it, Failed)]):
                images = to_device(torch.stack([it["image"] for it in group]), dev)
                with autocast(dev):
                    feats = enc(images)
                host = torch.float16 if spec.dtype == "float16" else torch.float32  # bf16/uint8 round from fp32
                feats = {k: t.to(host).cpu().numpy() for k, t in feats.items()}
                for j, it in enumerate(group):
                    per_view = {k: a[j] for k, a in feats.items()}
                    pending.append(pool.submit(store.write_view, it["index"], per_view, it["labels"].numpy(), it["meta"]))
            # Bound the memory held by views waiting to be written, and surface write errors early.
            while len(pending) > 4 * max(1, writers):
                _finish(pending.pop(0), out)
                result.views_written += 1
                bar.update(1)
        while pending:
            _finish(pending.pop(0), out)
            result.views_written += 1
            bar.update(1)
    result.seconds = time.perf_counter() - start
    result.skipped = skipped
    if skipped:
        store.record_skipped(skipped)
    return result


def _finish(future: Future, out) -> None:
    try:
        future.result()
    except OSError as exc:
        raise CacheError(
            f"writing to {out} failed: {exc}. Free space or fix permissions, then re-run the same command: "
            "the views already written are kept and only the missing ones are extracted."
        ) from exc

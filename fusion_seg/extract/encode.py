"""What local and dask extraction share: the store's spec for a dataset and encoder, one encoder
forward over a batch of views, and the ``--skip-bad`` policy for views that failed to load.

Before any of it, :func:`check_view_count` and :func:`check_view_size` refuse settings whose memory
cannot fit in this machine (:func:`fusion_seg.checks.memory_problem`), naming the option: a typo such
as ``--crop 100000x100000`` or ``--views 1000000000`` is a one-line error, not an allocation that the
kernel kills. They count a lower bound of what extraction holds at once, so that no setting that could
run is refused (Cityscapes' 1024x2048 views in batches of 8 need a few GiB).
"""
from __future__ import annotations

import contextlib

import torch

from fusion_seg.cache.codecs import DEFAULT_CODEC, DEFAULT_DTYPE, check_dtype, codec_spec
from fusion_seg.cache.store import VIEW_FIELDS, CacheSpec, FeatureStore
from fusion_seg.checks import memory_problem
from fusion_seg.data.datasets.base import SegDataset
from fusion_seg.data.transforms import resized_shape
from fusion_seg.data.views import stack_groups
from fusion_seg.requests import Augment, Resize
from fusion_seg.device import to_device
from fusion_seg.encoder.build import FrozenEncoder
from fusion_seg.errors import DataError, Failed, UserError, write_error
from fusion_seg.shapes import ShapeSpec

SKIP_HINT = "(or pass --skip-bad to skip bad samples and go on)"
RESUME = "The views already written are kept: re-run the same command to extract the rest."


def store_write_error(path, exc: OSError) -> UserError:
    """The one-line error of a failed read or write of the store at ``path``: why, the fix, and what is kept."""
    return write_error(path, exc, what="the feature store", then=RESUME)


@contextlib.contextmanager
def store_writes(path):
    """The store's own reads and writes: an OSError (a full or read-only disk, a lost permission) is raised as
    :func:`store_write_error`. Only around store calls: an OSError elsewhere is not the store's."""
    try:
        yield
    except OSError as exc:
        raise store_write_error(path, exc) from None


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



def check_view_count(images: int, views: int) -> None:
    """Refuse more views than their completion records (the ``views`` array, read whole to resume) fit in memory."""
    n = images * views
    problem = memory_problem(n * len(VIEW_FIELDS) * 8)
    if problem:
        raise UserError(f"--views {views} of {images} images is {n} views, whose records alone need {problem}. "
                        "Pass fewer --views, or use fewer images (e.g. --dataset-opt num_images=N for synthetic, "
                        "limit=N for the file datasets).")


def check_view_size(shapes: dict[str, ShapeSpec], label_shape: tuple[int, int], augment: Augment, resize: Resize, *,
                    batch_size: int, num_views: int, dtype: str) -> None:
    """Refuse views, or batches of them, too large for this machine's memory (UserError naming the option).

    ``shapes`` are the encoder's feature maps and ``label_shape`` the stored views' size. A view of H x W
    holds at least its float32 input and uint8 labels (13 bytes a pixel) and its feature maps as they come
    back to the host; a batch holds ``batch_size`` views (or every view, when there are fewer). With
    augmentation and ``--short-side``/``--size``, each image is first resized whole (RGB and mask).
    """
    h, w = label_shape
    host = 2 if dtype == "float16" else 4  # the dtype encode_batch brings the features back in
    per_view = 13 * h * w + sum(s.channels * (h // s.stride) * (w // s.stride) * host for s in shapes.values())
    if augment.enabled and (resize.size or resize.short_side):
        option = f"--size {resize.size[0]}x{resize.size[1]}" if resize.size else f"--short-side {resize.short_side}"
        rh, rw = resize.size or (resize.short_side, resize.short_side)  # a short side: at least a square
        problem = memory_problem(4 * rh * rw)
        if problem:
            raise UserError(f"{option}: each image resized to it (RGB and mask) needs {problem}. Pass a smaller "
                            f"{option.split()[0]}.")
    if augment.enabled:
        source, fix = f"--crop {h}x{w}", "Pass a smaller --crop"
    elif resize.size:
        source, fix = f"--size {h}x{w}", "Pass a smaller --size"
    elif resize.short_side:
        source, fix = f"--short-side {resize.short_side} (views up to {h}x{w})", "Pass a smaller --short-side"
    else:
        source, fix = f"the largest image, {h}x{w}", "Pass --short-side or --size to resize the images"
    problem = memory_problem(per_view)
    if problem:
        raise UserError(f"{source}: one view of that size (its input and features) needs {problem}. {fix}.")
    batch = min(batch_size, num_views)
    problem = memory_problem(batch * per_view)
    if problem:
        raise UserError(f"--batch-size {batch_size}: a batch of {batch} views of {h}x{w} (inputs and features) "
                        f"needs {problem}. Pass a smaller --batch-size (each view needs {per_view / 2**30:.2f} GiB).")


def feature_shapes_for(encoder: FrozenEncoder, hw: tuple[int, int]) -> dict[str, list[int]]:
    """Shapes of every feature map for an input of size ``hw`` (one probe forward)."""
    probe = encoder(torch.zeros(1, 3, *hw))
    return {name: list(t.shape[1:]) for name, t in probe.items()}



def build_spec(dataset: SegDataset, encoder: FrozenEncoder, views: int, augment: Augment, resize: Resize,
               label_shape: tuple[int, int], dtype: str = DEFAULT_DTYPE,
               codec: str | dict = DEFAULT_CODEC) -> CacheSpec:
    """The spec of the store of ``views`` views per image of ``dataset`` (``label_shape``: see
    :func:`label_shape_for`); one probe forward of ``encoder`` gives the feature maps' shapes."""
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



def encode_batch(encoder: FrozenEncoder, device: torch.device, items: list, dtype: str, write,
                 lock=None, batch_size: int = 2) -> list[Failed]:
    """Encode a batch of views and hand each to ``write(v, features, labels, meta)``.

    Items of equal image size run as one forward (under ``lock``, when given); the
    features go to the host in the dtype the store encodes from. Returns the items
    that could not be made (:class:`Failed`), for the caller to raise or skip.

    With ``batch_size >= 2`` a lone image (the last partial batch, a resumed or repaired
    view, a whole image of its own size) runs beside a zero image: CPU convolutions take
    another code path for a batch of one, and its features differed from the same view's
    in a batch in the last fp16 bit (s32 of ResNet-18/50 here). With this, a view's bytes
    do not depend on which views it was batched with (measured: batches of 2 and 4 in
    any order agree bit for bit), so a resumed store equals an uninterrupted one.
    """
    host = torch.float16 if dtype == "float16" else torch.float32  # bf16/uint8 round from fp32
    for group in stack_groups([it for it in items if not isinstance(it, Failed)]):
        images = torch.stack([it["image"] for it in group])
        if len(group) == 1 and batch_size >= 2:
            images = torch.cat([images, torch.zeros_like(images)])
        images = to_device(images, device)
        with lock or contextlib.nullcontext():  # the encoder runs in its own precision (FrozenEncoder)
            feats = {k: t.to(host).cpu().numpy() for k, t in encoder(images).items()}
        for j, it in enumerate(group):
            write(it["index"], {k: a[j] for k, a in feats.items()}, it["labels"].numpy(), it["meta"])
    return [it for it in items if isinstance(it, Failed)]



def handle_failed(store: FeatureStore, failed: list[Failed], skip_bad: bool, skipped: list[dict]) -> None:
    """Raise the first unreadable sample's error, or (``skip_bad``) mark each skipped and list why."""
    for bad in failed:
        if not skip_bad:
            raise type(bad.error)(f"{bad.error} {SKIP_HINT}")
        store.mark_skipped(bad.index, bad.info["image_index"], bad.info["view_index"])
        skipped.append({"view": bad.index, **bad.info, "error": str(bad.error)})

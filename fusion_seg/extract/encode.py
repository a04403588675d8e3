"""What local and dask extraction share: the store's spec for a dataset and encoder, one encoder
forward over a batch of views, and the ``--skip-bad`` policy for views that failed to load."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from fusion_seg.cache.codecs import DEFAULT_CODEC, DEFAULT_DTYPE, check_dtype, codec_spec
from fusion_seg.cache.store import CacheSpec, FeatureStore
from fusion_seg.data.datasets.base import SegDataset
from fusion_seg.data.transforms import resized_shape
from fusion_seg.data.views import Augment, Resize, stack_groups
from fusion_seg.device import autocast, to_device
from fusion_seg.encoder.build import FrozenEncoder
from fusion_seg.errors import DataError, Failed

SKIP_HINT = "(or pass --skip-bad to skip bad samples and go on)"


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
        with lock or nullcontext(), autocast(device):
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

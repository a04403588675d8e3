"""Views: the training samples that extraction stores and online training makes on the fly.

View ``k`` of image ``i`` is made exactly as HRNet makes a training sample (random
scale, padded random crop, random flip), with randomness drawn only from
``view_rng(seed, i, k)``; with photometric augmentation, first a photometric draw (mmseg's
PhotoMetricDistortion) from its own stream ``photometric_rng(seed, i, k)``. A view is therefore
reproducible from its index alone, whatever the order, the process or the machine that makes it: this is what makes
extraction resumable and distributable with bit-identical results.
"""
from __future__ import annotations

import numpy as np
import torch

from fusion_seg.data.datasets.base import SegDataset
from fusion_seg.errors import Failed, UserError
from fusion_seg.data.transforms import (hrnet_train_view, photometric_distortion, photometric_rng, resize_pair,
                                        to_tensor, view_rng)


class ViewSource(torch.utils.data.Dataset):
    """``len(dataset) * views_per_image`` views; item ``v`` is view ``v % K`` of image ``v // K``.

    ``augment`` and ``resize`` are the requests :class:`fusion_seg.requests.Augment` and
    :class:`fusion_seg.requests.Resize` (not imported here: the requests sit above ``data/``).
    ``view_offset`` shifts the view index used for randomness: online training sets it
    to the epoch, so that every epoch draws a fresh augmentation.
    """

    def __init__(self, dataset: SegDataset, views_per_image: int, augment, resize,
                 mean, std, view_offset: int = 0):
        self.dataset = dataset
        self.views_per_image = views_per_image
        self.augment = augment
        self.resize = resize
        self.mean, self.std = mean, std
        self.view_offset = view_offset

    def __len__(self) -> int:
        return len(self.dataset) * self.views_per_image

    def __getitem__(self, v: int) -> dict | Failed:
        i, k = divmod(v, self.views_per_image)
        try:
            sample = self.dataset[i]
        except UserError as exc:
            return Failed(v, exc, image_index=i, view_index=k, image_id=self.dataset.ids[i])
        mask = sample.mask
        if mask is None:
            mask = np.full(sample.image.shape[:2], self.dataset.ignore_index, np.uint8)
        image, mask = resize_pair(sample.image, mask, short_side=self.resize.short_side, size=self.resize.size)
        resized_hw = image.shape[:2]
        scale, flip = 1.0, False
        photometric = self.augment.photometric
        if photometric is not None:  # before the crop: the crop's padding stays the padding
            image = photometric_distortion(image, photometric_rng(self.augment.seed, i, k + self.view_offset),
                                           **photometric.to_json())
        if self.augment.enabled:
            rng = view_rng(self.augment.seed, i, k + self.view_offset)
            image, mask, m = hrnet_train_view(
                image, mask, rng, crop=tuple(self.augment.crop), scale_range=tuple(self.augment.scale_range),
                flip=self.augment.flip, ignore_index=self.dataset.ignore_index,
            )
            scale, flip, resized_hw = m["scale"], m["flip"], m["resized_hw"]
        meta = {
            "image_index": i, "view_index": k, "scale": scale, "flip": flip,
            "resized_h": resized_hw[0], "resized_w": resized_hw[1],
            "valid_h": image.shape[0], "valid_w": image.shape[1], "seed": self.augment.seed,
        }
        return {"index": v, "image": to_tensor(image, self.mean, self.std),
                "labels": torch.from_numpy(np.require(mask, requirements=("C", "W"))), "meta": meta}


def collate_list(items: list[dict]) -> list[dict]:
    """Keep items as a list: whole images may differ in size; the consumer groups equal sizes."""
    return items


def stack_groups(items: list[dict]) -> list[list[dict]]:
    """Split consecutive items into runs of equal image size, so each run is one batched forward."""
    groups: list[list[dict]] = []
    for item in items:
        if groups and groups[-1][0]["image"].shape == item["image"].shape:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups

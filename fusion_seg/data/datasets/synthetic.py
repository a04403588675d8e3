"""The embedded default dataset: coloured, textured shapes on a grey background.

No files: every sample is drawn in ``__getitem__`` from ``(seed, split,
index)``, so it is identical on every machine and costs a few milliseconds.
Each class has its own colour family *and* texture (reddish grainy disks,
green striped boxes, blue checkered triangles, low-saturation smooth
background), and shapes are large (about 40-100 px on a 192 px image), so a
small decoder on features of even a randomly initialised backbone can learn
it; shapes may overlap, the later one on top.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from fusion_seg.checks import seed_problem
from fusion_seg.errors import DataError
from fusion_seg.data.datasets.base import SegDataset, SegSample, register_dataset

CLASSES = ("background", "disk", "box", "triangle")
PALETTE = np.array([[0, 0, 0], [220, 40, 40], [40, 200, 40], [40, 60, 220]], dtype=np.uint8)
SPLITS = ("train", "val", "test")
DEFAULT_NUM_IMAGES = {"train": 48, "val": 16, "test": 16}


@register_dataset("synthetic")
class SyntheticDataset(SegDataset):
    """Deterministic generated shapes; ``root`` is accepted for a uniform interface and ignored."""

    def __init__(self, split: str = "train", num_images: int | None = None,
                 size: tuple[int, int] = (192, 192), seed: int = 0, *, root=None):
        if split not in SPLITS:
            raise DataError(f"synthetic has no split {split!r}; choose one of: {', '.join(SPLITS)}.")
        num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else int(num_images)
        h, w = (int(v) for v in size)
        if num_images < 1:
            raise DataError(f"synthetic num_images must be at least 1, got {num_images}.")
        if seed_problem(seed):
            raise DataError(f"synthetic seed {seed!r} {seed_problem(seed)}; pass e.g. --dataset-opt seed=0.")
        if min(h, w) < 32:
            raise DataError(f"synthetic size must be at least 32x32 (H, W), got {tuple(size)}.")
        super().__init__(split=split, classes=CLASSES, palette=PALETTE,
                         options={"num_images": num_images, "size": [h, w], "seed": int(seed)})
        self._num_images = num_images
        self._size = (h, w)
        self._seed = int(seed)
        self._yy, self._xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def __len__(self) -> int:
        return self._num_images

    @property
    def ids(self) -> list[str]:
        return [f"{self.split}-{i:05d}" for i in range(self._num_images)]

    def image_size(self, i: int) -> tuple[int, int]:
        return self._size

    def _load(self, i: int) -> SegSample:
        rng = np.random.default_rng([self._seed, SPLITS.index(self.split), i])
        image, mask = _render(rng, self._yy, self._xx)
        return SegSample(image=image, mask=mask, id=f"{self.split}-{i:05d}")


def _render(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image and its mask; all randomness comes from ``rng``."""
    h, w = yy.shape
    unit = min(h, w) / 192.0  # shape sizes are specified for a 192 px image
    image = _background(rng, yy, xx)
    mask = np.zeros((h, w), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(CLASSES)))
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        region = _SHAPES[cls](rng, yy - cy, xx - cx, unit)
        image[region] = _TEXTURES[cls](rng, yy, xx, unit)[region]
        mask[region] = cls
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _background(rng, yy, xx) -> np.ndarray:
    """Low-saturation grey: smooth noise plus a gradient plus fine grain, slightly tinted."""
    h, w = yy.shape
    coarse = rng.normal(0.0, 25.0, size=(5, 5)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
    gy, gx = rng.uniform(-30, 30, size=2)
    luma = rng.uniform(80, 170) + smooth + gy * (yy / h - 0.5) + gx * (xx / w - 0.5)
    luma = luma + rng.normal(0.0, 5.0, size=(h, w))
    tint = rng.uniform(-12, 12, size=3)
    return luma[:, :, None] + tint


def _disk(rng, dy, dx, unit):
    radius = rng.uniform(20, 50) * unit
    return dy * dy + dx * dx <= radius * radius


def _box(rng, dy, dx, unit):
    half_h, half_w = rng.uniform(20, 50, size=2) * unit
    angle = rng.uniform(0, np.pi / 2)
    c, s = np.cos(angle), np.sin(angle)
    return (np.abs(dx * c + dy * s) <= half_w) & (np.abs(dy * c - dx * s) <= half_h)


def _triangle(rng, dy, dx, unit):
    radius = rng.uniform(34, 62) * unit  # circumradius: sides of roughly 60-105 px
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.25, 0.25, size=3)
    vy, vx = radius * np.sin(angles), radius * np.cos(angles)
    inside = np.ones(dy.shape, dtype=bool)
    for k in range(3):  # counter-clockwise vertices: inside = left of every edge
        ay, ax, by, bx = vy[k], vx[k], vy[(k + 1) % 3], vx[(k + 1) % 3]
        inside &= (bx - ax) * (dy - ay) - (by - ay) * (dx - ax) >= 0
    return inside


def _grainy_red(rng, yy, xx, unit):
    base = np.array([rng.uniform(170, 235), rng.uniform(20, 70), rng.uniform(20, 70)])
    return base + rng.normal(0.0, 18.0, size=yy.shape + (3,))


def _striped_green(rng, yy, xx, unit):
    base = np.array([rng.uniform(20, 70), rng.uniform(150, 215), rng.uniform(20, 80)])
    period, angle = rng.uniform(6, 12) * unit, rng.uniform(0, np.pi)
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
    return base + 30.0 * np.sign(np.sin(2 * np.pi * phase))[:, :, None]


def _checkered_blue(rng, yy, xx, unit):
    base = np.array([rng.uniform(20, 70), rng.uniform(40, 100), rng.uniform(170, 225)])
    cell = rng.uniform(6, 12) * unit
    checker = (np.floor(yy / cell) + np.floor(xx / cell)) % 2 * 2 - 1
    return base + 30.0 * checker[:, :, None]


_SHAPES = {1: _disk, 2: _box, 3: _triangle}
_TEXTURES = {1: _grainy_red, 2: _striped_green, 3: _checkered_blue}

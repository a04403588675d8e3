"""Image/mask geometry and normalisation.

:func:`hrnet_train_view` makes a training view the way HRNet's
``BaseDataset.gen_sample`` does (random scale, pad, random crop, random
flip); :func:`view_rng` gives each view its own random stream so that a view
depends only on ``(seed, image_index, view_index)``. Images are resized
bilinearly, masks with nearest neighbour so no new label values appear.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _resize(array: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    if array.shape[:2] == tuple(hw):
        return array
    resized = Image.fromarray(array).resize((int(hw[1]), int(hw[0])), resample=resample)
    return np.asarray(resized)


def resized_shape(hw: tuple[int, int], *, short_side: int | None = None,
                  size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``(H, W)`` that :func:`resize_pair` produces for an input of ``hw``, without pixels.

    ``size`` is the target ``(H, W)``; ``short_side`` scales so the shorter
    side has that length, keeping the aspect ratio; with neither, ``hw``.
    Giving both is an error.
    """
    if short_side is not None and size is not None:
        raise ValueError("give either short_side or size, not both")
    if size is not None:
        return int(size[0]), int(size[1])
    h, w = int(hw[0]), int(hw[1])
    if short_side is None:
        return h, w
    s = short_side / min(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def resize_pair(image: np.ndarray, mask: np.ndarray | None, *, short_side: int | None = None,
                size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an image (bilinear) and its mask (nearest) together to :func:`resized_shape`.

    With neither ``short_side`` nor ``size`` the pair is returned unchanged.
    """
    size = resized_shape(image.shape[:2], short_side=short_side, size=size)
    image = _resize(image, size, Image.BILINEAR)
    if mask is not None:
        mask = _resize(mask, size, Image.NEAREST)
    return image, mask


def hrnet_train_view(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, *,
                     crop: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                     flip: bool = True, ignore_index: int = 255,
                     pad_image_value: tuple[int, int, int] = (124, 116, 104)):
    """One random training view: scale, pad to ``crop``, random crop, random horizontal flip.

    Random draws, always in this order: scale ``s ~ U(scale_range)``, crop
    top ``y0``, crop left ``x0``, then (if ``flip``) the flip coin. The image is
    padded bottom/right with ``pad_image_value`` (the ImageNet mean, which
    normalises to ~0) and the mask with ``ignore_index``.

    Returns ``(image, mask, meta)`` with ``meta = {"scale", "flip",
    "resized_hw": [h, w] (scaled, before padding), "crop_box": [y0, x0, h, w]
    (in the padded scaled image)}``. ``mask`` may be None (then None is returned).
    """
    crop_h, crop_w = int(crop[0]), int(crop[1])
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if crop_h <= 0 or crop_w <= 0:
        raise ValueError(f"crop must be positive, got {crop}")
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")

    scale = float(rng.uniform(lo, hi))
    h, w = image.shape[:2]
    resized_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    image, mask = resize_pair(image, mask, size=resized_hw)

    pad_h, pad_w = max(crop_h, resized_hw[0]), max(crop_w, resized_hw[1])
    if (pad_h, pad_w) != resized_hw:
        padded = np.empty((pad_h, pad_w, 3), dtype=np.uint8)
        padded[:] = np.asarray(pad_image_value, dtype=np.uint8)
        padded[: resized_hw[0], : resized_hw[1]] = image
        image = padded
        if mask is not None:
            padded_mask = np.full((pad_h, pad_w), ignore_index, dtype=np.uint8)
            padded_mask[: resized_hw[0], : resized_hw[1]] = mask
            mask = padded_mask

    y0 = int(rng.integers(0, pad_h - crop_h + 1))
    x0 = int(rng.integers(0, pad_w - crop_w + 1))
    image = image[y0 : y0 + crop_h, x0 : x0 + crop_w]
    if mask is not None:
        mask = mask[y0 : y0 + crop_h, x0 : x0 + crop_w]

    flipped = bool(flip and rng.random() < 0.5)
    if flipped:
        image = image[:, ::-1]
        if mask is not None:
            mask = mask[:, ::-1]

    meta = {"scale": scale, "flip": flipped, "resized_hw": [int(resized_hw[0]), int(resized_hw[1])],
            "crop_box": [y0, x0, crop_h, crop_w]}
    image = np.ascontiguousarray(image)
    mask = None if mask is None else np.ascontiguousarray(mask)
    return image, mask, meta


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, *, brightness: float,
                           contrast: tuple[float, float], saturation: tuple[float, float], hue: float,
                           blur: float) -> np.ndarray:
    """mmsegmentation's ``PhotoMetricDistortion`` on an RGB uint8 image, with an optional Gaussian blur.

    In mmseg's order, each step with probability 1/2: brightness (add a delta uniform in
    ``[-brightness, brightness]`` pixel values), contrast (multiply by a factor uniform in ``contrast``) either
    first or last, then in HSV saturation (multiply S by a factor in ``saturation``) and hue (rotate H by up to
    ``hue`` degrees; mmseg's ``hue_delta=18`` on OpenCV's 0-180 scale is 36 degrees). Then, with probability
    ``blur``, a Gaussian blur of sigma uniform in [0.1, 2.0]. Values are clipped to 0..255 after each step; the
    HSV steps go through uint8 HSV (PIL's; mmseg's through OpenCV's), which rounds by a few levels.
    Draws come from ``rng`` alone, a fixed number of them whatever is applied, so a view's photometric draw
    depends only on its stream.
    """
    from PIL import Image, ImageFilter

    draws = rng.random(8)  # apply brightness, contrast-first, contrast, saturation, hue, blur; two spares
    amounts = rng.random(5)  # the amount of each: brightness, contrast, saturation, hue, blur sigma
    out = image.astype(np.float32)
    if draws[0] < 0.5:
        out = np.clip(out + (2 * amounts[0] - 1) * brightness, 0, 255)
    contrast_factor = contrast[0] + amounts[1] * (contrast[1] - contrast[0])
    contrast_first, apply_contrast = draws[1] < 0.5, draws[2] < 0.5
    if apply_contrast and contrast_first:
        out = np.clip(out * contrast_factor, 0, 255)
    if draws[3] < 0.5 or draws[4] < 0.5:
        hsv = np.asarray(Image.fromarray(out.round().astype(np.uint8)).convert("HSV")).astype(np.float32)
        if draws[3] < 0.5:
            hsv[..., 1] = np.clip(hsv[..., 1] * (saturation[0] + amounts[2] * (saturation[1] - saturation[0])), 0, 255)
        if draws[4] < 0.5:
            hsv[..., 0] = np.mod(hsv[..., 0] + (2 * amounts[3] - 1) * hue * 256 / 360, 256)  # PIL's H: 0..255
        rgb = Image.fromarray(np.floor(hsv).astype(np.uint8), mode="HSV").convert("RGB")
        out = np.asarray(rgb).astype(np.float32)
    if apply_contrast and not contrast_first:
        out = np.clip(out * contrast_factor, 0, 255)
    out = out.round().astype(np.uint8)
    if draws[5] < blur:
        sigma = float(0.1 + amounts[4] * 1.9)
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=sigma)))
    return np.ascontiguousarray(out)


def photometric_rng(seed: int, image_index: int, view_index: int) -> np.random.Generator:
    """The photometric draw's own stream for one view: another stream than :func:`view_rng`'s, so that turning
    photometric augmentation on leaves every view's scale, crop and flip as they were."""
    return np.random.default_rng([int(seed), int(image_index), int(view_index), 1])


def view_rng(seed: int, image_index: int, view_index: int) -> np.random.Generator:
    """The random stream of one view, a function of ``(seed, image_index, view_index)`` only.

    Independent of processing order, so extraction can be resumed or split
    across workers and still produce identical views.
    """
    return np.random.default_rng([int(seed), int(image_index), int(view_index)])


def to_tensor(image: np.ndarray, mean, std) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 ``(image / 255 - mean) / std``.

    ``mean`` and ``std`` are per-channel values in 0..1 (timm's convention).
    """
    tensor = torch.from_numpy(np.require(image, requirements=('C', 'W'))).permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((tensor - mean_t) / std_t).contiguous()

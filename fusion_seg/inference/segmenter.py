"""A segmentation model is a composition: frozen encoder, decoder, upsample (torchvision style).

``load_segmenter`` rebuilds one from a checkpoint: the encoder from the identity the checkpoint
records (and checked against it, so a decoder never runs on another encoder's features)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.data.io import default_palette
from fusion_seg.data.transforms import resize_pair, to_tensor
from fusion_seg.decoders import decoder_from_record
from fusion_seg.decoders.base import upsample_logits
from fusion_seg.device import autocast, resolve_device, to_device
from fusion_seg.encoder.build import FrozenEncoder, rebuild_encoder
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import UserError
from fusion_seg.inference.sliding_window import sliding_window_logits


class Segmenter(nn.Module):
    """Image in, logits at image size out."""

    def __init__(self, encoder: FrozenEncoder, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        return upsample_logits(self.decoder(features), images.shape[-2:])


def load_segmenter(checkpoint: str | Path, *, weights: str | None = None, device: str = "auto"):
    """(Segmenter on device, checkpoint dict)."""
    ckpt = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    decoder = decoder_from_record(ckpt["decoder"])
    decoder.load_state_dict(ckpt["model"])
    encoder = rebuild_encoder(EncoderIdentity.from_checkpoint(ckpt), weights_file=weights)
    model = Segmenter(encoder, decoder).to(dev).eval()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


@torch.inference_mode()
def predict_logits(model: Segmenter, image: np.ndarray, ckpt: dict, *, sliding_window: bool = False,
                   out_size: tuple[int, int] | None = None, flip: bool = False,
                   scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:
    """Logits (1, C, H, W) for one RGB image, resized as in training, returned at ``out_size``.

    Test-time augmentation as in the HRNet and mmsegmentation evaluations: each of ``scales``
    resizes the (training-resized) image by that factor, ``flip`` adds its horizontal mirror
    (whose logits are mirrored back), and the logits of every pass, each upsampled to the
    image, are averaged. ``flip=False, scales=(1.0,)`` is the single plain pass.
    """
    resize = ckpt["data"].get("resize") or {}
    size = tuple(resize["size"]) if resize.get("size") else None
    resized, _ = resize_pair(image, None, short_side=resize.get("short_side"), size=size)
    identity = model.encoder.identity
    device = next(model.decoder.parameters()).device
    x = to_device(to_tensor(resized, identity.mean, identity.std).unsqueeze(0), device)
    base = tuple(x.shape[-2:])
    total, passes = None, 0
    for scale in scales:
        scaled = x if scale == 1.0 else F.interpolate(
            x, size=(max(1, round(base[0] * scale)), max(1, round(base[1] * scale))), mode="bilinear",
            align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            inp = scaled.flip(-1) if mirrored else scaled
            logits = _forward(model, inp, ckpt, sliding_window, device)
            logits = upsample_logits(logits.flip(-1) if mirrored else logits, base)
            total = logits if total is None else total + logits
            passes += 1
    return upsample_logits(total / passes, out_size or image.shape[:2])


def _forward(model: Segmenter, x: torch.Tensor, ckpt: dict, sliding_window: bool, device) -> torch.Tensor:
    """One pass: the whole image, or HRNet's sliding window when it is larger than the training crop."""
    with autocast(device):
        crop = train_crop(ckpt)
        if sliding_window and crop and (x.shape[-2] > crop[0] or x.shape[-1] > crop[1]):
            logits = sliding_window_logits(model, x, crop, ckpt["decoder"]["num_classes"])
        else:
            logits = model(x)
    return logits.float()


def train_crop(ckpt: dict) -> tuple[int, int] | None:
    data = ckpt["data"]
    crop = data.get("crop") or (data.get("augment") or {}).get("crop")
    return tuple(crop) if crop else None


def checkpoint_palette(ckpt: dict) -> np.ndarray:
    return default_palette(len(ckpt["classes"]))


class SegmentationModel:
    """A trained checkpoint as a model for notebooks: an image in, a mask out (see :func:`load_model`).

    ``image`` is an RGB ``numpy`` array ``(H, W, 3)`` of uint8, or a PIL image (converted to RGB).
    It is resized as the training data was, and the logits come back at the image's size.
    ``predict`` and ``evaluate`` (and so ``fusion-seg predict``/``evaluate``) run through this class.
    """

    def __init__(self, segmenter: Segmenter, checkpoint: dict):
        self.segmenter = segmenter
        self.checkpoint = checkpoint
        self.classes: list[str] = list(checkpoint["classes"])
        self.palette = checkpoint_palette(checkpoint)

    @property
    def device(self) -> torch.device:
        return next(self.segmenter.decoder.parameters()).device

    def logits(self, image, *, flip: bool = False, scales: tuple[float, ...] = (1.0,), sliding_window: bool = False,
               out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(1, C, H, W)`` float logits at ``out_size`` (default: the image's size); ``flip`` and ``scales``
        are test-time augmentation (:func:`predict_logits`)."""
        return predict_logits(self.segmenter, as_rgb_array(image), self.checkpoint, sliding_window=sliding_window,
                              out_size=out_size, flip=flip, scales=scales)

    def predict(self, image, **options) -> np.ndarray:
        """``(H, W)`` uint8 class indices (``self.classes``) of ``image``; ``options`` as :meth:`logits`."""
        return self.logits(image, **options).argmax(1)[0].cpu().numpy().astype(np.uint8)


def as_rgb_array(image) -> np.ndarray:
    """An RGB uint8 ``(H, W, 3)`` array from a PIL image or a numpy array (refused with the fix otherwise)."""
    if not isinstance(image, np.ndarray):
        convert = getattr(image, "convert", None)
        if convert is None:
            raise UserError(f"expected an RGB image as a numpy array (H, W, 3) or a PIL image, got "
                            f"{type(image).__name__}; load it with PIL.Image.open(path).")
        image = np.asarray(convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UserError(f"expected an RGB image of shape (H, W, 3) and dtype uint8, got shape {image.shape} and "
                        f"dtype {image.dtype}; convert it, e.g. np.asarray(PIL.Image.open(path).convert('RGB')).")
    return image


def load_model(checkpoint: str | Path, *, weights: str | None = None, device: str = "auto") -> SegmentationModel:
    """The checkpoint as a :class:`SegmentationModel`: its encoder rebuilt from the identity it records
    (``weights``: the encoder's weights file, when the checkpoint was trained on one)."""
    return SegmentationModel(*load_segmenter(checkpoint, weights=weights, device=device))

"""A segmentation model is a composition: frozen encoder, decoder, upsample (torchvision style).

``load_segmenter`` rebuilds one from a checkpoint: the encoder from the identity the checkpoint
records (and checked against it, so a decoder never runs on another encoder's features)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.data.io import default_palette
from fusion_seg.data.transforms import resize_pair, to_tensor
from fusion_seg.decoders import decoder_from_record
from fusion_seg.decoders.base import upsample_logits
from fusion_seg.device import autocast, resolve_device, resolve_precision, to_device
from fusion_seg.encoder.build import FrozenEncoder, rebuild_encoder
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import UserError
from fusion_seg.inference import arguments
from fusion_seg.inference.sliding_window import PROGRESS_WINDOWS, sliding_window_logits, window_grid
from fusion_seg.progress import Progress


class Segmenter(nn.Module):
    """Image in, logits at image size out: the torch backend. The onnxruntime backend
    (:class:`~fusion_seg.inference.onnx_runtime.OnnxSegmenter`) has the same three members that inference
    uses: called on a normalised ``(N, 3, H, W)`` batch it returns the logits at its size, ``identity`` (the
    encoder's, for the normalisation) and ``device``. The forward runs in the encoder's precision (fp32, or bf16
    autocast: ``--precision``)."""

    def __init__(self, encoder: FrozenEncoder, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @property
    def identity(self) -> EncoderIdentity:
        return self.encoder.identity

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        with autocast(images.device, self.identity.precision):
            logits = self.decoder(features)
        return upsample_logits(logits, images.shape[-2:])


def load_segmenter(checkpoint: str | Path, *, weights: str | None = None, device: str = "auto",
                   precision: str = "auto"):
    """(Segmenter on device running in ``precision``, checkpoint dict)."""
    ckpt = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    decoder = decoder_from_record(ckpt["decoder"])
    decoder.load_state_dict(ckpt["model"])
    encoder = rebuild_encoder(EncoderIdentity.from_checkpoint(ckpt), weights_file=weights)
    encoder.with_precision(resolve_precision(dev, precision))
    model = Segmenter(encoder, decoder).to(dev).eval()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


# The most pixels an image may have at any test-time scale: what Pillow reads at most (a larger file is refused as
# a decompression bomb), so that a scale of 4 on a huge image is refused instead of allocating many GiB blindly.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


@torch.inference_mode()
def predict_logits(model: Segmenter, image: np.ndarray, ckpt: dict, *, sliding_window: bool = False,
                   out_size: tuple[int, int] | None = None, flip: bool = False,
                   scales: tuple[float, ...] = (1.0,), progress: bool = False) -> torch.Tensor:
    """Logits (1, C, H, W) for one RGB image, resized as in training, returned at ``out_size``.

    Test-time augmentation as in the HRNet and mmsegmentation evaluations: each of ``scales``
    resizes the (training-resized) image by that factor, ``flip`` adds its horizontal mirror
    (whose logits are mirrored back), and the logits of every pass, each upsampled to the
    image, are averaged. ``flip=False, scales=(1.0,)`` is the single plain pass; a scale that
    makes the image larger than :data:`MAX_PIXELS` is refused before anything is allocated. With
    ``progress``, a sliding window over many windows (:data:`PROGRESS_WINDOWS`, all passes
    together) shows a :class:`~fusion_seg.progress.Progress` over them. The logits are float32 whatever
    the model's precision.
    """
    resize = ckpt["data"].get("resize") or {}
    size = tuple(resize["size"]) if resize.get("size") else None
    resized, _ = resize_pair(image, None, short_side=resize.get("short_side"), size=size)
    base = tuple(resized.shape[:2])
    sizes = [base if scale == 1.0 else (max(1, round(base[0] * scale)), max(1, round(base[1] * scale)))
             for scale in scales]
    for scale, (h, w) in zip(scales, sizes):
        if MAX_PIXELS and h * w > MAX_PIXELS:
            raise UserError(f"the {base[1]}x{base[0]} image at scale {scale:g} is {w}x{h} ({h * w / 1e6:,.0f} M "
                            f"pixels), more than the {MAX_PIXELS / 1e6:,.0f} M pixels of the largest image fusion-seg "
                            "reads; pass smaller scales, or a smaller image.")
    identity, device = model.identity, model.device
    x = to_device(to_tensor(resized, identity.mean, identity.std).unsqueeze(0), device)
    crop = train_crop(ckpt) if sliding_window else None
    tiled = [crop is not None and (h > crop[0] or w > crop[1]) for h, w in sizes]
    windows = (2 if flip else 1) * sum(math.prod(map(len, window_grid(h, w, crop)))
                                       for (h, w), tile in zip(sizes, tiled) if tile)
    total, passes = None, 0
    with Progress(windows, "sliding window", "window", enabled=progress and windows >= PROGRESS_WINDOWS) as bar:
        for hw, tile in zip(sizes, tiled):
            scaled = x if hw == base else F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
            for mirrored in ((False, True) if flip else (False,)):
                inp = scaled.flip(-1) if mirrored else scaled
                logits = _forward(model, inp, crop if tile else None, ckpt["decoder"]["num_classes"], bar)
                logits = upsample_logits(logits.flip(-1) if mirrored else logits, base)
                total = logits if total is None else total + logits
                passes += 1
    return upsample_logits(total / passes, out_size or image.shape[:2])


def _forward(model: Segmenter, x: torch.Tensor, crop: tuple[int, int] | None, num_classes: int,
             bar: Progress) -> torch.Tensor:
    """One pass: the whole image, or HRNet's sliding window of ``crop`` (the training crop, given when the image
    is larger than it)."""
    logits = model(x) if crop is None else sliding_window_logits(model, x, crop, num_classes, progress=bar)
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
        return self.segmenter.device

    def logits(self, image, *, flip: bool = False, scales: tuple[float, ...] = (1.0,), sliding_window: bool = False,
               out_size: tuple[int, int] | None = None, progress: bool = False) -> torch.Tensor:
        """``(1, C, H, W)`` float logits at ``out_size`` (default: the image's size); ``flip`` and ``scales``
        are test-time augmentation, ``progress`` shows a long sliding window's (:func:`predict_logits`).

        The arguments are checked as the command line checks its options (scales in (0, 4], ...): a bad
        one is a :class:`UserError` that says what to pass."""
        return predict_logits(self.segmenter, as_rgb_array(image), self.checkpoint,
                              sliding_window=arguments.flag("sliding_window", sliding_window),
                              out_size=arguments.out_size(out_size), flip=arguments.flag("flip", flip),
                              scales=arguments.scales(scales), progress=arguments.flag("progress", progress))

    def predict(self, image, **options) -> np.ndarray:
        """``(H, W)`` uint8 class indices (``self.classes``) of ``image``; ``options`` as :meth:`logits`."""
        return self.logits(image, **options).argmax(1)[0].cpu().numpy().astype(np.uint8)


def as_rgb_array(image) -> np.ndarray:
    """An RGB uint8 ``(H, W, 3)`` array of at least one pixel from a PIL image or a numpy array (refused with
    the fix otherwise: a file's path says how to load it)."""
    if isinstance(image, (str, Path)):
        raise UserError(f"image {str(image)!r} is a path, not an RGB image: load it with PIL.Image.open(path), or "
                        "pass the path to fusion_seg.predict(checkpoint, inputs=path, out=folder), which writes "
                        "the masks.")
    if not isinstance(image, np.ndarray):
        convert = getattr(image, "convert", None)
        if convert is None:
            raise UserError(f"expected an RGB image as a numpy array (H, W, 3) or a PIL image, got "
                            f"{type(image).__name__}; load it with PIL.Image.open(path).")
        image = np.asarray(convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise UserError(f"expected an RGB image of shape (H, W, 3) and dtype uint8, got shape {image.shape} and "
                        f"dtype {image.dtype}; convert it, e.g. np.asarray(PIL.Image.open(path).convert('RGB')).")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise UserError(f"the image is {image.shape[1]}x{image.shape[0]} (WxH): it has no pixel; pass an image "
                        "of at least 1x1 pixel.")
    return image


def load_model(checkpoint: str | Path, *, weights: str | None = None, device: str = "auto", precision: str = "auto",
               backend: str = "torch") -> SegmentationModel:
    """The checkpoint as a :class:`SegmentationModel`: its encoder rebuilt from the identity it records
    (``weights``: the encoder's weights file, when the checkpoint was trained on one), running in ``precision``
    (auto: bf16 autocast on CUDA, fp32 elsewhere). ``backend="onnxruntime"`` runs a model ``fusion-seg export``
    wrote instead (``checkpoint`` is its .onnx file): the same preprocessing, test-time augmentation and sliding
    window, with ONNX Runtime's forward."""
    checkpoint = arguments.path("checkpoint", checkpoint, "the checkpoint's path (best.pt or last.pt of a run)")
    weights = arguments.path("weights", weights, "the encoder's weights file", optional=True)
    device = arguments.text("device", device, "cpu")
    if arguments.backend(backend, checkpoint, precision=precision, weights=weights) == "onnxruntime":
        from fusion_seg.inference.onnx_runtime import load_onnx

        return SegmentationModel(*load_onnx(checkpoint, device=device))
    return SegmentationModel(*load_segmenter(checkpoint, weights=weights, device=device, precision=precision))

"""A segmentation model is a composition: frozen encoder, decoder, upsample (torchvision style).

``load_segmenter`` rebuilds one from a checkpoint: the encoder from the identity the checkpoint
records (and checked against it, so a decoder never runs on another encoder's features)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.data.io import default_palette
from fusion_seg.data.transforms import resize_pair, to_tensor
from fusion_seg.decoders import decoder_from_record
from fusion_seg.decoders.base import upsample_logits
from fusion_seg.device import autocast, resolve_device, to_device
from fusion_seg.encoder.build import FrozenEncoder, rebuild_encoder
from fusion_seg.encoder.identity import EncoderIdentity
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
    encoder = rebuild_encoder(EncoderIdentity.from_dict(ckpt["encoder"]), weights_file=weights)
    model = Segmenter(encoder, decoder).to(dev).eval()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt



@torch.inference_mode()
def predict_logits(model: Segmenter, image: np.ndarray, ckpt: dict, *, sliding_window: bool = False,
                   out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits (1, C, H, W) for one RGB image, resized as in training, returned at ``out_size``."""
    resize = ckpt["data"].get("resize") or {}
    size = tuple(resize["size"]) if resize.get("size") else None
    resized, _ = resize_pair(image, None, short_side=resize.get("short_side"), size=size)
    identity = model.encoder.identity
    device = next(model.decoder.parameters()).device
    x = to_device(to_tensor(resized, identity.mean, identity.std).unsqueeze(0), device)
    with autocast(device):
        crop = train_crop(ckpt)
        if sliding_window and crop and (x.shape[-2] > crop[0] or x.shape[-1] > crop[1]):
            logits = sliding_window_logits(model, x, crop, ckpt["decoder"]["num_classes"])
        else:
            logits = model(x)
    logits = logits.float()
    target = out_size or image.shape[:2]
    return upsample_logits(logits, target)



def train_crop(ckpt: dict) -> tuple[int, int] | None:
    data = ckpt["data"]
    crop = data.get("crop") or (data.get("augment") or {}).get("crop")
    return tuple(crop) if crop else None



def checkpoint_palette(ckpt: dict) -> np.ndarray:
    return default_palette(len(ckpt["classes"]))

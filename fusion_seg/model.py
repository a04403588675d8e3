"""A segmentation model is a composition: frozen encoder, decoder, upsample (torchvision style)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoders import build_decoder
from .encoder import FrozenEncoder
from .shapes import ShapeSpec


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of decoder logits to the label size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def decoder_from_record(record: dict) -> nn.Module:
    """Rebuild a decoder from the ``{"name", "num_classes", "config", "input_shapes"}`` record a checkpoint holds."""
    shapes = {k: ShapeSpec(int(c), int(s)) for k, (c, s) in record["input_shapes"].items()}
    return build_decoder(record["name"], shapes, int(record["num_classes"]), **record["config"])


def decoder_record(name: str, decoder: nn.Module, input_shapes: dict[str, ShapeSpec], num_classes: int) -> dict:
    return {"name": name, "num_classes": num_classes, "config": decoder.config,
            "input_shapes": {k: [v.channels, v.stride] for k, v in input_shapes.items()}}


class Segmenter(nn.Module):
    """Image in, logits at image size out."""

    def __init__(self, encoder: FrozenEncoder, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        return upsample_logits(self.decoder(features), images.shape[-2:])

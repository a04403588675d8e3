"""Segmentation decoders, built by name from the backbone's feature shapes.

As in detectron2, a decoder is built from ``input_shapes: dict[str, ShapeSpec]``
(never hard-coded widths) and consumes ``dict[str, Tensor]`` keyed the same
way. Every decoder exposes ``config`` (JSON-able; ``build_decoder(name,
input_shapes, num_classes, **decoder.config)`` rebuilds the same
architecture, which is what checkpoints store), ``output_stride`` (stride of
its logits) and ``required_strides``.
"""
from __future__ import annotations

from torch import nn

from fusion_seg.decoders.reverse_hrnet import ReverseHRNet
from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec

DECODERS: dict[str, type[nn.Module]] = {
    "reverse-hrnet": ReverseHRNet,
}


def build_decoder(name: str, input_shapes: dict[str, ShapeSpec], num_classes: int,
                  **config) -> nn.Module:
    """Instantiate the decoder registered as ``name``."""
    if name not in DECODERS:
        raise UserError(f"unknown decoder {name!r}; known decoders: {', '.join(sorted(DECODERS))}")
    return DECODERS[name](input_shapes, num_classes, **config)


__all__ = ["DECODERS", "ReverseHRNet", "build_decoder"]

"""The linear probe: BatchNorm, upsample, concatenate, one 1x1 conv.

This is the standard linear segmentation probe of frozen-backbone studies
(the ``BNHead`` "linear" and "ms" probes of DINOv2's segmentation
evaluation, Oquab et al. 2023; the linear decoder baseline of Segmenter,
Strudel et al. 2021): each
consumed feature map gets a BatchNorm, all are bilinearly upsampled to the
finest one, concatenated, and a single 1x1 conv maps them to class logits.
Nothing but the BatchNorms and that conv is learned, so it measures how
linearly separable the frozen features are.

Adapted for the cached multi-scale maps
---------------------------------------
* The maps are chosen by stride (``strides``, default 4, 8, 16, 32; the
  stride-2 map may be added); the logits are at the finest one
  (``output_stride = min(strides)``), not at image size.
* BatchNorm is applied to each map at its own resolution before upsampling
  (DINOv2 applies one BN to the concatenation after upsampling; the two
  differ only in which pixels the batch statistics are taken over).
* The 1x1 conv is one ``nn.Conv2d`` over the concatenated channels (so its
  state dict is that of the textbook probe), but ``forward`` never builds
  the concatenation: bilinear resizing is linear and acts on every channel
  alike, so it commutes with a 1x1 conv, and
  ``conv(cat(up(x_i)))  ==  sum_i up(conv_i(x_i)) + bias`` where ``conv_i``
  uses the weight columns of map ``i``. For ResNet-50 at stride 4 this
  avoids a 3840-channel stride-4 tensor (about 126 MB at 256x256, batch 2).
* There is nothing of the probe that does not apply: it was designed for
  frozen encoders. DINOv2's multi-layer ("ms") variant concatenates the
  last four blocks of a ViT at one resolution; here the "layers" are the
  backbone's stages at their own strides.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusion_seg.decoders.base import Decoder, register_decoder, resize_to
from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec

DEFAULT_STRIDES = (4, 8, 16, 32)


@register_decoder("linear")
class LinearProbe(Decoder):
    """BN on each map, upsample to the finest, concatenate, 1x1 conv to classes.

    Args:
        input_shapes: ``{name: ShapeSpec}`` of the available feature maps.
        num_classes: number of output channels (logits).
        strides: strides of the maps to consume (default 4, 8, 16, 32).

    ``forward`` returns logits at stride ``output_stride = min(strides)``.
    """

    def __init__(self, input_shapes: dict[str, ShapeSpec], num_classes: int, *,
                 strides: Sequence[int] = DEFAULT_STRIDES):
        super().__init__()
        strides = tuple(sorted({int(s) for s in strides}))
        if not strides or min(strides) < 1:
            raise UserError(f"strides must list at least one positive stride, got {list(strides)}")
        self.select_inputs(input_shapes, strides, "linear")
        channels = [input_shapes[name].channels for name in self.in_features]
        self._config = {"strides": list(strides)}
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in channels)
        self.classifier = nn.Conv2d(sum(channels), num_classes, 1)
        self._splits = channels
        self.init_weights()

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        xs = [norm(features[name]) for norm, name in zip(self.norms, self.in_features)]
        size = xs[0].shape[-2:]
        weights = torch.split(self.classifier.weight, self._splits, dim=1)
        out = None
        for x, w in zip(xs, weights):
            y = resize_to(F.conv2d(x, w), size)
            out = y if out is None else out + y
        return out + self.classifier.bias.view(1, -1, 1, 1).to(out.dtype)

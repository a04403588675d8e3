"""The Semantic FPN head of Panoptic FPN (Kirillov, Girshick, He, Dollar; CVPR 2019).

Panoptic FPN's semantic branch sits on an FPN (Lin et al. 2017) over the
backbone's stride 4..32 stages: lateral 1x1 convs bring every stage to a
common width, a top-down pathway adds each upsampled coarser level to the
next finer lateral, and a 3x3 conv smooths each sum into P2..P5. The head
then gives each level a "scale head" of ``log2(stride / 4)`` stages of
(3x3 conv - GroupNorm - ReLU - 2x bilinear upsample), one conv and no
upsample for P2, so that all four reach stride 4; they are summed and a 1x1
conv predicts the classes at stride 4 (the paper then upsamples 4x).
Widths follow the paper and detectron2's ``SemSegFPNHead``: FPN 256, head
128, GroupNorm.

Adapted for a frozen, cached encoder
------------------------------------
* The FPN is built from ``input_shapes`` (maps selected by stride, any
  widths) instead of being attached to a trainable ResNet. Because the
  backbone cannot adapt its stage outputs (whose scales differ a lot), the
  lateral and output convs get a norm (no activation), as detectron2 does
  with ``FPN.NORM``; the paper's default FPN has none.
* All upsampling is to the *size* of the target map (nearest in the
  top-down pathway as in FPN, bilinear in the scale heads as in the paper),
  so inputs need not be multiples of 32.
* The logits stay at stride 4 (``output_stride``); the caller upsamples.
* What does not apply: the instance branch (Mask R-CNN) and the FPN's
  extra P6 (a detection-only level); the paper's backbone fine-tuning and
  its training schedule. ``norm="bn"`` is offered beside the paper's GN.

Presets: ``small`` (FPN 128, head 64) for tests and CPU runs, ``paper``
(FPN 256, head 128).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import ConvNormAct
from torch import nn

from fusion_seg.decoders.base import (Decoder, FeatureTaps, check_group_norm, check_positive, check_preset,
                                      norm_layer, register_decoder, resize_to)
from fusion_seg.shapes import ShapeSpec

STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class Preset:
    fpn_width: int
    head_width: int


PRESETS = {"small": Preset(128, 64), "paper": Preset(256, 128)}


class ScaleHead(nn.Module):
    """``steps`` x (3x3 conv - norm - ReLU, then bilinear upsample to the next finer level's size).

    With ``steps == 0`` it is one conv and no upsampling (the stride-4 level).
    """

    def __init__(self, in_channels: int, channels: int, steps: int, norm: str):
        super().__init__()
        self.convs = nn.ModuleList(
            ConvNormAct(in_channels if i == 0 else channels, channels, 3, norm_layer=norm)
            for i in range(max(1, steps))
        )
        self.steps = steps

    def forward(self, x: torch.Tensor, sizes: list[torch.Size]) -> torch.Tensor:
        """``sizes``: the sizes to upsample to after each conv, finest last."""
        for conv, size in zip(self.convs, sizes if self.steps else [x.shape[-2:]]):
            x = resize_to(conv(x), size)
        return x


@register_decoder("fpn")
class SemanticFPN(Decoder):
    """FPN over strides 4..32 plus Panoptic FPN's semantic head; logits at stride 4.

    Args:
        input_shapes: ``{name: ShapeSpec}`` of the available feature maps.
        num_classes: number of output channels (logits).
        preset: ``"small"`` or ``"paper"``; supplies the widths below.
        fpn_width: channels of the FPN levels P2..P5.
        head_width: channels of the scale heads.
        norm: ``"gn"`` (the paper's GroupNorm, 32 groups) or ``"bn"``.
    """

    def __init__(self, input_shapes: dict[str, ShapeSpec], num_classes: int, *,
                 preset: str = "small", fpn_width: int | None = None,
                 head_width: int | None = None, norm: str = "gn"):
        super().__init__()
        check_preset("fpn", preset, PRESETS)
        p = PRESETS[preset]
        fpn_width = p.fpn_width if fpn_width is None else int(fpn_width)
        head_width = p.head_width if head_width is None else int(head_width)
        check_positive(fpn_width=fpn_width, head_width=head_width)
        layer = norm_layer(norm)
        check_group_norm(norm, fpn_width=fpn_width, head_width=head_width)
        self.select_inputs(input_shapes, STRIDES, "fpn")
        self._config = {"preset": preset, "fpn_width": fpn_width, "head_width": head_width,
                        "norm": norm}

        self.lateral = nn.ModuleList(
            ConvNormAct(input_shapes[name].channels, fpn_width, 1, norm_layer=layer,
                        apply_act=False)
            for name in self.in_features
        )
        self.output = nn.ModuleList(
            ConvNormAct(fpn_width, fpn_width, 3, norm_layer=layer, apply_act=False)
            for _ in STRIDES
        )
        self.scale_heads = nn.ModuleList(
            ScaleHead(fpn_width, head_width, int(math.log2(s // STRIDES[0])), layer)
            for s in STRIDES
        )
        self.classifier = nn.Conv2d(head_width, num_classes, 1)
        self.init_weights()

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        laterals = [lat(features[name]) for lat, name in zip(self.lateral, self.in_features)]
        # Top-down: each coarser level, upsampled to the finer lateral's size, is added to it.
        merged = [laterals[-1]]
        for lat in reversed(laterals[:-1]):
            merged.insert(0, lat + resize_to(merged[0], lat.shape[-2:], "nearest"))
        pyramid = [conv(x) for conv, x in zip(self.output, merged)]
        sizes = [x.shape[-2:] for x in pyramid]
        out = None
        for level, (head, x) in enumerate(zip(self.scale_heads, pyramid)):
            # Level k upsamples through the sizes of levels k-1, ..., 0.
            y = head(x, sizes[:level][::-1])
            out = y if out is None else out + y
        return self.classifier(out)

    def feature_taps(self) -> FeatureTaps:
        """The FPN levels P2..P5 (outputs of the 3x3 output convs), the pyramid its semantic head reads."""
        return FeatureTaps("fpn-levels", list(self.output))

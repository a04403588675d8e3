"""ESeg: "Revisiting Multi-Scale Feature Fusion for Semantic Segmentation" (Meng et al. 2022).

ESeg argues that neither a high-resolution internal stream nor atrous
convolutions are needed for segmentation if the multi-scale fusion is rich
enough: it takes the backbone's P2..P5 (strides 4..32), extends the pyramid
with P6..P9 (down to 1/512 of the input, receptive fields as large as the
image), fuses all eight levels with repeated BiFPN layers (EfficientDet, Tan
et al. 2020) and predicts from the fused high-resolution features.

What is reproduced
------------------
* Levels P2..P5 from the cache, each brought to the BiFPN width by a 1x1
  conv + BN (EfficientDet's resampling of backbone levels). P6..P``max_level``
  are made as EfficientDet makes P6/P7: a 3x3 stride-2 max pool of the
  projected P5, then of each new level in turn (no parameters).
* BiFPN layers, ``repeats`` times: a top-down path (each level fused with
  the upsampled level above), then a bottom-up path (each level fused with
  its input, its top-down node and the downsampled level below; the top
  level with its input and the level below). Every fusion is EfficientDet's
  fast normalised fusion ``sum_i w_i x_i`` with ``w = relu(w') / (sum
  relu(w') + 1e-4)`` (:class:`FastNormalizedFusion`), followed by swish and a
  depthwise-separable 3x3 conv + BN (``timm.layers.SeparableConvNormAct``).
* No atrous convs and no internal stream finer than the input P2.
* Head: the fused levels are resized to P2 (stride 4) and summed, then one
  separable conv + BN + swish and a 1x1 classifier (``output_stride`` 4).
  The paper's head is similarly light; its exact layer count and whether
  it sums or concatenates the levels were not checked against the paper.

Adapted for a frozen, cached encoder
------------------------------------
* The backbone (EfficientNet in the paper) is not part of the decoder: P2..P5
  are the cached maps, of any widths, selected by stride. The backbone
  scaling of ESeg's compound scaling therefore does not apply; only the
  BiFPN width and depth are presets.
* Resampling is size-matched: top-down upsampling is a bilinear resize to
  the target level's size (EfficientDet uses nearest 2x), bottom-up
  downsampling a 3x3 stride-2 max pool followed by a resize only when the
  pooled size differs. At 360x480, P5 is 12x15, P6 6x8, P7 3x4, P8 2x2 and
  P9 1x1, and nothing needs a multiple-of-512 input.
* Not applicable: anything that trains or pre-trains the backbone, and
  ESeg's training recipe (schedule, augmentation, loss), which is the
  training loop's business.

BatchNorm on the coarsest levels (often 1x1) sees only ``batch`` values per
channel: train with batches of 2 or more, or pass ``norm="gn"``.

Presets (BiFPN width, repeats): ``small`` (64, 2) for tests and CPU runs;
``d0`` (64, 3) and ``d3`` (160, 6), the BiFPN sizes of EfficientDet-D0 and
-D3 (W = 64 * 1.35^phi, D = 3 + phi), which ESeg's model family scales like.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, SeparableConvNormAct
from torch import nn

from fusion_seg.decoders.base import (Decoder, check_counts, check_group_norm, check_positive, check_preset, norm_layer,
                                      register_decoder, resize_to)
from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec

INPUT_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class Preset:
    width: int
    repeats: int


PRESETS = {"small": Preset(64, 2), "d0": Preset(64, 3), "d3": Preset(160, 6)}


class FastNormalizedFusion(nn.Module):
    """EfficientDet's fast normalised fusion: ``sum_i w_i x_i``, ``w = relu(w') / (sum relu(w') + eps)``.

    The raw weights ``w'`` start at 1 (an average of the inputs). The
    effective weights are non-negative and sum to just under 1.
    """

    def __init__(self, num_inputs: int, eps: float = 1e-4):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))
        self.eps = eps

    def normalized_weights(self) -> torch.Tensor:
        w = F.relu(self.weight)
        return w / (w.sum() + self.eps)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(xs) != self.weight.numel():
            raise ValueError(f"expected {self.weight.numel()} inputs, got {len(xs)}")
        w = self.normalized_weights()
        out = w[0] * xs[0]
        for i in range(1, len(xs)):
            out = out + w[i] * xs[i]
        return out


def downsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """3x3 stride-2 max pool (EfficientDet), then a resize only if the pooled size is not ``size``."""
    return resize_to(F.max_pool2d(x, 3, stride=2, padding=1), size)


class BiFPNNode(nn.Module):
    """Fast normalised fusion, swish, depthwise-separable 3x3 conv + norm."""

    def __init__(self, num_inputs: int, width: int, norm: str):
        super().__init__()
        self.fuse = FastNormalizedFusion(num_inputs)
        self.act = nn.SiLU()
        self.conv = SeparableConvNormAct(width, width, 3, norm_layer=norm, apply_act=False)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.act(self.fuse(xs)))


class BiFPNLayer(nn.Module):
    """One BiFPN layer over ``num_levels`` levels of equal width, finest first."""

    def __init__(self, num_levels: int, width: int, norm: str):
        super().__init__()
        self.num_levels = num_levels
        # Top-down node i (i = 0 .. L-2) fuses input i with the upsampled node i+1.
        self.top_down = nn.ModuleList(BiFPNNode(2, width, norm) for _ in range(num_levels - 1))
        # Bottom-up node i (i = 1 .. L-1) fuses input i, top-down node i (not at the
        # top, which has none) and the downsampled output i-1.
        self.bottom_up = nn.ModuleList(
            BiFPNNode(3 if i < num_levels - 1 else 2, width, norm) for i in range(1, num_levels)
        )

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(xs) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels, got {len(xs)}")
        sizes = [x.shape[-2:] for x in xs]
        top = self.num_levels - 1
        td = [None] * self.num_levels
        td[top] = xs[top]
        for i in range(top - 1, -1, -1):
            td[i] = self.top_down[i]([xs[i], resize_to(td[i + 1], sizes[i])])
        out = [td[0]]
        for i in range(1, self.num_levels):
            below = downsample(out[i - 1], sizes[i])
            inputs = [xs[i], td[i], below] if i < top else [xs[i], below]
            out.append(self.bottom_up[i - 1](inputs))
        return out


@register_decoder("eseg")
class ESeg(Decoder):
    """P2..P5 from the cache, P6..P``max_level`` by max pooling, BiFPN fusion, light head at stride 4.

    Args:
        input_shapes: ``{name: ShapeSpec}`` of the available feature maps.
        num_classes: number of output channels (logits).
        preset: ``"small"``, ``"d0"`` or ``"d3"``; supplies the defaults below.
        width: BiFPN channels.
        repeats: number of BiFPN layers.
        max_level: coarsest pyramid level, 5 (no extension) .. 9 (the paper's P9).
        norm: ``"bn"`` (the paper's) or ``"gn"``.
    """

    def __init__(self, input_shapes: dict[str, ShapeSpec], num_classes: int, *,
                 preset: str = "small", width: int | None = None, repeats: int | None = None,
                 max_level: int = 9, norm: str = "bn"):
        super().__init__()
        check_preset("eseg", preset, PRESETS)
        p = PRESETS[preset]
        width = p.width if width is None else int(width)
        repeats = p.repeats if repeats is None else int(repeats)
        max_level = int(max_level)
        check_positive(width=width)
        check_counts(repeats=repeats)
        if not 5 <= max_level <= 9:
            raise UserError(f"eseg max_level must be in 5..9 (P5 = stride 32, P9 = stride 512), "
                            f"got {max_level}")
        layer = norm_layer(norm)
        check_group_norm(norm, width=width)
        self.select_inputs(input_shapes, INPUT_STRIDES, "eseg")
        self._config = {"preset": preset, "width": width, "repeats": repeats,
                        "max_level": max_level, "norm": norm}
        self.num_extra_levels = max_level - 5
        num_levels = len(INPUT_STRIDES) + self.num_extra_levels

        self.project = nn.ModuleList(
            ConvNormAct(input_shapes[name].channels, width, 1, norm_layer=layer, apply_act=False)
            for name in self.in_features
        )
        self.bifpn = nn.Sequential(*(BiFPNLayer(num_levels, width, layer) for _ in range(repeats)))
        self.head = SeparableConvNormAct(width, width, 3, norm_layer=layer, act_layer=nn.SiLU)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.init_weights()

    def pyramid(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The BiFPN input levels P2..P``max_level``, finest first."""
        xs = [proj(features[name]) for proj, name in zip(self.project, self.in_features)]
        for _ in range(self.num_extra_levels):
            xs.append(F.max_pool2d(xs[-1], 3, stride=2, padding=1))
        return xs

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        xs = self.bifpn(self.pyramid(features))
        size = xs[0].shape[-2:]
        out = xs[0]
        for x in xs[1:]:
            out = out + resize_to(x, size)
        return self.classifier(self.head(out))

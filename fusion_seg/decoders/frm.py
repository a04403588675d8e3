"""FRM: "A feature refinement module for light-weight semantic segmentation network".

Wang, Guo, Wang, Zheng, Qi (ICIP; arXiv 2412.08670).

The paper attaches a feature refinement module to a light-weight encoder:
it gathers semantics from the multi-stage feature maps of the backbone,
captures non-local context over them with a transformer block, and uses
that context to refine the features an FPN-style decoder then fuses into
the prediction. This module follows that outline over the cached maps. The
paper's full text was not at hand when it was written: its exact layers
(widths, fusion convs, and its attention, which third-party summaries call
a disentangled non-local block) are not reproduced; the parts below are
named after the well-known modules they reuse instead.

Structure
---------
1. Gather: each of the stride 4, 8, 16, 32 maps is projected to ``width``
   (1x1 conv + BN + ReLU), average-pooled to the stride-32 size
   (``adaptive_avg_pool2d``, so any input size works; as TopFormer's token
   pyramid pooling), concatenated and fused by a 1x1 conv + BN + ReLU.
2. Context: the fused stride-32 map becomes ``h * w`` tokens; a
   depthwise-conv positional encoding (``timm.models.twins.PosConv``, the
   PEG of "Conditional Positional Encodings", Chu et al.) gives them
   position for any input size, and ``depth`` standard transformer blocks
   (``timm.models.vision_transformer.Block``: pre-norm multi-head
   self-attention + MLP) capture non-local context over all of them.
3. Refine: the context is resized to the stride-8 and stride-4 maps and
   injects itself into their projections as
   ``x * sigmoid(gate(ctx)) + embed(ctx)`` (1x1 conv + BN each; TopFormer's
   semantic injection). Then an FPN-style top-down sum
   ``r4 + up(r8 + up(ctx))``, a 3x3 conv + BN + ReLU and a 1x1 classifier
   give the logits at stride 4 (``output_stride``); the caller upsamples.

Adapted for a frozen, cached encoder
------------------------------------
* The paper's light-weight backbone is trained with the module; here the
  backbone is frozen and its maps (any widths, selected by stride) come
  from the cache, so the per-stage 1x1 projections are the only adaptation
  of the encoder's outputs.
* Not applicable / not reproduced: training the backbone jointly, and the
  paper's extra training loss (a contrastive term on the embeddings, per
  summaries of the paper): the loss is the training loop's.

Presets (width, transformer blocks, heads): ``small`` (64, 1, 2) for tests
and CPU runs; ``base`` (256, 1, 8), one transformer block as in the paper
at an FPN-like width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from timm.models.twins import PosConv
from timm.models.vision_transformer import Block
from torch import nn

from fusion_seg.decoders.base import Decoder, check_positive, check_preset, register_decoder, resize_to
from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec

STRIDES = (4, 8, 16, 32)
REFINED = 2  # the stride-4 and stride-8 maps are refined by the context


@dataclass(frozen=True)
class Preset:
    width: int
    depth: int
    heads: int


PRESETS = {"small": Preset(64, 1, 2), "base": Preset(256, 1, 8)}


class SemanticInjection(nn.Module):
    """Refine a high-resolution map with low-resolution context: ``x * sigmoid(gate(c)) + embed(c)``."""

    def __init__(self, width: int):
        super().__init__()
        self.gate = ConvNormAct(width, width, 1, apply_act=False)
        self.embed = ConvNormAct(width, width, 1, apply_act=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = resize_to(context, x.shape[-2:])
        return x * torch.sigmoid(self.gate(context)) + self.embed(context)


@register_decoder("frm")
class FRM(Decoder):
    """Multi-stage semantics, transformer context at stride 32, refinement of strides 4 and 8.

    Args:
        input_shapes: ``{name: ShapeSpec}`` of the available feature maps.
        num_classes: number of output channels (logits).
        preset: ``"small"`` or ``"base"``; supplies the defaults below.
        width: common channel count (the transformer's embedding dimension).
        depth: transformer blocks over the stride-32 tokens.
        heads: attention heads (must divide ``width``).
        mlp_ratio: hidden width of the transformer MLP relative to ``width``.
    """

    def __init__(self, input_shapes: dict[str, ShapeSpec], num_classes: int, *,
                 preset: str = "small", width: int | None = None, depth: int | None = None,
                 heads: int | None = None, mlp_ratio: float = 4.0):
        super().__init__()
        check_preset("frm", preset, PRESETS)
        p = PRESETS[preset]
        width = p.width if width is None else int(width)
        depth = p.depth if depth is None else int(depth)
        heads = p.heads if heads is None else int(heads)
        mlp_ratio = float(mlp_ratio)
        check_positive(width=width, depth=depth, heads=heads)
        if width % heads:
            raise UserError(f"frm heads ({heads}) must divide width ({width})")
        if mlp_ratio <= 0:
            raise UserError(f"frm mlp_ratio must be > 0, got {mlp_ratio}")
        self.select_inputs(input_shapes, STRIDES, "frm")
        self._config = {"preset": preset, "width": width, "depth": depth, "heads": heads,
                        "mlp_ratio": mlp_ratio}

        self.project = nn.ModuleList(
            ConvNormAct(input_shapes[name].channels, width, 1) for name in self.in_features
        )
        self.gather = ConvNormAct(len(STRIDES) * width, width, 1)
        self.pos = PosConv(width, width)
        self.blocks = nn.Sequential(*(
            Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)
        ))
        self.norm = nn.LayerNorm(width)
        self.inject = nn.ModuleList(SemanticInjection(width) for _ in range(REFINED))
        self.head = ConvNormAct(width, width, 3)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.init_weights()

    def context(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Gather the projected maps at the stride-32 size and run the transformer over them."""
        size = xs[-1].shape[-2:]
        pooled = [x if x.shape[-2:] == size else F.adaptive_avg_pool2d(x, size) for x in xs]
        fused = self.gather(torch.cat(pooled, dim=1))
        b, c, h, w = fused.shape
        tokens = fused.flatten(2).transpose(1, 2)
        tokens = self.norm(self.blocks(self.pos(tokens, (h, w))))
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        xs = [proj(features[name]) for proj, name in zip(self.project, self.in_features)]
        context = self.context(xs)
        # FPN-style top-down over the refined maps, coarsest (stride 8) first.
        out = context
        for k in reversed(range(REFINED)):
            refined = self.inject[k](xs[k], context)
            out = refined + resize_to(out, refined.shape[-2:])
        return self.classifier(self.head(out))

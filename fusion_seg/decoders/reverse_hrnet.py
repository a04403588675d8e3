"""The reverse HRNet decoder of "Early Fusion of Features for Semantic Segmentation".

Gupta et al. feed the multi-scale feature maps of a frozen classifier
(ResNet-50) into an HRNet run backwards: every stream is present from the
start (early fusion), and each stage fuses the streams and drops the
lowest-resolution one, until only the highest-resolution stream is left for
the segmentation head. Per-stream 1x1 convs first adapt the backbone's
channel counts to the HRNet widths. The paper's extra stream at stride 2
(``streams=5``) gets shallower stages so that training memory stays about
that of the 4-stream decoder.

Stage k (k = 0 .. streams-2) runs on ``streams - k`` streams for
``modules[k]`` HRNet modules; its last module returns one stream fewer.

5-stream default depths -- how they were chosen
------------------------------------------------
Peak training memory of one step (forward + backward, batch 2, 512x512
image, float32, CPU): frozen ResNet-50 features s2 64x256x256, s4
256x128x128, s8 512x64x64, s16 1024x32x32, s32 2048x16x16, 19 classes,
logits bilinearly upsampled to 512x512 and plain cross-entropy. Measured as
the rise of ``ru_maxrss`` (``resource.getrusage``) over the RSS after the
model was built and a small warm-up step ran, in a fresh subprocess per
configuration, with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS and RSS
follows live memory. "total" counts the input features, parameter
gradients and the loss (the s2 map alone is 32 MiB at this size).

A torch.profiler (profile_memory) replay of the allocator events agrees
within 1%. Figures in MiB; "+x%" is against the 4-stream default:

    preset  streams  modules    blocks   total   vs 4-stream
    small   4        (1,1,1)    1          286
    small   5        (1,1,1,1)  1          438   +53%  default (shallowest possible)
    w18     4        (3,4,1)    4          805
    w18     5        (1,1,1,1)  4         1105   +37%
    w18     5        (1,1,1,1)  3          922   +15%
    w18     5        (1,1,1,1)  2          739    -8%
    w18     5        (1,1,2,1)  2          853    +6%  default
    w18     5        (2,1,1,1)  2          878    +9%
    w48     4        (3,4,1)    4         1783
    w48     5        (1,1,1,1)  4         1830    +3%  default
    w48     5        (1,1,2,1)  2         1364   -23%

The stride-2 stream runs through every stage (each stage drops the *lowest*
resolution) with 4x the pixels of the stride-4 stream, so fewer modules
alone cannot compensate for w18 (its stride-2 width rounds 9 up to 16):
its 5-stream default also halves the blocks per branch, as
HRNet-W18-Small-v2 does. ``small`` is already at the minimum depth.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fusion_seg.decoders.base import Decoder, FeatureTaps, check_counts, register_decoder
from fusion_seg.decoders.hrnet_blocks import HighResolutionModule
from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec


@dataclass(frozen=True)
class Depth:
    """HRNet modules per stage and BasicBlocks per branch."""

    modules: tuple[int, ...]
    blocks: int


@dataclass(frozen=True)
class Preset:
    """Stream widths for strides 4, 8, 16, 32 and default depths by stream count."""

    widths: tuple[int, int, int, int]
    depths: dict[int, Depth]


PRESETS: dict[str, Preset] = {
    # Cheap: for tests and CPU runs. No 5-stream depth is shallower than
    # (1, 1, 1, 1) x 1 block, so its 5-stream memory cannot match (see above).
    "small": Preset((16, 32, 64, 128), {4: Depth((1, 1, 1), 1), 5: Depth((1, 1, 1, 1), 1)}),
    # HRNetV2 widths; 4-stream depths mirror HRNetV2's stages (1, 4, 3) x 4 blocks reversed.
    "w18": Preset((18, 36, 72, 144), {4: Depth((3, 4, 1), 4), 5: Depth((1, 1, 2, 1), 2)}),
    "w48": Preset((48, 96, 192, 384), {4: Depth((3, 4, 1), 4), 5: Depth((1, 1, 1, 1), 4)}),
}

STREAM_STRIDES = {4: (4, 8, 16, 32), 5: (2, 4, 8, 16, 32)}


def _stride2_width(width4: int) -> int:
    """Width of the paper's extra stride-2 stream: half the stride-4 width, up to a multiple of 8."""
    return 8 * math.ceil(width4 / 2 / 8)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


@register_decoder("reverse-hrnet")
class ReverseHRNet(Decoder):
    """Reverse HRNet decoder over backbone feature maps selected by stride.

    Args:
        input_shapes: ``{name: ShapeSpec}`` of the available feature maps.
        num_classes: number of output channels (logits).
        streams: 4 (strides 4..32) or 5 (adds the stride-2 map).
        preset: ``"small"``, ``"w18"`` or ``"w48"``; supplies the defaults below.
        widths: channels per stream, highest resolution first; for 5 streams
            a 4-entry list gets the stride-2 width derived from its first entry.
        modules: HRNet modules per stage (``streams - 1`` entries).
        blocks: BasicBlocks per branch.

    ``forward`` returns logits at the finest stream (stride ``output_stride``),
    not upsampled to the image: the caller does that.
    """

    def __init__(self, input_shapes: dict[str, ShapeSpec], num_classes: int, *,
                 streams: int = 4, preset: str = "small",
                 widths: Sequence[int] | None = None,
                 modules: Sequence[int] | None = None, blocks: int | None = None):
        super().__init__()
        if streams not in STREAM_STRIDES:
            raise UserError(f"reverse-hrnet supports streams=4 or 5, got {streams}")
        if preset not in PRESETS:
            raise UserError(f"unknown reverse-hrnet preset {preset!r}; "
                            f"choose one of {', '.join(PRESETS)}")
        p = PRESETS[preset]
        self.select_inputs(input_shapes, STREAM_STRIDES[streams], f"{streams}-stream reverse-hrnet",
                           hint=" or use streams=4" if streams == 5 else "")
        widths = _resolve_widths(p, streams, widths)
        depth = p.depths[streams]
        modules = depth.modules if modules is None else tuple(int(m) for m in modules)
        blocks = depth.blocks if blocks is None else int(blocks)
        if len(modules) != streams - 1 or min(modules) < 1:
            raise UserError(f"modules must be {streams - 1} positive counts (one per "
                            f"stage), got {list(modules)}")
        check_counts(**{f"modules[{k}]": m for k, m in enumerate(modules)}, blocks=blocks)
        self._config = {"streams": streams, "preset": preset, "widths": list(widths),
                        "modules": list(modules), "blocks": blocks}

        self.align = nn.ModuleList(
            _conv_bn_relu(input_shapes[name].channels, w)
            for name, w in zip(self.in_features, widths)
        )
        self.stages = nn.ModuleList()
        for k, num_modules in enumerate(modules):
            ws = widths[: streams - k]
            self.stages.append(nn.Sequential(*(
                HighResolutionModule(ws, ws, blocks,
                                     num_outputs=len(ws) - 1 if m == num_modules - 1 else None)
                for m in range(num_modules)
            )))
        self.head = _conv_bn_relu(widths[0], widths[0])
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)
        self.init_weights()  # Kaiming convs; HRNet's tiny normal init for the classifier

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        xs = [align(features[name]) for align, name in zip(self.align, self.in_features)]
        for stage in self.stages:
            xs = stage(xs)
        return self.classifier(self.head(xs[0]))

    def checkpoint_units(self) -> list[nn.Module]:
        """Each HRNet module of every stage, the 1x1 aligns and the head: everything that keeps activations
        at the streams' resolutions (``--checkpoint-activations``)."""
        return [*self.align, *(module for stage in self.stages for module in stage), self.head]

    def feature_taps(self) -> FeatureTaps:
        """The **first stage**, the one place where all the streams exist together inside the decoder.

        The ``align`` outputs also hold all of them, but they are only 1x1 projections of
        the frozen backbone's maps, i.e. they show the encoder, not what the decoder made of
        it; every later stage has dropped the coarsest stream. Its modules and their
        branches are tapped: each stream's *last* state wins, the fused output of the stage
        for strides 4..16, and for stride 32 (which the stage's last module folds into the
        finer streams instead of returning it) the output of its branch in that module, its
        deepest state before it is dropped.
        """
        modules: list[nn.Module] = []
        for module in self.stages[0]:
            if isinstance(module, HighResolutionModule):
                modules += list(module.branches) + [module]  # branches run before the module returns
        return FeatureTaps("first-stage", modules)


def _resolve_widths(p: Preset, streams: int, widths: Sequence[int] | None) -> tuple[int, ...]:
    """Per-stream widths, highest resolution first."""
    base = tuple(int(w) for w in (p.widths if widths is None else widths))
    if len(base) == streams - 1 == 4:
        base = (_stride2_width(base[0]),) + base
    if len(base) != streams or min(base) < 1:
        raise UserError(f"widths must give {streams} positive channel counts (highest "
                        f"resolution first), got {list(widths or [])}")
    return base

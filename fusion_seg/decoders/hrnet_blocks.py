"""HRNet building blocks: parallel branches and multi-resolution fusion.

Follows ``HighResolutionModule`` of the official HRNet code
(HRNet/HRNet-Semantic-Segmentation, ``lib/models/seg_hrnet.py``; Wang et al.
2019), which the reverse HRNet decoder of "Early Fusion of Features for
Semantic Segmentation" (Gupta et al.) stacks. Two deliberate differences:

* lower -> higher resolution fusion resizes to the *size* of the target
  stream rather than by a fixed factor, so inputs need not be multiples of 32
  (at 360x480 the stride-16 map is 23x30 and the stride-32 map 12x15);
* the module generalises HRNet's ``multi_scale_output=False`` to
  ``num_outputs``: it returns only the first (highest-resolution) streams and
  folds every dropped lower-resolution stream into them.

Streams are ordered from the highest resolution (index 0) to the lowest;
each stream has half the resolution of the previous one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.resnet import BasicBlock
from torch import nn

from fusion_seg.decoders.base import resize_to


def make_branch(in_channels: int, channels: int, num_blocks: int) -> nn.Sequential:
    """``num_blocks`` BasicBlocks at one resolution (HRNet ``_make_one_branch``).

    The first block gets a 1x1 conv + BN projection on its shortcut only when
    the channel count changes.
    """
    downsample = None
    if in_channels != channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels)
        )
    blocks = [BasicBlock(in_channels, channels, downsample=downsample)]
    blocks += [BasicBlock(channels, channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _upsample_path(in_channels: int, out_channels: int) -> nn.Sequential:
    """Lower -> higher resolution: 1x1 conv + BN; the resize happens in forward."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
    )


def _downsample_path(in_channels: int, out_channels: int, steps: int) -> nn.Sequential:
    """Higher -> lower resolution: ``steps`` 3x3 stride-2 convs + BN.

    The intermediate convs keep ``in_channels`` and end in ReLU; the last maps
    to ``out_channels`` with BN and no ReLU (the ReLU follows the sum).
    """
    layers: list[nn.Module] = []
    for step in range(steps):
        last = step == steps - 1
        out = out_channels if last else in_channels
        layers += [nn.Conv2d(in_channels, out, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(out)]
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """One HRNet module: a branch per stream, then all-to-all fusion.

    Args:
        in_channels: channels of each input stream, highest resolution first.
        channels: channels of each stream after its branch (and of the outputs).
        num_blocks: BasicBlocks per branch.
        num_outputs: how many of the highest-resolution streams to return
            (default: all). Output ``i`` is ``ReLU(sum_j f_ij(x_j))`` over
            *all* input streams ``j``, so dropped streams are folded in.
    """

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int],
                 num_blocks: int, num_outputs: int | None = None):
        super().__init__()
        if len(in_channels) != len(channels):
            raise ValueError(f"in_channels {list(in_channels)} and channels "
                             f"{list(channels)} must have one entry per stream")
        num_streams = len(channels)
        num_outputs = num_streams if num_outputs is None else num_outputs
        if not 1 <= num_outputs <= num_streams:
            raise ValueError(f"num_outputs must be in [1, {num_streams}], got {num_outputs}")
        self.in_channels = tuple(in_channels)
        self.channels = tuple(channels)
        self.num_outputs = num_outputs
        self.branches = nn.ModuleList(
            make_branch(cin, c, num_blocks) for cin, c in zip(in_channels, channels)
        )
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(self._fuse_path(j, i) for j in range(num_streams))
            for i in range(num_outputs)
        )
        self.relu = nn.ReLU(inplace=True)

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the returned streams."""
        return self.channels[: self.num_outputs]

    def _fuse_path(self, j: int, i: int) -> nn.Module:
        """The map ``f_ij`` from stream ``j`` to output stream ``i``."""
        if j == i:
            return nn.Identity()
        if j > i:
            return _upsample_path(self.channels[j], self.channels[i])
        return _downsample_path(self.channels[j], self.channels[i], steps=i - j)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run the branches and fuse; ``xs`` is not modified."""
        if len(xs) != len(self.branches):
            raise ValueError(f"expected {len(self.branches)} streams, got {len(xs)}")
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        outs = []
        for i, paths in enumerate(self.fuse_layers):
            size = xs[i].shape[-2:]
            # Every term is resized to the target size: upsampled maps always,
            # downsampled ones only when ceil-rounding made them differ.
            terms = [resize_to(path(x), size) for path, x in zip(paths, xs)]
            y = terms[0]
            for term in terms[1:]:
                y = y + term
            # A lone term is a branch output, already ReLU'd (and not ours to
            # modify in place).
            outs.append(self.relu(y) if len(terms) > 1 else y)
        return outs

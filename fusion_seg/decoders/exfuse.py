"""ExFuse: "Enhancing Feature Fusion for Semantic Segmentation" (Zhang et al., ECCV 2018).

ExFuse builds on the U-shaped GCN framework (Peng et al. 2017, "Large Kernel
Matters"): every backbone level gets a Global Convolutional Network module
(separable large kernels ``k x 1 + 1 x k``) and a Boundary Refinement (BR)
residual block, and a top-down path adds each upsampled coarser prediction
to the next finer level. ExFuse closes the gap between low-level and
high-level features with five changes; over a frozen, cached encoder three
of them are decoder-side and are implemented here, the other two cannot be:

Implemented
-----------
* Semantic Embedding Branch (SEB): before its GCN, each level below the top
  is multiplied element-wise by every higher level, each passed through a
  3x3 conv and upsampled to its size:
  ``x_l * prod_{h > l} up(conv3x3_{l,h}(x_h))`` (the paper's Fig. 4: with
  several higher levels the branch outputs the product of all of them).
* Explicit Channel Resolution Embedding (ECRE): every 2x upsampling of the
  top-down path is sub-pixel convolution (a 3x3 conv to ``4 * width``
  channels, then ``nn.PixelShuffle(2)``) instead of deconvolution/bilinear,
  and its output is supervised directly by an auxiliary classifier, which
  is what makes the channel-to-position embedding explicit.
* Densely Adjacent Prediction (DAP): the classifier predicts ``k * k``
  groups of ``num_classes`` channels, group ``g = l * k + m``
  (``0 <= l, m < k``) holding the prediction for the pixel at offset
  ``(k//2 - l, k//2 - m)`` from itself; the logit of class ``c`` at
  ``(i, j)`` is the average of group ``g`` read at ``(i + l - k//2,
  j + m - k//2)`` over all ``(l, m)`` (zero outside the map): the paper's
  ``1/k^2``-normalised sum; a plain sum differs by a constant factor the
  classifier absorbs (:func:`densely_adjacent_prediction`). ``dap_kernel=1``
  is a plain classifier.
* Deep (auxiliary) semantic supervision in the decoder: the auxiliary
  classifiers on the ECRE outputs (strides 16, 8 and 4). In train mode
  ``forward`` still returns only the main logits and leaves the auxiliary
  logits, finest last, on ``self.aux_logits``; :meth:`ExFuse.aux_loss`
  turns them into a loss (``aux_weight`` times their mean loss, each
  upsampled to the labels), which :meth:`ExFuse.losses` returns as
  ``"loss_aux"`` beside the main ``"loss_seg"``. In eval mode
  ``aux_logits`` is empty.

Not applicable to a frozen, cached encoder
------------------------------------------
* Layer Rearrangement (moving ResNeXt blocks to lower stages) changes the
  backbone, which here is fixed and already run.
* Semantic Supervision (auxiliary classification losses on the backbone's
  early stages during ImageNet pre-training and fine-tuning) trains the
  encoder; cached features cannot receive it. The decoder-side deep
  supervision above is what remains of it.
* The paper's ResNeXt-131 backbone, COCO pre-training and multi-scale/flip
  test augmentation are outside the decoder.

Adapted
-------
* GCN's decoder carries ``num_classes`` score maps; here it carries
  ``width`` feature channels (any number of classes, including 2, works)
  and 1x1 classifiers read them. Pass ``width=num_classes`` to mimic the
  paper's thin decoder. Each level is first projected to ``width`` by a
  1x1 conv + BN + ReLU (the cached maps can have any widths), so SEB and
  GCN act on projected features; SEB's 3x3 convs have a BN and no
  activation. BR blocks carry BNs (the GCN paper's have none).
* Sizes that are not multiples of 32: the sub-pixel output (twice the
  coarser size) is cropped to the finer map, which is at most one pixel
  smaller when the backbone rounds up (stride-2 convs with padding 1), and
  resized only if it is still off; SEB upsampling resizes to the size.

Presets (width, GCN kernel): ``small`` (64, 7) for tests and CPU runs;
``large`` (128, 15), the GCN paper's kernel (its decoder is num_classes wide).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from fusion_seg.decoders.base import (Criterion, Decoder, check_positive, check_preset, register_decoder,
                                      resize_to)
from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec

STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class Preset:
    width: int
    gcn_kernel: int


PRESETS = {"small": Preset(64, 7), "large": Preset(128, 15)}


def densely_adjacent_prediction(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """DAP: average the ``kernel**2`` channel groups of ``x``, each read at its own neighbour.

    ``x`` has ``kernel**2 * C`` channels, group ``g = l * kernel + m``
    occupying channels ``g*C .. (g+1)*C - 1``. With ``r = kernel // 2``::

        out[:, c, i, j] = 1/kernel**2 * sum_{l, m} x[:, g*C + c, i + l - r, j + m - r]

    where positions outside the map contribute zero. Returns ``C`` channels.
    """
    if kernel == 1:
        return x
    groups = kernel * kernel
    if x.shape[1] % groups:
        raise ValueError(f"DAP with kernel {kernel} needs a multiple of {groups} channels, "
                         f"got {x.shape[1]}")
    c = x.shape[1] // groups
    h, w = x.shape[-2:]
    r = kernel // 2
    padded = F.pad(x, (r, r, r, r))
    out = None
    for l in range(kernel):
        for m in range(kernel):
            g = l * kernel + m
            term = padded[:, g * c:(g + 1) * c, l:l + h, m:m + w]
            out = term if out is None else out + term
    return out / groups


def match_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop ``x`` to ``size`` where it is larger, then resize if it is still not ``size``."""
    return resize_to(x[..., : size[0], : size[1]], size)


class GlobalConv(nn.Module):
    """GCN module (Peng et al. 2017): ``conv_1xk(conv_kx1(x)) + conv_kx1(conv_1xk(x))``."""

    def __init__(self, in_channels: int, channels: int, kernel: int):
        super().__init__()
        p = kernel // 2
        self.left = nn.Sequential(nn.Conv2d(in_channels, channels, (kernel, 1), padding=(p, 0)),
                                  nn.Conv2d(channels, channels, (1, kernel), padding=(0, p)))
        self.right = nn.Sequential(nn.Conv2d(in_channels, channels, (1, kernel), padding=(0, p)),
                                   nn.Conv2d(channels, channels, (kernel, 1), padding=(p, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


class BoundaryRefinement(nn.Module):
    """GCN's BR block: ``x + conv3x3(relu(conv3x3(x)))`` (here with BNs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, 3)
        self.conv2 = ConvNormAct(channels, channels, 3, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class SemanticEmbedding(nn.Module):
    """SEB: ``x * prod_h up(conv3x3_h(x_h))`` over the higher levels ``x_h``."""

    def __init__(self, channels: int, num_higher: int):
        super().__init__()
        self.convs = nn.ModuleList(ConvNormAct(channels, channels, 3, apply_act=False)
                                   for _ in range(num_higher))

    def forward(self, x: torch.Tensor, higher: Sequence[torch.Tensor]) -> torch.Tensor:
        for conv, h in zip(self.convs, higher):
            x = x * resize_to(conv(h), x.shape[-2:])
        return x


class SubPixelUpsample(nn.Module):
    """ECRE's 2x upsampling: 3x3 conv to ``4 * channels``, then ``nn.PixelShuffle(2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return match_size(self.shuffle(self.conv(x)), size)


@register_decoder("exfuse")
class ExFuse(Decoder):
    """GCN-style U-shaped decoder with ExFuse's SEB, ECRE, DAP and decoder deep supervision.

    Args:
        input_shapes: ``{name: ShapeSpec}`` of the available feature maps.
        num_classes: number of output channels (logits).
        preset: ``"small"`` or ``"large"``; supplies the defaults below.
        width: decoder channels.
        gcn_kernel: the GCN modules' large kernel size (odd).
        dap_kernel: DAP neighbourhood size ``k`` (odd; 1 disables DAP).

    ``forward`` returns the main logits at stride 4 in both modes; in train
    mode it also sets ``aux_logits`` (see :meth:`aux_loss` and :meth:`losses`).
    """

    #: Weight of the auxiliary (deep supervision) loss relative to the main
    #: loss; it multiplies the *mean* of the auxiliary heads' losses. ExFuse
    #: does not state one; 0.4 is PSPNet's auxiliary weight.
    aux_weight: ClassVar[float] = 0.4

    def __init__(self, input_shapes: dict[str, ShapeSpec], num_classes: int, *,
                 preset: str = "small", width: int | None = None,
                 gcn_kernel: int | None = None, dap_kernel: int = 3):
        super().__init__()
        check_preset("exfuse", preset, PRESETS)
        p = PRESETS[preset]
        width = p.width if width is None else int(width)
        gcn_kernel = p.gcn_kernel if gcn_kernel is None else int(gcn_kernel)
        dap_kernel = int(dap_kernel)
        check_positive(width=width)
        for name, k in (("gcn_kernel", gcn_kernel), ("dap_kernel", dap_kernel)):
            if k < 1 or k % 2 == 0:
                raise UserError(f"exfuse {name} must be a positive odd number, got {k}")
        self.select_inputs(input_shapes, STRIDES, "exfuse")
        self.num_classes = num_classes
        self.dap_kernel = dap_kernel
        self._config = {"preset": preset, "width": width, "gcn_kernel": gcn_kernel,
                        "dap_kernel": dap_kernel}
        levels = len(STRIDES)

        self.project = nn.ModuleList(
            ConvNormAct(input_shapes[name].channels, width, 1) for name in self.in_features
        )
        # seb[l] serves level l (< top) with one conv per higher level.
        self.seb = nn.ModuleList(SemanticEmbedding(width, levels - 1 - l) for l in range(levels - 1))
        self.gcn = nn.ModuleList(GlobalConv(width, width, gcn_kernel) for _ in range(levels))
        self.lateral_br = nn.ModuleList(BoundaryRefinement(width) for _ in range(levels))
        # up[l] brings level l+1 to level l; fused_br[l] refines the sum at level l.
        self.up = nn.ModuleList(SubPixelUpsample(width) for _ in range(levels - 1))
        self.fused_br = nn.ModuleList(BoundaryRefinement(width) for _ in range(levels - 1))
        self.aux_classifiers = nn.ModuleList(nn.Conv2d(width, num_classes, 1)
                                             for _ in range(levels - 1))
        self.classifier = nn.Conv2d(width, dap_kernel * dap_kernel * num_classes, 1)
        self.init_weights()
        self.aux_logits: list[torch.Tensor] = []

    def classifiers(self) -> list[nn.Conv2d]:
        """The main classifier and the auxiliary (deep supervision) ones."""
        return [self.classifier, *self.aux_classifiers]

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        xs = [proj(features[name]) for proj, name in zip(self.project, self.in_features)]
        top = len(xs) - 1
        aux: list[torch.Tensor] = []
        y = self.lateral_br[top](self.gcn[top](xs[top]))
        for l in range(top - 1, -1, -1):
            lateral = self.lateral_br[l](self.gcn[l](self.seb[l](xs[l], xs[l + 1:])))
            up = self.up[l](y, lateral.shape[-2:])
            if self.training:
                aux.append(self.aux_classifiers[l](up))
            y = self.fused_br[l](lateral + up)
        self.aux_logits = aux
        return densely_adjacent_prediction(self.classifier(y), self.dap_kernel)

    def losses(self, logits: torch.Tensor, labels: torch.Tensor, criterion: Criterion) -> dict[str, torch.Tensor]:
        """``"loss_seg"`` (see :meth:`Decoder.losses`) and, after a forward in train mode, ``"loss_aux"``
        (:meth:`aux_loss`)."""
        losses = super().losses(logits, labels, criterion)
        if self.training or self.aux_logits:
            losses["loss_aux"] = self.aux_loss(labels, criterion)
        return losses

    def aux_loss(self, labels: torch.Tensor, criterion: Criterion) -> torch.Tensor:
        """``aux_weight`` times the mean of ``criterion`` over the auxiliary heads of the last forward.

        Each auxiliary logit map is bilinearly upsampled to ``labels``'
        size and cast to float32, as the training loop does for the main
        logits; ``criterion(logits, labels)`` is e.g. the training loss.
        Add the result to the main loss. Needs a forward in train mode.
        """
        if not self.aux_logits:
            raise RuntimeError("no auxiliary logits: call the decoder in train mode before aux_loss")
        size = labels.shape[-2:]
        losses = [criterion(resize_to(a, size).float(), labels) for a in self.aux_logits]
        return self.aux_weight * torch.stack(losses).mean()

"""Segmentation losses: plain cross-entropy and HRNet's OHEM cross-entropy.

Gupta et al. train with the hyper-parameters of HRNet (Wang et al. 2019),
whose Cityscapes recipe uses ``OhemCrossEntropy`` (thresh 0.9, min_kept
131072) from ``lib/core/criterion.py`` of HRNet/HRNet-Semantic-Segmentation.
Both losses take logits ``(N, C, H, W)`` already at label resolution and an
int64 target ``(N, H, W)``; upsampling is the caller's job.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusion_seg.decoders.base import Decoder
from fusion_seg.device import autocast
from fusion_seg.errors import UserError


def _weight_tensor(weight: Sequence[float] | torch.Tensor | None) -> torch.Tensor | None:
    return None if weight is None else torch.as_tensor(weight, dtype=torch.float32)


def _on(weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The class weights on ``like``'s device (in case the loss module was not moved)."""
    return None if weight is None else weight.to(like.device)


class CrossEntropy(nn.Module):
    """``F.cross_entropy`` with an ignore index and optional class weights; a batch without a labelled
    pixel has loss 0 (with a graph), as in :class:`OhemCrossEntropy`."""

    def __init__(self, ignore_index: int = 255, weight: Sequence[float] | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", _weight_tensor(weight), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != self.ignore_index).any():
            return 0 * logits.float().sum()  # F.cross_entropy's mean over no pixel is NaN: not a divergence
        return F.cross_entropy(logits.float(), target, weight=_on(self.weight, logits),
                               ignore_index=self.ignore_index)


class OhemCrossEntropy(nn.Module):
    """Online hard example mining cross-entropy, as HRNet's ``OhemCrossEntropy``.

    Among the valid (non-ignored) pixels, sort by the softmax probability of
    the ground-truth class; the threshold is ``max(p[min_kept], thresh)``
    where ``p[min_kept]`` is the probability at rank ``min_kept`` (clamped to
    the last pixel). Pixels with probability below it are kept and the loss
    is the plain mean of their cross-entropy, so at least about ``min_kept``
    of the hardest pixels always count. Class weights scale each pixel's
    loss, but, as in HRNet, the mean divides by the number of kept pixels,
    not by their summed weights as ``F.cross_entropy`` does.

    Where HRNet would return NaN (no valid pixel, or none below the
    threshold) this returns ``0 * logits.sum()``: zero, with a graph, so
    ``backward`` still works.
    """

    def __init__(self, ignore_index: int = 255, thresh: float = 0.9, min_kept: int = 131072,
                 weight: Sequence[float] | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.thresh = thresh
        self.min_kept = max(1, int(min_kept))
        self.register_buffer("weight", _weight_tensor(weight), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        pixel_losses = F.cross_entropy(logits, target, weight=_on(self.weight, logits),
                                       ignore_index=self.ignore_index,
                                       reduction="none").reshape(-1)
        valid = target.reshape(-1) != self.ignore_index
        if not valid.any():
            return 0 * logits.sum()
        with torch.no_grad():
            if self.weight is None:  # the unweighted loss is -log p(gt): no second softmax needed
                prob = torch.exp(-pixel_losses[valid])
            else:
                gt = target.masked_fill(target == self.ignore_index, 0).unsqueeze(1)
                prob = F.softmax(logits, dim=1).gather(1, gt).reshape(-1)[valid]
            # HRNet sorts every pixel to read one order statistic; kthvalue finds it without the sort.
            rank = min(self.min_kept, prob.numel() - 1)
            min_value = prob.kthvalue(rank + 1).values
            keep = prob < torch.clamp(min_value, min=self.thresh)
        kept = pixel_losses[valid][keep]
        if kept.numel() == 0:
            return 0 * logits.sum()
        return kept.mean()


def build_loss(name: str, ignore_index: int = 255, **opts) -> nn.Module:
    """``"ce"`` -> :class:`CrossEntropy`; ``"ohem"`` -> :class:`OhemCrossEntropy`.

    ``opts`` go to the constructor (``weight``; for OHEM also ``thresh`` and
    ``min_kept``). The OHEM settings are accepted and ignored for ``"ce"`` so
    a caller can always pass its configured values.
    """
    losses = {"ce": CrossEntropy, "ohem": OhemCrossEntropy}
    if name not in losses:
        raise UserError(f"unknown loss {name!r}; known losses: {', '.join(sorted(losses))}")
    if name == "ce":
        opts = {k: v for k, v in opts.items() if k not in ("thresh", "min_kept")}
    try:
        return losses[name](ignore_index=ignore_index, **opts)
    except TypeError as e:
        raise UserError(f"bad options for loss {name!r}: {e}") from None


def decoder_loss(model: nn.Module, decoder: Decoder, features: dict, labels: torch.Tensor, criterion,
                 device: torch.device, precision: str = "auto") -> torch.Tensor:
    """The training loss of one batch: the sum of ``decoder.losses`` (logits upsampled to the labels,
    plus any deep supervision), under ``precision``'s autocast (:func:`fusion_seg.device.autocast`).

    ``model`` is ``decoder`` itself, or its DistributedDataParallel wrapper.
    """
    with autocast(device, precision):
        logits = model(features)
        loss = sum(decoder.losses(logits, labels, criterion).values())
    return loss

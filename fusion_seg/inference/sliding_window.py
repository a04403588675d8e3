"""Sliding-window inference: logits of an image larger than the training crop, tile by tile."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fusion_seg.progress import Progress

# Windows of one image (all its test-time passes together) from which predict and evaluate show their progress:
# the usual cases (Cityscapes' 1024x2048 with a 512x1024 or 769x769 crop) take about 10 and stay quiet, while a
# huge image with a small crop takes thousands, for minutes without a word otherwise.
PROGRESS_WINDOWS = 50


def window_grid(h: int, w: int, crop: tuple[int, int],
                stride: tuple[int, int] | None = None) -> tuple[list[int], list[int]]:
    """The top rows and left columns of the ``crop`` windows over an ``h`` x ``w`` image (padded bottom/right to
    the crop when smaller), every ``stride`` (default: HRNet's 2/3 crop); the last window is flush with the edge."""
    ch, cw = crop
    sh, sw = stride or (max(1, ch * 2 // 3), max(1, cw * 2 // 3))
    H, W = max(h, ch), max(w, cw)
    rows = max(1, math.ceil((H - ch) / sh) + 1)
    cols = max(1, math.ceil((W - cw) / sw) + 1)
    return [min(r * sh, H - ch) for r in range(rows)], [min(c * sw, W - cw) for c in range(cols)]


def sliding_window_logits(model: nn.Module, image: torch.Tensor, crop: tuple[int, int], num_classes: int,
                          stride: tuple[int, int] | None = None, progress: Progress | None = None) -> torch.Tensor:
    """HRNet's sliding-window inference: windows of ``crop`` every 2/3 crop, logits averaged where they overlap.

    ``progress`` (optional) advances by one per window."""
    _, _, h, w = image.shape
    ch, cw = crop
    padded = F.pad(image, (0, max(0, cw - w), 0, max(0, ch - h)))
    H, W = padded.shape[-2:]
    logits = torch.zeros(1, num_classes, H, W, device=image.device)
    count = torch.zeros(1, 1, H, W, device=image.device)
    rows, cols = window_grid(h, w, crop, stride)
    for y0 in rows:
        for x0 in cols:
            logits[..., y0:y0 + ch, x0:x0 + cw] += model(padded[..., y0:y0 + ch, x0:x0 + cw]).float()
            count[..., y0:y0 + ch, x0:x0 + cw] += 1
            if progress is not None:
                progress.update(1)
    return (logits / count)[..., :h, :w]

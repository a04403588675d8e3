"""Sliding-window inference: logits of an image larger than the training crop, tile by tile."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sliding_window_logits(model: nn.Module, image: torch.Tensor, crop: tuple[int, int], num_classes: int,
                          stride: tuple[int, int] | None = None) -> torch.Tensor:
    """HRNet's sliding-window inference: windows of ``crop`` every 2/3 crop, logits averaged where they overlap."""
    _, _, h, w = image.shape
    ch, cw = crop
    sh, sw = stride or (max(1, ch * 2 // 3), max(1, cw * 2 // 3))
    ph, pw = max(0, ch - h), max(0, cw - w)
    padded = F.pad(image, (0, pw, 0, ph))
    H, W = padded.shape[-2:]
    logits = torch.zeros(1, num_classes, H, W, device=image.device)
    count = torch.zeros(1, 1, H, W, device=image.device)
    rows = max(1, math.ceil((H - ch) / sh) + 1)
    cols = max(1, math.ceil((W - cw) / sw) + 1)
    for r in range(rows):
        for c in range(cols):
            y0, x0 = min(r * sh, H - ch), min(c * sw, W - cw)
            logits[..., y0:y0 + ch, x0:x0 + cw] += model(padded[..., y0:y0 + ch, x0:x0 + cw]).float()
            count[..., y0:y0 + ch, x0:x0 + cw] += 1
    return (logits / count)[..., :h, :w]

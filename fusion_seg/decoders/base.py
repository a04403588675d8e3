"""Helpers shared by the decoders (``reverse-hrnet``, ``linear``, ``fpn``, ``eseg``, ``frm``, ``exfuse``).

They follow the conventions of the reverse HRNet decoder: feature maps are
selected by ``ShapeSpec.stride`` (never by name or width), a missing stride
is a :class:`UserError` that lists what the cache holds and says to
re-extract with ``--strides``, and weights are initialised as there
(Kaiming fan-out convs, unit norms, a normal(std=0.001) classifier).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec


def select_features(input_shapes: dict[str, ShapeSpec], strides: Sequence[int],
                    decoder: str, hint: str = "") -> list[str]:
    """Names of the feature maps at ``strides`` (matched on ``ShapeSpec.stride``), in that order."""
    by_stride = {spec.stride: name for name, spec in input_shapes.items()}
    missing = [s for s in strides if s not in by_stride]
    if missing:
        available = ", ".join(f"{n} (stride {s.stride})" for n, s in
                              sorted(input_shapes.items(), key=lambda kv: kv[1].stride))
        need = ", ".join(str(s) for s in missing)
        what = f"stride-{need} map" if len(missing) == 1 else f"maps at strides {need}"
        raise UserError(f"the {decoder} decoder needs the {what} (available: "
                        f"{available or 'none'}); re-extract with stride {need} in --strides{hint}.")
    return [by_stride[s] for s in strides]


def check_preset(decoder: str, preset: str, presets: Iterable[str]) -> None:
    if preset not in presets:
        raise UserError(f"unknown {decoder} preset {preset!r}; choose one of {', '.join(presets)}")


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise UserError(f"{name} must be >= 1, got {value}")


def init_weights(module: nn.Module, classifiers: Iterable[nn.Conv2d]) -> None:
    """Kaiming fan-out convs and unit norms (as ``ReverseHRNet``); tiny normal classifiers.

    Only ``nn.Conv2d`` and 2-D norms are touched: ``nn.Linear`` layers inside
    timm transformer blocks keep timm's own initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for classifier in classifiers:
        nn.init.normal_(classifier.weight, std=0.001)
        if classifier.bias is not None:
            nn.init.zeros_(classifier.bias)


def norm_layer(norm: str) -> str:
    """timm norm-layer name for ``norm``: ``"bn"`` (BatchNorm) or ``"gn"`` (GroupNorm, 32 groups)."""
    names = {"bn": "batchnorm", "gn": "groupnorm"}
    if norm not in names:
        raise UserError(f"norm must be one of {', '.join(names)}, got {norm!r}")
    return names[norm]


def check_group_norm(norm: str, **widths: int) -> None:
    """GroupNorm uses 32 groups: with ``norm="gn"`` every width must be a multiple of 32."""
    if norm != "gn":
        return
    for name, width in widths.items():
        if width % 32:
            raise UserError(f"{name}={width} is not a multiple of 32, which norm='gn' "
                            f"(GroupNorm, 32 groups) needs; pick another width or norm='bn'")


def upsample_nearest(x: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of ``x`` to ``size`` (FPN's top-down upsampling, size-matched)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="nearest")


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of decoder logits to the label size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

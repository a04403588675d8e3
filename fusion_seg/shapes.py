"""What a feature map looks like, independent of the tensor: detectron2's ShapeSpec."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride (reduction relative to the input) of one feature map."""

    channels: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def feature_name(stride: int) -> str:
    """The canonical key of the feature map at ``stride`` (``"s4"`` for stride 4)."""
    return f"s{stride}"


def shapes_from_feature_info(feature_info: list[dict]) -> dict[str, ShapeSpec]:
    """``{name: ShapeSpec}`` from timm-style ``[{"num_chs": C, "reduction": s}, ...]``."""
    out: dict[str, ShapeSpec] = {}
    for info in feature_info:
        spec = ShapeSpec(int(info["num_chs"]), int(info["reduction"]))
        out[feature_name(spec.stride)] = spec
    return out

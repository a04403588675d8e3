"""An encoder's identity: everything that determines the features it produces.

It is recorded wherever features or models are stored (store specs, checkpoints), so that a
cache or checkpoint is never silently combined with another encoder:

- ``tag``: the timm model name (e.g. ``resnet50.fb_ssl_yfcc100m_ft_in1k``);
- ``weights``: where the weights came from (timm pretrained tag, a file, or
  ``random-init:SEED``), and ``weights_sha256``, a hash of the loaded state
  dict's contents, which is what identity comparisons use;
- ``mean`` / ``std``: the input normalisation;
- ``features``: name, channels and stride of every map (timm's ``feature_info``);
- ``precision``: the forward's, ``fp32`` or ``bf16`` (``--precision``): bf16 features differ from fp32 ones in
  their low bits, so stores and runs of the two are never combined. Written only when it is bf16, so that
  every store and checkpoint made before it existed (all fp32) reads, resumes and hashes as before.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from fusion_seg.shapes import ShapeSpec

if TYPE_CHECKING:
    import torch

DEFAULT_ENCODER = "resnet50.fb_ssl_yfcc100m_ft_in1k"



DEFAULT_STRIDES = (2, 4, 8, 16, 32)



@dataclass(frozen=True)
class EncoderIdentity:
    """Everything that determines the features an encoder produces."""

    tag: str
    weights: str
    weights_sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    features: tuple[dict, ...]  # ({"name", "channels", "stride"}, ...) in stride order
    init: dict = field(default_factory=dict)
    precision: str = "fp32"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"], d["features"] = list(self.mean), list(self.std), list(self.features)
        if self.precision == "fp32":
            del d["precision"]  # as every record before --precision: the same spec, hash and checkpoint
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderIdentity":
        return cls(
            tag=d["tag"],
            weights=d["weights"],
            weights_sha256=d["weights_sha256"],
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            features=tuple(dict(f) for f in d["features"]),
            init=dict(d.get("init", {})),
            precision=d.get("precision", "fp32"),
        )

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "EncoderIdentity":
        """The identity of the encoder a decoder checkpoint was trained on (stored as ``to_dict()``)."""
        return cls.from_dict(ckpt["encoder"])

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {f["name"]: ShapeSpec(f["channels"], f["stride"]) for f in self.features}

    def differences(self, other: "EncoderIdentity") -> list[str]:
        """Human-readable list of what differs (empty when the features are interchangeable).

        The weights' *source* (a path, a tag) is not compared, only their content hash; it is shown
        when the hashes differ, so the message says which weights met (``weights random-init:1 vs
        random-init:0``), with the start of each hash. Each item reads "``self``'s vs ``other``'s".
        """
        diffs = []
        if self.tag != other.tag:
            diffs.append(f"architecture {self.tag} vs {other.tag}")
        if self.weights_sha256 != other.weights_sha256:
            sources = (f"{self.weights} vs {other.weights}" if self.weights != other.weights
                       else f"both {self.weights}, with other contents")
            diffs.append(f"weights {sources} (weights_sha256 {self.weights_sha256[:12]}... vs "
                         f"{other.weights_sha256[:12]}...)")
        for key in ("mean", "std"):
            a, b = getattr(self, key), getattr(other, key)
            if tuple(a) != tuple(b):
                diffs.append(f"{key} {list(a)} vs {list(b)}")  # the input normalisation
        mine = {f["name"]: f for f in self.features}
        theirs = {f["name"]: f for f in other.features}
        for name in sorted(set(mine) & set(theirs)):
            if mine[name] != theirs[name]:
                keys = sorted(set(mine[name]) | set(theirs[name]))
                diffs += [f"feature {name} {k} {mine[name].get(k)} vs {theirs[name].get(k)}" for k in keys
                          if mine[name].get(k) != theirs[name].get(k)]
        if self.precision != other.precision:
            diffs.append(f"forward precision {self.precision} vs {other.precision} (--precision)")
        return diffs



def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict, independent of the file format it came from.

    BN's ``num_batches_tracked`` counters are skipped: they do not change the features.
    """
    import torch  # here: the identity itself is torch-free, so a store's spec reads it without torch

    h = hashlib.sha256()
    for key in sorted(k for k in state_dict if not k.endswith("num_batches_tracked")):
        t = state_dict[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

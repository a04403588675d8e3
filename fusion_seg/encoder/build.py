"""The frozen encoder: a timm ``features_only`` backbone and its identity.

The encoder is always frozen (eval mode, ``requires_grad=False``) and is run
under ``torch.inference_mode()``. Its *identity* is recorded wherever features
or models are stored, so that a cache or checkpoint can never be silently
combined with a different encoder:

- ``tag``: the timm model name (e.g. ``resnet50.fb_ssl_yfcc100m_ft_in1k``);
- ``weights``: where the weights came from (timm pretrained tag, a file, or
  ``random-init:SEED``), and ``weights_sha256``, a hash of the loaded state
  dict's contents, which is what identity comparisons use;
- ``mean`` / ``std``: the input normalisation;
- ``features``: name, channels and stride of every map (timm's ``feature_info``).

Weights come from exactly one of: the timm pretrained tag (needs the
internet), ``weights_file`` (``.pth``/``.safetensors``, timm or torchvision key
layout, strict), or an explicit ``random_init`` with a seed. There is no silent
fallback from one to another.

The default tag is the paper's semi-supervised ResNet-50 (Yalniz et al. 2019),
released under CC-BY-NC 4.0 (non-commercial use only).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from fusion_seg.errors import CheckpointError, UserError
from fusion_seg.shapes import ShapeSpec, feature_name

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"], d["features"] = list(self.mean), list(self.std), list(self.features)
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
        )

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
        return diffs


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict, independent of the file format it came from.

    BN's ``num_batches_tracked`` counters are skipped: they do not change the features.
    """
    h = hashlib.sha256()
    for key in sorted(k for k in state_dict if not k.endswith("num_batches_tracked")):
        t = state_dict[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file not found: {path}. Pass an existing .pth or .safetensors file to --weights.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a weights file at all
        raise CheckpointError(
            f"cannot read weights file {path}: {exc}. "
            "It must be a .safetensors file or a .pth state dict saved with torch.save; re-download it."
        ) from exc
    # Unwrap the usual containers ({"state_dict": ...}, {"model": ...}).
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors; --weights expects model weights.")
    # DataParallel / DDP prefixes.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strictly load a full-model (timm or torchvision layout) state dict into a features_only model.

    timm's ResNet keys equal torchvision's; the classifier (``fc.*``) is not part of a
    ``features_only`` model and is dropped. Any other missing or unexpected key is an error.
    """
    own = model.state_dict()
    classifier = {k for k in state if k not in own and k.split(".")[0] in ("fc", "head", "classifier")}
    state = {k: v for k, v in state.items() if k not in classifier}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatch: {show(wrong_shape)}")
        raise CheckpointError(
            f"weights file {path} does not match the encoder architecture: {'; '.join(parts)}. "
            "Check that --encoder names the architecture these weights were trained for."
        )
    model.load_state_dict(state, strict=True)


def _out_indices(model_name: str, strides: tuple[int, ...]) -> tuple[int, ...]:
    probe = timm.create_model(model_name, pretrained=False, features_only=True)
    by_stride = {info["reduction"]: i for i, info in enumerate(probe.feature_info.get_dicts())}
    unknown = [s for s in strides if s not in by_stride]
    if unknown:
        raise UserError(
            f"encoder {model_name} has no feature map at stride(s) {unknown}; available strides: "
            f"{sorted(by_stride)}. Adjust --strides."
        )
    return tuple(by_stride[s] for s in strides)


class FrozenEncoder(nn.Module):
    """A frozen timm ``features_only`` backbone returning ``{"s4": tensor, ...}``."""

    def __init__(self, model: nn.Module, identity: EncoderIdentity):
        super().__init__()
        self.model = model
        self.identity = identity
        self.names = [f["name"] for f in identity.features]
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # Frozen means frozen: BN statistics never update, even inside model.train().
        super().train(mode)
        self.model.eval()
        return self

    def output_shape(self) -> dict[str, ShapeSpec]:
        return self.identity.output_shape()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.model(images)))


def build_encoder(
    tag: str = DEFAULT_ENCODER,
    *,
    weights_file: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    strides: tuple[int, ...] = DEFAULT_STRIDES,
) -> FrozenEncoder:
    """Build the frozen encoder from exactly one weights source."""
    if weights_file is not None and random_init:
        raise UserError("--weights and --random-init are mutually exclusive; pick one weights source.")
    strides = tuple(sorted(int(s) for s in strides))
    architecture = tag.split(".")[0]
    try:
        indices = _out_indices(architecture, strides)
    except RuntimeError as exc:  # timm: unknown model name
        raise UserError(f"unknown timm encoder {tag!r}: {exc}") from exc
    init: dict = {}
    if random_init:
        # timm's default zero_init_last=True zeroes every bottleneck's last BN, which turns a
        # random ResNet into a shallow projection; features are markedly better without it.
        kwargs = {"zero_init_last": False} if architecture.startswith(("resnet", "resnext", "wide_resnet")) else {}
        torch.manual_seed(seed)
        model = timm.create_model(architecture, pretrained=False, features_only=True, out_indices=indices, **kwargs)
        source = f"random-init:{seed}"
        init = {"random_init": True, "seed": seed, **kwargs}
    elif weights_file is not None:
        path = Path(weights_file)
        model = timm.create_model(architecture, pretrained=False, features_only=True, out_indices=indices)
        _load_weights_strict(model, _read_weights_file(path), path)
        source = f"file:{path.name}"
    else:
        try:
            model = timm.create_model(tag, pretrained=True, features_only=True, out_indices=indices)
        except Exception as exc:  # offline, hub unreachable, unknown tag
            raise UserError(
                f"could not load pretrained weights for {tag!r} ({type(exc).__name__}: {exc}). "
                "Without internet access pass --weights FILE (.pth or .safetensors), "
                "or --random-init --seed N for an explicitly random encoder."
            ) from exc
        source = f"timm:{tag}"
    cfg = model.pretrained_cfg
    features = tuple(
        {"name": feature_name(info["reduction"]), "channels": int(info["num_chs"]), "stride": int(info["reduction"])}
        for info in model.feature_info.get_dicts()
    )
    identity = EncoderIdentity(
        tag=tag,
        weights=source,
        weights_sha256=state_dict_sha256(model.state_dict()),
        mean=tuple(float(x) for x in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(x) for x in cfg.get("std", (0.229, 0.224, 0.225))),
        features=features,
        init=init,
    )
    return FrozenEncoder(model, identity)


IMAGE_TAG = "image"  # the identity "encoder" of end-to-end models (the HRNet baseline)


class _ImageAsFeature(nn.Module):
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images]


def build_image_encoder() -> FrozenEncoder:
    """The identity encoder: hands the normalised image to models that train their own stem."""
    identity = EncoderIdentity(tag=IMAGE_TAG, weights="none", weights_sha256="none",
                               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                               features=({"name": IMAGE_TAG, "channels": 3, "stride": 1},))
    return FrozenEncoder(_ImageAsFeature(), identity)


def rebuild_encoder(identity: EncoderIdentity, weights_file: str | Path | None = None) -> FrozenEncoder:
    """Rebuild the encoder a cache or checkpoint was made with, and prove it is the same one."""
    if identity.tag == IMAGE_TAG:
        return build_image_encoder()
    strides = tuple(f["stride"] for f in identity.features)
    if weights_file is not None:
        encoder = build_encoder(identity.tag, weights_file=weights_file, strides=strides)
    elif identity.init.get("random_init"):
        encoder = build_encoder(identity.tag, random_init=True, seed=int(identity.init["seed"]), strides=strides)
    elif identity.weights.startswith("file:"):
        raise UserError(
            f"this model's encoder weights came from the file {identity.weights[5:]!r}; pass it with --weights FILE."
        )
    else:
        encoder = build_encoder(identity.tag, strides=strides)
    diffs = identity.differences(encoder.identity)
    if diffs:
        raise CheckpointError(
            "the encoder does not match the one the features/decoder were made with: "
            + "; ".join(diffs)
            + ". Pass the original weights with --weights, or re-extract/retrain with these weights."
        )
    return encoder


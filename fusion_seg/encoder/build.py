"""The frozen encoder: a timm ``features_only`` backbone that describes itself (its identity).

The encoder is always frozen (eval mode, ``requires_grad=False``) and is run
under ``torch.inference_mode()``. Its identity (identity.py) is recorded wherever
features or models are stored.

Weights come from exactly one of: the timm pretrained tag (needs the
internet), ``weights_file`` (``.pth``/``.safetensors``, timm or torchvision key
layout, strict), or an explicit ``random_init`` with a seed. There is no silent
fallback from one to another.

The default tag is the paper's semi-supervised ResNet-50 (Yalniz et al. 2019),
released under CC-BY-NC 4.0 (non-commercial use only).
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import timm
import torch
from torch import nn

from fusion_seg.encoder.identity import DEFAULT_ENCODER, DEFAULT_STRIDES, EncoderIdentity, state_dict_sha256
from fusion_seg.encoder.weights import load_weights_strict, read_weights_file
from fusion_seg.errors import CheckpointError, UserError
from fusion_seg.shapes import ShapeSpec, feature_name


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


HUB_TIMEOUT = 5.0  # seconds to wait for the model hub's TCP handshake before taking the machine as offline


def _create_pretrained(tag: str, out_indices: tuple[int, ...]) -> nn.Module:
    """timm's ``features_only`` model of ``tag`` with its pretrained weights (downloaded unless cached).

    The one call that may need the internet: a test replaces this function to play an offline machine.
    """
    return timm.create_model(tag, pretrained=True, features_only=True, out_indices=out_indices)


def hub_unreachable() -> str | None:
    """Why the model hub (huggingface_hub's endpoint, ``HF_ENDPOINT``) cannot be reached, or None when it can:
    ``HF_HUB_OFFLINE`` is set, or one TCP connection fails within :data:`HUB_TIMEOUT` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or type(exc).__name__})"
    return None


@contextlib.contextmanager
def _hub_offline():
    """huggingface_hub in offline mode for the ``with`` block: the cache only, no request and no retries
    (without it, an unreachable hub costs about 50 s of retries before the error)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _load_pretrained(tag: str, indices: tuple[int, ...]) -> nn.Module:
    """``tag``'s pretrained model: downloaded (or from the local cache) when the hub can be reached, else
    from the local cache alone, failing at once with one line when the weights are not there."""
    fix = ("Without internet access pass --weights FILE (.pth or .safetensors), or --random-init --seed N for an "
           "explicitly random encoder.")
    unreachable = hub_unreachable()
    try:
        with _hub_offline() if unreachable else contextlib.nullcontext():
            return _create_pretrained(tag, indices)
    except Exception as exc:  # offline and not cached, hub error, unknown tag
        if unreachable:
            raise UserError(f"could not load pretrained weights for {tag!r}: the model hub is offline "
                            f"({unreachable}) and they are not in the local cache. {fix}") from exc
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise UserError(f"could not load pretrained weights for {tag!r} ({type(exc).__name__}: {reason}). "
                        f"{fix}") from exc


class FrozenEncoder(nn.Module):
    """A frozen timm ``features_only`` backbone returning ``{"s4": tensor, ...}``.

    Its forward runs in ``identity.precision`` (fp32, or bf16 autocast: :meth:`with_precision`), whatever
    autocast its caller is in, so that the features are what the identity says.
    """

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

    def with_precision(self, precision: str) -> "FrozenEncoder":
        """This encoder, running its forward in ``precision`` (``fp32`` or ``bf16``; resolve ``auto`` first with
        :func:`fusion_seg.device.resolve_precision`), which its identity then records."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}: fp32 or bf16 (resolve auto against the device first)")
        self.identity = dataclasses.replace(self.identity, precision=precision)
        return self

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        bf16 = self.identity.precision == "bf16"
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
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
        load_weights_strict(model, read_weights_file(path), path)
        source = f"file:{path.name}"
    else:
        model = _load_pretrained(tag, indices)
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
    # The same weights are the same encoder at any precision: the caller picks the one it runs in.
    diffs = dataclasses.replace(identity, precision=encoder.identity.precision).differences(encoder.identity)
    if diffs:
        raise CheckpointError(
            "the encoder does not match the one the features/decoder were made with: "
            + "; ".join(diffs)
            + ". Pass the original weights with --weights, or re-extract/retrain with these weights."
        )
    return encoder


"""Encoder weight files (``.pth`` / ``.safetensors``, timm or torchvision key layout), loaded strictly."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fusion_seg.errors import CheckpointError, UserError

def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
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
            f"cannot read weights file {path} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}). "
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



def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
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

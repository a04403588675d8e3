"""``--init``: start a decoder from one trained on another dataset (the paper's two-stage schedules)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.decoders import decoder_from_record
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import CheckpointError


def class_dependent_keys(record: dict) -> set[str]:
    """State-dict keys whose shape depends on the number of classes (classifiers, auxiliary heads)."""
    n = int(record["num_classes"])
    a = decoder_from_record(record).state_dict()
    b = decoder_from_record({**record, "num_classes": n + 1}).state_dict()
    return {k for k in a if a[k].shape != b[k].shape}


def init_from_checkpoint(decoder: nn.Module, path: str, record: dict, classes: list[str], encoder: EncoderIdentity) -> dict:
    """Start ``decoder`` from a decoder trained on another dataset (the paper's two-stage schedules).

    Everything carries over when the class lists are equal; otherwise the class-dependent
    layers (the classifier) keep their fresh initialisation. The encoder must be the same,
    and so must the architecture. Returns what the run records about its start (``init``).
    """
    ckpt = load_checkpoint(path)
    enc_diffs = EncoderIdentity.from_checkpoint(ckpt).differences(encoder)
    if enc_diffs:
        raise CheckpointError(f"--init {path} was trained on features of another encoder: " + "; ".join(enc_diffs)
                              + ". Extract both datasets with the same encoder and weights.")
    theirs = ckpt["decoder"]
    if (theirs["name"], theirs["config"], theirs["input_shapes"]) != (record["name"], record["config"],
                                                                      record["input_shapes"]):
        raise CheckpointError(f"--init {path} holds decoder {theirs['name']} {theirs['config']}, not "
                              f"{record['name']} {record['config']}; train with the same --decoder settings.")
    same_classes = list(ckpt["classes"]) == list(classes)
    skip = set() if same_classes else class_dependent_keys(record)
    state = {k: v for k, v in ckpt["model"].items() if k not in skip}
    decoder.load_state_dict(state, strict=same_classes)
    return {"checkpoint": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "classes": list(ckpt["classes"]), "dataset": ckpt["data"].get("dataset", {}).get("name"),
            "reinitialised": sorted(skip)}

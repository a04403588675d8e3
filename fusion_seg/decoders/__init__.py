"""Segmentation decoders, built by name from the backbone's feature shapes.

As in detectron2, a decoder is built from ``input_shapes: dict[str, ShapeSpec]``
(never hard-coded widths) and consumes ``dict[str, Tensor]`` keyed the same
way. Every decoder is a :class:`~fusion_seg.decoders.base.Decoder` and exposes
``config`` (JSON-able; ``build_decoder(name, input_shapes, num_classes,
**decoder.config)`` rebuilds the same architecture, which is what checkpoints
store), ``in_features`` (the maps it reads), ``output_stride`` (stride of its
logits), ``required_strides`` and ``losses``. Each registers itself in
``DECODERS`` with ``@register_decoder(name)`` where it is defined.
"""
from __future__ import annotations

import difflib
import inspect
import json

# Importing the decoder modules registers them; DECODERS lists them in this order (what the CLI shows).
from fusion_seg.decoders.base import DECODERS, Decoder, check_input_shapes, register_decoder
from fusion_seg.decoders.reverse_hrnet import ReverseHRNet
from fusion_seg.decoders.linear import LinearProbe
from fusion_seg.decoders.fpn import SemanticFPN
from fusion_seg.decoders.eseg import ESeg
from fusion_seg.decoders.frm import FRM
from fusion_seg.decoders.exfuse import ExFuse
from fusion_seg.decoders.hrnet_baseline import HRNetBaseline
from fusion_seg.errors import UserError
from fusion_seg.options import keyword_errors
from fusion_seg.shapes import ShapeSpec


def build_decoder(name: str, input_shapes: dict[str, ShapeSpec], num_classes: int,
                  **config) -> Decoder:
    """Instantiate the decoder registered as ``name`` for the feature maps ``input_shapes``
    (``{name: ShapeSpec(channels, stride)}``) and ``num_classes`` classes."""
    check_input_shapes(input_shapes, num_classes)
    check_options(name, config)
    return DECODERS[name](input_shapes, num_classes, **config)


def option_problems(name: str, config: dict) -> list[str]:
    """What is wrong with ``config`` as the options of the decoder ``name``, one message each: an unknown
    decoder, an option it does not take (with the closest it does), a value of the wrong type
    (``widths="abc"``, ``streams=4.5``); checked against its constructor's keyword arguments."""
    if name not in DECODERS:
        return [f"unknown decoder {name!r}; known decoders: {', '.join(sorted(DECODERS))}."]
    return keyword_errors(DECODERS[name], config, f"decoder {name!r}", keyword_only=True)


def check_options(name: str, config: dict) -> None:
    """Raise :func:`option_problems` as one UserError, before anything is built: options the decoder does not
    take, listing those it does (with the closest to a misspelt one), or values of the wrong type, shown as
    they are typed (``--decoder-opt`` / a recipe's keys)."""
    if name not in DECODERS:
        raise UserError(option_problems(name, config)[0])
    params = inspect.signature(DECODERS[name]).parameters
    options = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(config) - set(options))
    if unknown and not any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values()):
        close = [m for u in unknown for m in difflib.get_close_matches(u, options, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"decoder {name!r} has no option(s) {', '.join(unknown)}{hint}; its options: "
                        f"{', '.join(options) or 'none'}")
    problems = option_problems(name, config)
    if problems:
        shown = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in config.items())
        raise UserError(f"decoder {name!r} options ({shown}): {' '.join(problems)}")


__all__ = ["DECODERS", "Decoder", "ESeg", "ExFuse", "FRM", "HRNetBaseline", "LinearProbe", "ReverseHRNet",
           "SemanticFPN", "build_decoder", "decoder_from_record", "decoder_record", "option_problems",
           "register_decoder"]


def decoder_from_record(record: dict) -> Decoder:
    """Rebuild a decoder from the ``{"name", "num_classes", "config", "input_shapes"}`` record a checkpoint holds."""
    shapes = {k: ShapeSpec(int(c), int(s)) for k, (c, s) in record["input_shapes"].items()}
    return build_decoder(record["name"], shapes, int(record["num_classes"]), **record["config"])


def decoder_record(name: str, decoder: Decoder, input_shapes: dict[str, ShapeSpec], num_classes: int) -> dict:
    return {"name": name, "num_classes": num_classes, "config": decoder.config,
            "input_shapes": {k: [v.channels, v.stride] for k, v in input_shapes.items()}}

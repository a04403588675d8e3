"""Checking one pipeline stage without running it or reading its inputs (:func:`check_stage`): its keys and
types against its schema (schema.py), the dataset's and the decoder's options, extract's ranges, the
encoder's strides, and the decoder built on the ``meta`` device (no memory, no weights), as training builds
it. A recipe checks every stage this way before any runs (recipes.py).
"""
from __future__ import annotations

from fusion_seg.errors import UserError
from fusion_seg.options import Option, check_keys, parameters, show_value
from fusion_seg import requests
from fusion_seg.pipeline.schema import stage_schema, trainer_keys
from fusion_seg.training.config import DECODER_KEYS, train_config


def dataset_errors(name, options) -> list[str]:
    """Whether ``name`` is a registered dataset and ``options`` its options (as build_dataset checks them)."""
    from fusion_seg.data.datasets import DATASETS

    if not isinstance(name, str):
        return []  # a type error, reported with the other keys
    if name not in DATASETS:
        return [f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}."]
    if not isinstance(options, dict):
        return []
    schema = {k: v for k, v in parameters(DATASETS[name]).items() if k not in ("root", "split")}
    schema["limit"] = Option("limit", int, None)  # build_dataset's own, for every file dataset; so are:
    schema["sequences"] = Option("sequences", str | list[str], None)
    schema["ids_file"] = Option("ids_file", str, None)
    return [f"dataset_options: {e}" for e in check_keys(options, schema, "option", f"dataset {name!r}")]


def decoder_option_errors(name, config: dict) -> list[str]:
    """Whether ``name`` is a registered decoder and ``config`` its options (names and types)."""
    from fusion_seg.decoders import option_problems

    return option_problems(name, config) if isinstance(name, str) else []


def encoder_shapes(tag: str, strides) -> dict:
    """``{name: ShapeSpec}`` the encoder ``tag`` gives at ``strides``, from timm's feature info on the
    ``meta`` device (no memory, no weights). UserError for an unknown encoder or stride."""
    import timm
    import torch

    from fusion_seg.shapes import ShapeSpec, feature_name

    architecture = str(tag).split(".")[0]
    try:
        with torch.device("meta"):
            probe = timm.create_model(architecture, pretrained=False, features_only=True)
    except RuntimeError as exc:  # timm: unknown model name
        raise UserError(f"unknown timm encoder {tag!r}: {exc}") from None
    by_stride = {int(i["reduction"]): int(i["num_chs"]) for i in probe.feature_info.get_dicts()}
    unknown = [s for s in strides if s not in by_stride]
    if unknown:
        raise UserError(f"encoder {architecture} has no feature map at stride(s) {unknown}; available strides: "
                        f"{sorted(by_stride)}. Adjust strides.")
    return {feature_name(s): ShapeSpec(by_stride[s], s) for s in sorted({int(s) for s in strides})}


def build_check(decoder: str, config: dict, input_shapes: dict, num_classes: int = 2) -> str | None:
    """Build the decoder on the ``meta`` device, as training will; None when it builds, else why not."""
    import torch

    from fusion_seg.decoders import build_decoder

    if config.get("pretrained"):
        return None  # would download weights; its options were checked by name and type
    if not input_shapes:
        return None
    from fusion_seg.training.train import check_trainable_size

    try:
        with torch.device("meta"):
            check_trainable_size(build_decoder(decoder, input_shapes, num_classes, **config), decoder, config)
    except UserError as exc:
        return str(exc)
    except Exception as exc:  # a value of the right type the decoder still cannot use
        return f"decoder {decoder!r} cannot be built with {show_value(config)}: {type(exc).__name__}: {exc}"
    return None


def check_stage(stage: dict, *, shapes=None, num_classes: int = 2) -> list[str]:
    """Everything that can be checked about one stage without running it or reading its inputs.

    ``shapes``: the ``{name: ShapeSpec}`` a train stage's cache will hold (from the extract stage that
    makes it, or the store on disk), to build its decoder; None: not known, built only online.
    Returns one message per problem (without the stage's name: the caller adds it).
    """
    kind = stage.get("kind")
    body = {k: v for k, v in stage.items() if k != "kind"}
    online = kind == "train" and body.get("online") is True
    schema = stage_schema(kind, online=online)
    errors = check_keys(body, schema)
    if kind == "train" and not online and "cache" not in body and any(k in body for k in ("dataset", "root")):
        errors.append("a train stage reads a cache (cache = STORE) or, with online = true, images; "
                      "add online = true to train from dataset images.")
    typed = not errors  # range checks and builds only once the names and types are right
    if "dataset" in body:
        errors += dataset_errors(body["dataset"], body.get("dataset_options") or {})
    if kind == "extract" and typed:
        errors += _extract_range_errors(body)
        try:
            encoder_shapes(body.get("encoder", schema["encoder"].default), body.get("strides",
                                                                                    schema["strides"].default))
        except UserError as exc:
            errors.append(str(exc))
    if kind == "train":
        config = {k: body[k] for k in DECODER_KEYS if body.get(k) is not None}
        if isinstance(body.get("decoder_options"), dict):
            config.update(body["decoder_options"])
        if isinstance(body.get("decoder_config"), dict):
            config = {**body["decoder_config"], **config}
        decoder = body.get("decoder", "reverse-hrnet")
        option_errors = decoder_option_errors(decoder, config)
        errors += option_errors
        if typed:
            leave = {"out", "online", "val_cache", "cache", *trainer_keys(online=online)}
            if option_errors:  # reported above; TrainConfig would report them again
                leave |= {*DECODER_KEYS, "decoder", "decoder_options", "decoder_config"}
            options, _ = requests.split_train_options(body, online=online)
            try:
                train_config({k: v for k, v in options.items() if k not in leave})
            except UserError as exc:
                errors.append(str(exc))
            except (TypeError, ValueError) as exc:
                errors.append(f"invalid training settings: {exc}")
        if typed and not option_errors:
            from fusion_seg.decoders import DECODERS

            if getattr(DECODERS[decoder], "end_to_end", False):
                from fusion_seg.encoder.build import IMAGE_TAG
                from fusion_seg.shapes import ShapeSpec

                shapes = {IMAGE_TAG: ShapeSpec(3, 1)} if online else shapes
            elif online:
                try:
                    shapes = encoder_shapes(body.get("encoder", schema["encoder"].default),
                                            body.get("strides", schema["strides"].default))
                except UserError as exc:
                    errors.append(str(exc))
                    shapes = None
            if shapes:
                problem = build_check(decoder, config, shapes, num_classes)
                if problem:
                    errors.append(problem)
    return errors


def _extract_range_errors(options: dict) -> list[str]:
    """extract()'s own range checks (``check_extract_arguments``) of a stage's requests, run without
    extracting anything."""
    from fusion_seg.extract.local import check_extract_arguments

    try:
        check_extract_arguments(**requests.extract_arguments(options))
    except UserError as exc:
        return [str(exc)]
    return []

"""One function per pipeline stage, taking plain keyword data (from a recipe or the CLI)."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from .errors import UserError

DECODER_KEYS = ("streams", "preset", "widths", "modules", "blocks")  # reverse-hrnet's; others via decoder_options
ONLINE_KEYS = ("dataset", "split", "root", "augment", "crop", "scale_range", "flip", "short_side", "size", "encoder",
               "weights", "random_init", "strides", "dataset_options")


def train_config(options: dict):
    """A TrainConfig from flat options; decoder architecture keys go into ``decoder_config``."""
    from .train import TrainConfig

    options = dict(options)
    names = {f.name for f in fields(TrainConfig)}
    decoder_config = {k: options.pop(k) for k in DECODER_KEYS if options.get(k) is not None}
    decoder_config.update(options.pop("decoder_options", None) or {})
    unknown = {k for k, v in options.items() if v is not None} - names
    if unknown:
        raise UserError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    kwargs = {k: v for k, v in options.items() if k in names and v is not None}
    kwargs["decoder_config"] = {**kwargs.get("decoder_config", {}), **decoder_config}
    return TrainConfig(**kwargs)


def _tuples(options: dict) -> dict:
    """TOML arrays -> the tuples the library functions take for sizes and ranges."""
    return {k: tuple(v) if k in ("crop", "size", "scale_range", "strides") and v is not None else v
            for k, v in options.items()}


def run_stage(stage: dict, *, progress: bool = True) -> dict:
    stage = dict(stage)
    kind = stage.pop("kind")
    if kind == "extract":
        from .extract import extract

        r = extract(**_tuples(stage), progress=progress)
        return {"store": r.store, "views": r.views_total, "written": r.views_written,
                "views_per_second": round(r.views_per_second, 3)}
    if kind == "train":
        from .train import train_decoder, train_online

        out, val_cache = stage.pop("out"), stage.pop("val_cache", None)
        resume = (Path(out) / "last.pt").exists()
        if stage.pop("online", False):
            # As on the command line: `crop` is the augmentation crop and `seed` seeds everything.
            images = _tuples({k: stage.pop(k) for k in ONLINE_KEYS if k in stage})
            cfg = train_config(stage)
            r = train_online(out, cfg, seed=cfg.seed, val_cache=val_cache, resume=resume, progress=progress, **images)
        else:
            cache = stage.pop("cache")
            r = train_decoder(cache, out, train_config(stage), val_cache=val_cache, resume=resume, progress=progress)
        return {"run_dir": r.run_dir, "steps": r.steps, "best_miou": r.best_miou,
                "final_loss": r.losses[-1] if r.losses else None, "seconds": round(r.seconds, 1)}
    if kind == "evaluate":
        from .infer import evaluate

        r = evaluate(**stage, progress=progress)
        return {"miou": r["miou"], "pixel_acc": r["pixel_acc"], "out": r["out"]}
    if kind == "predict":
        from .infer import predict

        stage["inputs"] = stage.pop("input")
        r = predict(**stage, progress=progress)
        return {"images": r["images"], "out": r["out"]}
    raise UserError(f"unknown stage kind {kind!r}")

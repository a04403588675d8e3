"""Running one pipeline stage (:func:`run_stage`): its plain keyword data (from a recipe) made into the
typed requests or the TrainConfig of the library function it calls, and that function's result as a small
record. What a stage accepts is schema.py's; checking it before anything runs, stage_checks.py's.
"""
from __future__ import annotations

from fusion_seg.errors import UserError
from fusion_seg import requests
from fusion_seg.pipeline.schema import trainer_keys
from fusion_seg.training.config import train_config


def run_stage(stage: dict, *, progress: bool = True) -> dict:
    stage = dict(stage)
    kind = stage.pop("kind")
    if kind == "extract":
        from fusion_seg.extract.local import extract

        r = extract(**requests.extract_arguments(stage), progress=progress)
        return {"store": r.store, "views": r.views_total, "written": r.views_written, "skipped": r.views_skipped,
                "views_per_second": round(r.views_per_second, 3)}
    if kind == "train":
        from fusion_seg.training.train import train_decoder, train_online

        out, val_cache = stage.pop("out"), stage.pop("val_cache", None)
        resume = "auto"  # continue the run in out only if it has these settings and this data (run_dir.py)
        if stage.pop("online", False):
            # As on the command line: `crop` is the augmentation crop and `seed` seeds everything.
            options, images = requests.split_train_options(stage, online=True)
            extra = {k: options.pop(k) for k in trainer_keys(online=True) if k in options}
            r = train_online(out, train_config(options), **requests.online_arguments(images), val_cache=val_cache,
                             resume=resume, progress=progress, **extra)
        else:
            cache = stage.pop("cache")
            extra = {k: stage.pop(k) for k in trainer_keys(online=False) if k in stage}
            r = train_decoder(cache, out, train_config(stage), val_cache=val_cache, resume=resume, progress=progress,
                              **extra)
        return {"run_dir": r.run_dir, "steps": r.steps, "steps_this_run": len(r.losses), "best_miou": r.best_miou,
                "final_loss": r.losses[-1] if r.losses else None, "seconds": round(r.seconds, 1),
                **({"previous_run_kept_as": r.previous_run} if r.previous_run else {}),
                **({"stopped_early": r.stopped_early} if r.stopped_early else {})}
    if kind == "evaluate":
        from fusion_seg.evaluation.evaluate import evaluate

        r = evaluate(**stage, progress=progress)
        return {"miou": r["miou"], "pixel_acc": r["pixel_acc"], "out": r["out"]}
    if kind == "predict":
        from fusion_seg.inference.predict import predict

        stage["inputs"] = stage.pop("input")
        r = predict(**stage, progress=progress)
        return {"images": r["images"], "out": r["out"]}
    raise UserError(f"unknown stage kind {kind!r}")

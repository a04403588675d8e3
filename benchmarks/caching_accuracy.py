"""What caching costs in accuracy, on CamVid val: cached views 1/2/4/8 against --online, and lossy storage.

Every run trains the same decoder with the same schedule: the same number of steps and
samples (``image_epochs`` passes over the 367 training images, so K cached views train
``image_epochs / K`` epochs over K*367 views), the same seed, the same batch. The K-view
runs read each image's first K views of one 8-view store (``--views K``): view k is drawn
from ``view_rng(seed, image, k)``, so these are exactly what a ``--views K`` extraction stores.
The online run draws a fresh augmentation every epoch. The storage runs extract the same
K views again with another ``--dtype`` and train the same way as the fp16 K-view run.

Images are resized to 240x180 (half of CamVid's 480x360) so that the whole study fits in
about an hour on a 2-core CPU; the encoder is a seeded random-init ResNet-50 (no pretrained
weights on the development machine). Results go to ``--out``/results.json; finished runs are
skipped when the script is re-run.

    python benchmarks/caching_accuracy.py --root ../shared/data/camvid
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fusion_seg.extract.local import extract
from fusion_seg.requests import extract_arguments, online_arguments
from fusion_seg.training.config import TrainConfig
from fusion_seg.training.train import train_decoder, train_online

COMMON = dict(dataset="camvid", encoder="resnet50", random_init=True, seed=0, size=(180, 240), batch_size=4)
AUG = dict(crop=(160, 224), scale_range=(0.5, 2.0), flip=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/camvid")
    ap.add_argument("--cache", default="cache/bench-accuracy")
    ap.add_argument("--out", default="runs/bench-accuracy")
    ap.add_argument("--image-epochs", type=int, default=16, help="Passes over the training images, per run.")
    ap.add_argument("--parts", default="views,online,storage")
    ap.add_argument("--storage-views", type=int, default=2, help="K of the lossy-storage runs.")
    args = ap.parse_args()
    cache, out = Path(args.cache), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save():
        results_path.write_text(json.dumps(results, indent=2))

    def once(key, fn):
        if key not in results:
            t = time.perf_counter()
            results[key] = fn() | {"seconds": round(time.perf_counter() - t, 1)}
            save()
            print(key, results[key], flush=True)
        return results[key]

    val = cache / "val.zarr"
    once("extract-val", lambda: _extract(args.root, "val", val, views=1, augment=False))
    cfg = dict(decoder="reverse-hrnet", batch_size=8, lr=0.01, seed=0, val_every=10**6, workers=2)
    parts = set(args.parts.split(","))
    if "views" in parts:
        train8 = cache / "train-8views.zarr"
        once("extract-train-8views", lambda: _extract(args.root, "train", train8, views=8))
        for k in (1, 2, 4, 8):
            c = TrainConfig(**cfg, views=k, epochs=args.image_epochs // k)
            once(f"views={k}", lambda: _train_cached(train8, val, out / f"views{k}", c))
    if "online" in parts:
        c = TrainConfig(**cfg, epochs=args.image_epochs)
        images = {k: v for k, v in {**COMMON, **AUG}.items() if k != "batch_size"}
        requests = online_arguments(dict(root=args.root, split="train", **images))
        once("online", lambda: _summary(train_online(out / "online", c, **requests, val_cache=str(val), resume=True,
                                                     progress=False)))
    if "storage" in parts:
        k = args.storage_views
        for dtype in ("bfloat16", "uint8"):
            store = cache / f"train-{k}views-{dtype}.zarr"
            once(f"extract-train-{k}views-{dtype}", lambda: _extract(args.root, "train", store, views=k, dtype=dtype))
            c = TrainConfig(**cfg, epochs=args.image_epochs // k)
            once(f"storage={dtype},views={k}", lambda: _train_cached(store, val, out / f"{dtype}-views{k}", c))
    print(json.dumps(results, indent=2))


def _extract(root, split, store, views, augment=True, **extra) -> dict:
    kw = dict(COMMON, **(AUG if augment else {}), **extra)
    r = extract(**extract_arguments(dict(root=root, split=split, out=store, views=views, augment=augment, **kw)),
                progress=False)
    return {"views": r.views_total, "views_per_second": round(r.views_per_second, 3)}


def _train_cached(store, val, run_dir, cfg) -> dict:
    return _summary(train_decoder(str(store), run_dir, cfg, val_cache=str(val), resume=True, progress=False))


def _summary(r) -> dict:
    return {"steps": r.steps, "val_miou": r.val["miou"], "val_pixel_acc": r.val["pixel_acc"],
            "train_seconds": round(r.seconds, 1)}


if __name__ == "__main__":
    main()

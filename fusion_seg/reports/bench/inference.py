"""Section 6: ``predict`` images/s end to end (read, encoder, decoder, upsample, write PNGs).

The checkpoint is a decoder trained for a few steps on the bench store (its weights do not
change the speed); the sliding window uses a crop of two thirds of the image in each
direction, HRNet's 2/3-crop stride, so it runs several windows per image.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fusion_seg.reports.bench.common import BenchConfig, data_label, images


def run(cfg: BenchConfig, store: Path, workdir: Path, count: int = 8) -> dict:
    from fusion_seg.inference.predict import predict
    from fusion_seg.reports.bench.common import build_frozen_encoder

    run_dir, crop = bench_checkpoint(cfg, store, workdir / "predict-run").parent, predict_crop(cfg)
    encoder = build_frozen_encoder(cfg)
    x, _ = images(cfg, cfg.size, count, encoder)
    folder = write_images(workdir / "predict-images", x, encoder)
    rows = {}
    for mode, sliding in (("whole image", False), ("sliding window", True)):
        best = []
        for r in range(min(3, cfg.repeats)):
            out = workdir / f"predict-out-{r}"
            result = predict(run_dir / "best.pt", folder, out, sliding_window=sliding, device=cfg.device, progress=False)
            best.append(result["images_per_second"])
            shutil.rmtree(out, ignore_errors=True)
        rows[mode] = float(np.median(best))
    return {"size": list(cfg.size), "data": data_label(cfg), "images": count, "crop": crop, "images_per_s": rows}


def predict_crop(cfg: BenchConfig) -> list[int]:
    """The bench checkpoint's crop: two thirds of the image each way, a multiple of 32 (several windows an image)."""
    h, w = cfg.size
    return [h * 2 // 3 // 32 * 32, w * 2 // 3 // 32 * 32]


def bench_checkpoint(cfg: BenchConfig, store: Path, run_dir: Path) -> Path:
    """best.pt of the bench decoder trained afresh in ``run_dir`` for one epoch on the bench store (its weights do
    not change the speed)."""
    from fusion_seg.training.config import TrainConfig
    from fusion_seg.training.train import train_decoder

    shutil.rmtree(run_dir, ignore_errors=True)
    train_decoder(str(store), run_dir, TrainConfig(decoder=cfg.decoder, decoder_config=cfg.decoder_config,
                                                   epochs=1, batch_size=cfg.batch_size, crop=predict_crop(cfg),
                                                   workers=0, device=cfg.device), progress=False)
    return run_dir / "best.pt"


def write_images(folder: Path, x, encoder) -> Path:
    """The normalised images ``x`` as PNG files in ``folder``, so that predict reads and decodes them as a user's."""
    from fusion_seg.data.io import write_rgb_png

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    mean, std = np.array(encoder.identity.mean), np.array(encoder.identity.std)
    for i in range(len(x)):
        rgb = (x[i].permute(1, 2, 0).numpy() * std + mean).clip(0, 1) * 255
        write_rgb_png(folder / f"{i:03d}.png", rgb.round().astype(np.uint8))
    return folder


def to_markdown(r: dict) -> str:
    lines = [f"{r['images']} {r['data']} at {r['size'][1]}x{r['size'][0]} as PNG files; sliding window of "
             f"{r['crop'][1]}x{r['crop'][0]} (median of runs; model load excluded).", "",
             "| predict | images/s |", "|---|---|"]
    lines += [f"| {mode} | {v:.2f} |" for mode, v in r["images_per_s"].items()]
    return "\n".join(lines)

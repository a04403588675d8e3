"""The decoder's own step on CPU: eager, channels_last and torch.compile, alternated in one run.

One training step (forward, OHEM loss on upsampled logits, backward, SGD) of the reverse-HRNet
`small` decoder at batch 2 on random post-ReLU ResNet-50-shaped features for a 352x480 input.
Each variant is timed in alternating rounds (median of 6 steps after 2 warm-up steps), so that
load changes hit all variants alike. Compile time is reported apart.

    python benchmarks/decoder_speed.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusion_seg.reports.bench.common import decoder_step
from fusion_seg.decoders import build_decoder
from fusion_seg.shapes import ShapeSpec

SHAPES = {"s4": ShapeSpec(256, 4), "s8": ShapeSpec(512, 8), "s16": ShapeSpec(1024, 16), "s32": ShapeSpec(2048, 32)}


def median_step(step, feats, labels, n=6) -> float:
    for _ in range(2):
        step(feats, labels)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step(feats, labels)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    h, w = 352, 480
    feats = {k: torch.relu(torch.randn(2, s.channels, h // s.stride, w // s.stride)) for k, s in SHAPES.items()}
    labels = torch.randint(0, 11, (2, h, w))
    cpu = torch.device("cpu")

    def make():
        torch.manual_seed(0)
        return decoder_step(build_decoder("reverse-hrnet", SHAPES, 11, preset="small"), cpu)

    variants = {"eager": make(), "channels_last": make(), "torch.compile": make()}
    variants["channels_last"].decoder.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    variants["torch.compile"].model = torch.compile(variants["torch.compile"].decoder)
    variants["torch.compile"](feats, labels)
    print(f"torch.compile: first step (compilation) {time.perf_counter() - t0:.1f} s")
    results = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, step in variants.items():
            results[name].append(median_step(step, feats, labels))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in results.items()), flush=True)
    base = statistics.median(results["eager"])
    for name, v in results.items():
        print(f"{name:14s} median {statistics.median(v):.3f} s/step  ({statistics.median(v) / base:.2f}x eager)")


if __name__ == "__main__":
    main()

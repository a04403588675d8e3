"""Peak training memory of the reverse-HRNet decoder, 4 streams against 5 (paper's variant), and with
activation checkpointing (`--checkpoint-activations`, issue 21): the memory it saves and the time it costs.

Each configuration runs one training step (forward + backward, batch 2, 512x512
input, ResNet-50 feature shapes, 19 classes, logits upsampled to the input and
cross-entropy) in a fresh process. Peak = rise of ru_maxrss over the RSS after a
small warm-up step, with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors return to
the OS and RSS follows live memory. On CUDA, torch.cuda.max_memory_allocated. The
step time is the median of 3 further steps in the same process.

    python benchmarks/decoder_memory.py [--device cuda] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = [  # (preset, streams, modules or None for the preset default)
    ("small", 4, None), ("small", 5, None),
    ("w18", 4, None), ("w18", 5, None),
    ("w48", 4, None), ("w48", 5, None),
]
CHANNELS = {2: 64, 4: 256, 8: 512, 16: 1024, 32: 2048}


def measure(preset: str, streams: int, device: str, checkpointed: bool, size: int = 512, batch: int = 2) -> dict:
    """Runs in the child process."""
    import resource
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    from fusion_seg.decoders import build_decoder
    from fusion_seg.shapes import ShapeSpec

    shapes = {f"s{s}": ShapeSpec(c, s) for s, c in CHANNELS.items()}
    dec = build_decoder("reverse-hrnet", shapes, 19, streams=streams, preset=preset).to(device).train()
    if checkpointed:
        dec.set_activation_checkpointing(True)

    def step(h, w):
        feats = {name: torch.randn(batch, shapes[name].channels, -(-h // shapes[name].stride),
                                   -(-w // shapes[name].stride), device=device) for name in dec.in_features}
        target = torch.randint(0, 19, (batch, h, w), device=device)
        sum(dec.losses(dec(feats), target, F.cross_entropy).values()).backward()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    step(64, 64)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(size, size)
        peak = torch.cuda.max_memory_allocated()
    else:
        base = rss()
        step(size, size)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step(size, size)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"preset": preset, "streams": streams, "checkpointed": checkpointed, "config": dec.config,
            "device": device, "peak_MiB": round((peak - base) / 2**20, 1), "step_s": statistics.median(times),
            "params_M": round(sum(p.numel() for p in dec.parameters()) / 1e6, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.device, args.child[2] == "1")))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for preset, streams, _ in CONFIGS:
        for checkpointed in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", preset, str(streams),
                                  checkpointed], env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'preset':<7}{'streams':>8}{'modules':>14}{'blocks':>7}{'params M':>10}{'peak MiB':>10}{'vs 4':>8}"
          f"{'checkpointed':>14}{'memory':>8}{'step s':>8}{'time':>7}")
    four, plain = {}, {}
    for r in rows:
        if not r["checkpointed"]:
            plain[(r["preset"], r["streams"])] = r
            if r["streams"] == 4:
                four[r["preset"]] = r["peak_MiB"]
            continue
        p = plain[(r["preset"], r["streams"])]
        rel = f"{100 * (p['peak_MiB'] / four[p['preset']] - 1):+.0f}%" if r["streams"] == 5 else ""
        print(f"{r['preset']:<7}{r['streams']:>8}{str(tuple(r['config']['modules'])):>14}{r['config']['blocks']:>7}"
              f"{r['params_M']:>10.3f}{p['peak_MiB']:>10.1f}{rel:>8}{r['peak_MiB']:>14.1f}"
              f"{r['peak_MiB'] / p['peak_MiB']:>7.2f}x{r['step_s']:>8.2f}{r['step_s'] / p['step_s']:>6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""When does the cache beat online training on a GPU? A projection with the GPU's rates as parameters.

No GPU was lent to this work, so the GPU's costs enter as parameters, and every other cost is a
CPU figure measured by ``fusion-seg bench`` on this machine's cores (the cache-format table):

- ``f``: the frozen ResNet-50 forward, ms per 480x360 view (published AMP rates give 0.3-0.7 ms);
- ``d``: the decoder's training step, ms per view on the GPU (not measured: 1 and 4 ms bracket
  a small and a w48-sized reverse HRNet);
- fine-tuning costs ``3f + d`` (a backward through the encoder at about twice its forward; assumed);
- extraction is bounded by the GPU forward or by compressing the features on ``--host-cores``
  CPU cores, whichever is slower;
- the stream tier by the step or by decompressing views on the host cores, whichever is slower;
- the resident tiers pay one decompression per view to load, then the step alone.

The arithmetic is ``fusion_seg.reports.plan.project``, the same the ``fusion-seg plan`` command uses.

    python benchmarks/gpu_projection.py [--host-cores 16] [--compress-ms 61] [--decode-ms 22]
"""
from __future__ import annotations

import argparse

from fusion_seg.reports.plan import Rates, Workload, hms, label, project, recommend

GiB = 2**30


def rates(f_ms: float, d_ms: float, batch: int, cores: int, compress_ms: float, decode_ms: float) -> Rates:
    per_view = {"memory": d_ms, "device": d_ms, "ram": d_ms, "stream": max(d_ms, decode_ms / cores),
                "online": f_ms + d_ms, "finetune": 3 * f_ms + d_ms}
    return Rates(batch=batch, size=(360, 480), step_s={k: batch * v / 1e3 for k, v in per_view.items()},
                 extract_views_per_s=1e3 / max(f_ms, compress_ms / cores),
                 load_s_per_view={"device": decode_ms / cores / 1e3, "ram": decode_ms / cores / 1e3},
                 step_MiB={k: 0.0 for k in per_view}, memory_kind="cuda_max_allocated", device="cuda",
                 source="parameters")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=367, help="CamVid train")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--host-cores", type=int, default=16)
    # fp16 zstd-1, strides 4-32 of a 480x360 view (10.4 MB raw): 171 MB/s to write, 722 MB/s to read
    # per core (BENCHMARKS.md, cache-format table): 61 and 14 ms; the training loader's own figure
    # (decompress, crop, collate) is higher: 22 ms.
    p.add_argument("--compress-ms", type=float, default=61.0)
    p.add_argument("--decode-ms", type=float, default=22.0)
    a = p.parse_args()
    print(f"CamVid-sized schedule: {a.images} images, K={a.views} views, batch {a.batch}, {a.host_cores} host "
          f"cores; compress {a.compress_ms} ms and decompress {a.decode_ms} ms of one core per view.\n")
    print("| f (ms/view) | d (ms/view) | epochs | cache, device | cache, stream | online | fine-tune | fastest |")
    print("|---|---|---|---|---|---|---|---|")
    for f in (0.3, 0.7):
        for d in (1.0, 4.0):
            r = rates(f, d, a.batch, a.host_cores, a.compress_ms, a.decode_ms)
            for epochs in (10, 100, 200):
                w = Workload(images=a.images, views=a.views, epochs=epochs, batch=a.batch, size=(360, 480),
                             resident_bytes=8 * GiB, extracted=False, free={"device": 140 * GiB, "ram": 1000 * GiB})
                rows = {x.method: x for x in project(w, r)}
                best, _ = recommend(list(rows.values()))
                print(f"| {f} | {d} | {epochs} | {hms(rows['cache-device'].seconds)} | "
                      f"{hms(rows['cache-stream'].seconds)} | {hms(rows['online'].seconds)} | "
                      f"{hms(rows['finetune'].seconds)} | {label(best.method)} |")


if __name__ == "__main__":
    main()

"""Does the exported model score what the checkpoint scores on real data (issue 23)? A trained CamVid checkpoint
exported with `fusion-seg export`, then `evaluate` whole-image on CamVid val with the torch backend in fp32 and
bf16 and with the onnxruntime backend: mIoU and pixel accuracy of each, and how far the others are from torch
fp32's (the issue's bar: the same mIoU to 3 decimals through ONNX Runtime).

The default checkpoint is the formats study's float16-s0 run (benchmarks/resident_formats.py: the camvid.toml
configuration, a seeded random-init ResNet-50). Results go to OUT/parity.json and are printed as markdown.

    python benchmarks/onnx_parity.py --root ../shared/data/camvid
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/camvid")
    ap.add_argument("--checkpoint", default="runs/camvid-formats/float16-s0/best.pt")
    ap.add_argument("--out", default="runs/onnx-parity")
    args = ap.parse_args()
    import fusion_seg as fs

    out = Path(args.out)
    model = out / "model.onnx"
    exported = fs.export_onnx(args.checkpoint, model, progress=False)
    data = fs.DatasetRef("camvid", "val", root=args.root)
    rows = {}
    for name, path, options in (("torch fp32", args.checkpoint, {"precision": "fp32"}),
                                ("torch bf16", args.checkpoint, {"precision": "bf16"}),
                                ("onnxruntime fp32", model, {"backend": "onnxruntime"})):
        r = fs.evaluate(path, dataset=data, out=out / name.replace(" ", "-"), device="cpu", progress=False, **options)
        rows[name] = {"miou": r.miou, "pixel_acc": r.pixel_acc, "seconds": r.seconds, "images": r.images}
    result = {"checkpoint": args.checkpoint, "model_bytes": exported.bytes, "export_seconds": exported.seconds,
              "rows": rows}
    (out / "parity.json").write_text(json.dumps(result, indent=2))
    base = rows["torch fp32"]
    print(f"| CamVid val, {base['images']} images, whole image | mIoU | pixel acc | mIoU - torch fp32 |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['miou']:.4f} | {r['pixel_acc']:.4f} | {r['miou'] - base['miou']:+.4f} |")


if __name__ == "__main__":
    sys.exit(main())

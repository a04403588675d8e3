"""Section 7: deploying what was trained: PyTorch fp32 against PyTorch bf16 (CPU autocast, oneDNN), ONNX Runtime
fp32 (the model ``fusion-seg export`` writes) and torch.compile, side by side in one process.

- the bare encoder forward, one image at ``cfg.size`` (torch fp32, bf16, torch.compile fp32, ONNX Runtime fp32:
  the encoder alone exported as ``export`` exports the model);
- ``predict`` images/s end to end on PNG files (read, resize, forward, argmax, write), whole image, with the
  ``--precision`` and ``--backend`` options a user has; and how many pixels the backends' masks share;
- the decoder training step in fp32 and bf16 (``--precision``), at the bench's decoder and batch and at the
  CamVid recipe's (reverse HRNet w18, 5 streams, batch 8, 160x224 crops), each pair timed in turn (A B A B).

Every ratio is "other / torch fp32" of time, so below 1 is faster. torch.compile is timed only on the encoder,
the largest part of a forward: predict does not compile (a first call costs tens of seconds, more than most
predict runs).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from fusion_seg.reports.bench.common import BenchConfig, build_frozen_encoder, data_label, decoder_step, images
from fusion_seg.reports.bench.inference import bench_checkpoint, write_images
from fusion_seg.reports.bench.training import paired_ratio
from fusion_seg.reports.timing import median_seconds

RECIPE_DECODER = {"preset": "w18", "streams": 5}  # pipelines/camvid.toml's
RECIPE_BATCH, RECIPE_CROP = 8, (160, 224)


def run(cfg: BenchConfig, store: Path, workdir: Path, count: int = 8) -> dict:
    from fusion_seg.inference.export import export_onnx
    from fusion_seg.inference.onnx_format import require_onnx

    require_onnx("the bench's deploy section")
    encoder = build_frozen_encoder(cfg)
    x, _ = images(cfg, cfg.size, count, encoder)
    result = {"size": list(cfg.size), "data": data_label(cfg), "images": count,
              "encoder_forward_s": encoder_forward(cfg, encoder, x[:1])}
    checkpoint = bench_checkpoint(cfg, store, workdir / "deploy-run")
    model = workdir / "deploy-model.onnx"
    export_onnx(checkpoint, model, progress=False)
    folder = write_images(workdir / "deploy-images", x, encoder)
    result["predict"] = predict_rows(cfg, checkpoint, model, folder, workdir)
    result["step"] = step_rows(cfg, store)
    return result


def encoder_forward(cfg: BenchConfig, encoder, one: torch.Tensor) -> dict:
    """Seconds a forward of one image: torch fp32 and bf16, torch.compile (fp32), ONNX Runtime (fp32)."""
    from fusion_seg.inference.export import trace
    from fusion_seg.inference.onnx_format import new_session

    times = {}
    for precision in ("fp32", "bf16"):
        encoder.with_precision(precision)
        times[f"torch {precision}"] = median_seconds(lambda: encoder(one), cfg.repeats, cfg.warmup)
    encoder.with_precision("fp32")
    compiled = torch.compile(encoder.model)
    with torch.inference_mode():
        compile_s = median_seconds(lambda: compiled(one), 1, warmup=0)  # the first call compiles
        times["torch.compile fp32"] = median_seconds(lambda: compiled(one), cfg.repeats, cfg.warmup)
    times["torch.compile first call"] = compile_s
    proto = trace(EncoderOnly(encoder), f"the {encoder.identity.tag} encoder", 18, outputs=tuple(encoder.names))
    ort = new_session(proto.SerializeToString(), ["CPUExecutionProvider"])
    feed = {ort.get_inputs()[0].name: one.numpy()}
    times["onnxruntime fp32"] = median_seconds(lambda: ort.run(None, feed), cfg.repeats, cfg.warmup)
    return times


class EncoderOnly(torch.nn.Module):
    """The timm model of a FrozenEncoder, its maps as a tuple: what the exporter traces."""

    def __init__(self, encoder):
        super().__init__()
        self.model = encoder.model

    def forward(self, image):
        return tuple(self.model(image))


def predict_rows(cfg: BenchConfig, checkpoint: Path, model: Path, folder: Path, workdir: Path) -> dict:
    """predict's images/s with each backend and precision, and the share of pixels whose class agrees with
    torch fp32's masks."""
    from PIL import Image

    from fusion_seg.inference.predict import predict

    rows, masks = {}, {}
    for name, path, options in (("torch fp32", checkpoint, {"precision": "fp32"}),
                                ("torch bf16", checkpoint, {"precision": "bf16"}),
                                ("onnxruntime fp32", model, {"backend": "onnxruntime"})):
        rates = []
        for r in range(min(3, cfg.repeats)):
            out = workdir / f"deploy-predict-{r}"
            shutil.rmtree(out, ignore_errors=True)
            rates.append(predict(path, folder, out, device=cfg.device, progress=False, **options).images_per_second)
        masks[name] = np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*[0-9].png"))])
        shutil.rmtree(out, ignore_errors=True)
        rows[name] = {"images_per_s": float(np.median(rates)),
                      "same_class": float((masks[name] == masks["torch fp32"]).mean())}
    return rows


def step_rows(cfg: BenchConfig, store: Path) -> dict:
    """The decoder step, bf16 against fp32, timed in turn: the bench's decoder on its store's features, and the
    recipe's on random features of the recipe's crop (the step's time does not depend on their values)."""
    from fusion_seg.cache.reader import CachedViews, collate_views
    from fusion_seg.decoders import build_decoder
    from fusion_seg.device import resolve_device
    from fusion_seg.reports.bench.common import decoder_for_store

    device = resolve_device(cfg.device)
    rows = {}
    decoder, names = decoder_for_store(cfg, str(store))
    views = CachedViews(str(store), names)
    features, labels = collate_views([views[i % len(views)] for i in range(cfg.batch_size)])
    rows["bench"] = _paired_step(cfg, decoder, features, labels, device,
                                 f"{cfg.decoder} {cfg.decoder_config}, batch {cfg.batch_size}, {data_label(cfg)}")
    shapes = views.spec.input_shapes()
    torch.manual_seed(cfg.seed)
    recipe = build_decoder("reverse-hrnet", shapes, len(views.spec.classes), **RECIPE_DECODER)
    h, w = RECIPE_CROP
    features = {k: torch.randn(RECIPE_BATCH, s.channels, h // s.stride, w // s.stride) for k, s in shapes.items()
                if k in recipe.in_features}
    labels = torch.randint(0, len(views.spec.classes), (RECIPE_BATCH, h, w))
    rows["recipe"] = _paired_step(cfg, recipe, features, labels, device,
                                  f"reverse-hrnet {RECIPE_DECODER}, batch {RECIPE_BATCH}, {w}x{h} crops")
    return rows


def _paired_step(cfg: BenchConfig, decoder, features: dict, labels: torch.Tensor, device, label: str) -> dict:
    import copy

    steps = {p: decoder_step(copy.deepcopy(decoder), device, precision=p) for p in ("bf16", "fp32")}
    features = {k: v.to(device, torch.float32) for k, v in features.items()}  # as the sources hand them over
    labels = labels.to(device)
    timed = paired_ratio(lambda: steps["bf16"](features, labels), lambda: steps["fp32"](features, labels),
                         cfg.repeats, cfg.warmup, calls=2)
    return {"what": label, "bf16_over_fp32": timed["ratio"], "bf16_s": timed["a_s"], "fp32_s": timed["b_s"]}


def to_markdown(r: dict) -> str:
    fwd = r["encoder_forward_s"]
    base = fwd["torch fp32"]
    h, w = r["size"]
    lines = [f"One image at {w}x{h} ({r['data']}); median of repetitions; time / torch fp32's (below 1: faster).", "",
             "| encoder forward | ms | / torch fp32 |", "|---|---|---|"]
    lines += [f"| {k} | {1000 * v:.1f} | {v / base:.2f}x |" for k, v in fwd.items() if k != "torch.compile first call"]
    lines += ["", f"torch.compile's first call (compiling): {fwd['torch.compile first call']:.1f} s.", "",
              f"| predict ({r['images']} PNG files, whole image) | images/s | pixels of torch fp32's class |",
              "|---|---|---|"]
    lines += [f"| {k} | {v['images_per_s']:.2f} | {100 * v['same_class']:.3f} % |" for k, v in r["predict"].items()]
    lines += ["", "| decoder step | fp32 ms | bf16 ms | bf16 / fp32 (paired) |", "|---|---|---|---|"]
    lines += [f"| {v['what']} | {1000 * v['fp32_s']:.0f} | {1000 * v['bf16_s']:.0f} | {v['bf16_over_fp32']:.2f}x |"
              for v in r["step"].values()]
    return "\n".join(lines)

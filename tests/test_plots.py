"""Figures: training curves, confusion matrix, speed/accuracy scatter, and the decoder feature-map figure."""
from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fusion_seg.datasets import build_dataset
from fusion_seg.errors import UserError
from fusion_seg.infer import load_segmenter
from fusion_seg.io import write_mask_png, write_rgb_png
from fusion_seg.train import train_decoder
from pipeline_helpers import SYNTH, extract_synthetic, tiny_config

pytest.importorskip("matplotlib")

from fusion_seg import plots, visualize as vis  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-epoch reverse-hrnet and fpn runs on a tiny whole-image store (validated, so mIoU is logged)."""
    d = tmp_path_factory.mktemp("plots")
    extract_synthetic(d / "s.zarr", views=1, augment=False, num_images=2)
    out = {}
    for name, cfg in {"reverse-hrnet": tiny_config(epochs=1),
                      "fpn": tiny_config(epochs=1, decoder="fpn", decoder_config={})}.items():
        train_decoder(str(d / "s.zarr"), d / name, cfg, val_cache=str(d / "s.zarr"), progress=False)
        out[name] = d / name
    sample = build_dataset("synthetic", split="val", num_images=1, size=SYNTH["size"])[0]
    write_rgb_png(d / "img.png", sample.image)
    write_mask_png(d / "mask.png", sample.mask)
    out["image"], out["mask"] = d / "img.png", d / "mask.png"
    return out


def _png_size(path):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.load()
        return img.size  # (width, height)


def _no_tmp_left(folder):
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ----- plots ------------------------------------------------------------------------------------

def test_training_curves(runs, tmp_path):
    out = plots.plot_training_curves(runs["reverse-hrnet"] / "metrics.jsonl", tmp_path / "curves.png")
    w, h = _png_size(out)
    assert 400 <= w <= 2000 and 300 <= h <= 2000
    _no_tmp_left(tmp_path)
    # A run directory works too, and a line cut by an interruption is skipped.
    log = tmp_path / "cut" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text((runs["fpn"] / "metrics.jsonl").read_text() + '{"type": "step", "ep')
    assert _png_size(plots.plot_training_curves(log.parent, tmp_path / "c2.png"))[0] >= 400


def test_training_curves_without_records(tmp_path):
    with pytest.raises(UserError, match="no training log"):
        plots.plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    (tmp_path / "m.jsonl").write_text("")
    with pytest.raises(UserError, match="no step or epoch"):
        plots.plot_training_curves(tmp_path / "m.jsonl", tmp_path / "x.png")


@pytest.mark.parametrize("n", [3, 30])
def test_confusion(tmp_path, n):
    rng = np.random.default_rng(n)
    matrix = (rng.integers(0, 50, (n, n)) + np.eye(n, dtype=int) * 500).tolist()
    matrix[1] = [0] * n  # a class without ground-truth pixels
    names = [f"class_{i}" for i in range(n)]
    w, h = _png_size(plots.plot_confusion(matrix, names, tmp_path / "cm.png"))
    assert w >= 400 and h >= 400
    if n == 30:
        assert w >= 700  # grows with the class count
    with pytest.raises(UserError, match="class names"):
        plots.plot_confusion(matrix, names[:-1], tmp_path / "bad.png")


def test_compare(tmp_path):
    rows = [{"decoder": "reverse-hrnet", "miou": 0.71, "step_ms": 120.0, "params_M": 3.9},
            {"decoder": "fpn", "miou": 0.68, "step_ms": 80.0, "params_M": 2.1},
            {"decoder": "linear", "miou": 0.5, "step_ms": 20.0, "params_M": None},
            {"decoder": "unfinished", "miou": None, "step_ms": 5.0, "params_M": 1.0}]
    w, h = _png_size(plots.plot_compare(rows, tmp_path / "cmp.png"))
    assert w >= 400 and h >= 300
    with pytest.raises(UserError, match="lacks step_ms"):
        plots.plot_compare([{"decoder": "x", "miou": 0.5}], tmp_path / "bad.png")


def test_missing_matplotlib_is_a_user_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UserError, match=r"pip install 'fusion-seg\[plots\]'"):
        plots.plot_compare([{"decoder": "x", "miou": 0.5, "step_ms": 1.0}], tmp_path / "x.png")
    with pytest.raises(UserError, match="needs matplotlib"):
        vis.visualize([tmp_path / "none.pt"], tmp_path / "none.png", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_no_module_level_matplotlib_import():
    """The core pipeline must run without matplotlib: no fusion_seg module imports it at import time."""
    import ast
    from pathlib import Path

    import fusion_seg

    offenders = []
    for path in Path(fusion_seg.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only; imports inside functions are lazy
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "matplotlib" or n.startswith("matplotlib.") for n in names):
                offenders.append(path.name)
    assert offenders == []


# ----- feature maps -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(runs):
    return {name: load_segmenter(runs[name] / "best.pt", device="cpu") for name in ("reverse-hrnet", "fpn")}


@pytest.mark.parametrize("decoder", ["reverse-hrnet", "fpn"])
@pytest.mark.parametrize("rule", ["auto", "size-match"])
def test_decoder_feature_maps(models, decoder, rule):
    model, ckpt = models[decoder]
    h, w = 50, 70  # not multiples of 32: sizes round up
    maps = vis.decoder_feature_maps(model, torch.randn(3, h, w), rule=rule)
    assert set(maps) == {4, 8, 16, 32}
    for s, m in maps.items():
        assert m.dim() == 3 and tuple(m.shape[-2:]) == (math.ceil(h / s), math.ceil(w / s))
        assert m.shape[0] != len(ckpt["classes"])  # never the logits
        assert torch.isfinite(m).all()
    if decoder == "reverse-hrnet" and rule == "auto":  # the first stage's streams, at the preset widths
        assert [maps[s].shape[0] for s in (4, 8, 16, 32)] == [16, 32, 64, 128]
    if decoder == "fpn" and rule == "auto":  # P2..P5
        assert {m.shape[0] for m in maps.values()} == {128}


@pytest.mark.parametrize("rule", ["auto", "size-match"])
def test_feature_maps_of_the_end_to_end_hrnet(rule):
    """The HRNet baseline pads the image to a multiple of 32: its maps still match, cropped back."""
    from fusion_seg.decoders import DECODERS, build_decoder
    from fusion_seg.encoder import build_image_encoder
    from fusion_seg.model import Segmenter

    if "hrnet" not in DECODERS:
        pytest.skip("the hrnet baseline decoder is not registered")
    encoder = build_image_encoder()
    torch.manual_seed(0)
    model = Segmenter(encoder, build_decoder("hrnet", encoder.output_shape(), 5)).eval()
    h, w = 50, 70
    maps = vis.decoder_feature_maps(model, torch.randn(3, h, w), rule=rule)
    assert {s: tuple(m.shape[-2:]) for s, m in maps.items()} == {4: (13, 18), 8: (7, 9), 16: (4, 5), 32: (2, 3)}
    widths = [maps[s].shape[0] for s in (4, 8, 16, 32)]
    assert widths == ([18, 36, 72, 144] if rule == "auto" else [270, 36, 72, 144])  # body streams / head


def test_pca_rgb():
    rgb = vis.pca_rgb(torch.randn(16, 9, 11))
    assert rgb.shape == (9, 11, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and rgb.max() == 255  # stretched to the full range
    constant = vis.pca_rgb(torch.full((8, 5, 6), 3.0))
    assert constant.shape == (5, 6, 3) and not constant.any()
    one_direction = torch.randn(1, 5, 6) * torch.ones(8, 1, 1)  # all channels equal: one component only
    out = vis.pca_rgb(one_direction)
    assert out[..., 0].max() == 255 and not out[..., 1:].any()
    assert vis.pca_rgb(torch.randn(2, 4, 4)).shape == (4, 4, 3)  # fewer channels than components
    ramp = vis.pca_rgb(torch.arange(24.0).reshape(2, 3, 4))  # sign fixed: largest loading positive
    assert ramp[0, 0, 0] == 0 and ramp[-1, -1, 0] == 255


def test_visualize_grows_with_rows(runs, tmp_path):
    ckpts = [runs["reverse-hrnet"] / "best.pt", runs["fpn"] / "best.pt"]
    one = vis.visualize(ckpts[:1], runs["image"], tmp_path / "one.png")  # no mask: no ground-truth column
    two = vis.visualize(ckpts, runs["image"], tmp_path / "two.png", mask_path=runs["mask"])
    (w1, h1), (w2, h2) = _png_size(one), _png_size(two)
    assert h2 > 1.6 * h1 and w2 > w1
    _no_tmp_left(tmp_path)


def test_visualize_rejects_a_mask_of_another_size(runs, tmp_path):
    write_mask_png(tmp_path / "small.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(UserError, match="belongs to the image"):
        vis.visualize([runs["fpn"] / "best.pt"], runs["image"], tmp_path / "x.png", mask_path=tmp_path / "small.png")

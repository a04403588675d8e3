"""Figures: training curves, confusion matrix, speed/accuracy scatter, and the decoder feature-map figure."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fusion_seg.data.datasets import build_dataset
from fusion_seg.errors import UserError
from fusion_seg.inference.segmenter import load_segmenter
from fusion_seg.data.io import write_mask_png, write_rgb_png
from fusion_seg.training.train import train_decoder
from pipeline_helpers import SYNTH, extract_synthetic, tiny_config

pytest.importorskip("matplotlib")

from fusion_seg import plots

from fusion_seg.reports import visualize as vis  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-epoch reverse-hrnet and fpn runs on a tiny whole-image store (validated, so mIoU is logged)."""
    d = tmp_path_factory.mktemp("plots")
    extract_synthetic(d / "s.zarr", views=1, augment=False, crop=None, num_images=2)
    out = {}
    for name, cfg in {"reverse-hrnet": tiny_config(epochs=1),
                      "fpn": tiny_config(epochs=1, decoder="fpn", decoder_config={})}.items():
        train_decoder(str(d / "s.zarr"), d / name, cfg, val_cache=str(d / "s.zarr"), allow_val_on_train=True,
                      progress=False)
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
    def no_matplotlib():
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(plots, "_import_matplotlib", no_matplotlib)  # the one place plots imports it first
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
    from fusion_seg.encoder.build import build_image_encoder
    from fusion_seg.inference.segmenter import Segmenter

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


# ----- what the pictures say (figure objects, not pixels) ------------------------------------------

def _shown_ticks(fig, ax):
    """The x tick labels drawn: matplotlib also lists those of ticks beyond the axis limits."""
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi]


def _tick_texts(fig, ax):
    return [t.get_text() for t in _shown_ticks(fig, ax)]


def _overlapping(fig, texts):
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


def _log(path, records):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _records(epochs, steps_per_epoch, first_step_epoch):
    """A metrics.jsonl of ``epochs`` epochs; step records number epochs from ``first_step_epoch`` (0 or 1)."""
    out, step = [], 0
    for e in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
            out.append({"type": "step", "epoch": e + first_step_epoch, "step": step, "loss": 2.0 / step, "lr": 0.01})
        out.append({"type": "epoch", "epoch": e + 1, "step": step, "loss": 2.0 / step,
                    "val": {"miou": 0.1 * (e + 1) / epochs + 0.5, "pixel_acc": 0.9}})
    return out


@pytest.mark.parametrize("epochs", [1, 3, 40])
def test_training_curves_have_whole_epoch_ticks_that_do_not_overlap(tmp_path, epochs):
    fig = plots.training_curves_figure(_log(tmp_path / "metrics.jsonl", _records(epochs, 5, 1)))
    ax_loss, ax_val = fig.axes[:2]
    for ax in (ax_loss, ax_val):
        assert ax.get_xlabel() == "epoch"
        ticks = _tick_texts(fig, ax)
        assert ticks and all(t.lstrip("\u2212-").isdigit() for t in ticks), ticks
        assert [int(t) for t in ticks] == sorted({int(t) for t in ticks}) and int(ticks[-1]) <= epochs
        assert not _overlapping(fig, _shown_ticks(fig, ax))
    texts = [ax_loss.xaxis.label, ax_val.title, ax_val.xaxis.label, fig._suptitle, *_shown_ticks(fig, ax_loss)]
    assert not _overlapping(fig, texts)  # the loss panel's labels stay clear of the validation panel's
    star = ax_val.get_lines()[-1]  # the best epoch, starred: the legend does not cover it
    best = ax_val.transData.transform(np.column_stack([star.get_xdata(), star.get_ydata()]))[0]
    assert not ax_val.get_legend().get_window_extent(fig.canvas.get_renderer()).contains(*best)


def test_training_curves_read_step_epochs_numbered_from_0_or_1(tmp_path):
    """Older logs number step records' epochs from 0, newer ones from 1: the curves are the same."""
    curves = []
    for first in (0, 1):
        fig = plots.training_curves_figure(_log(tmp_path / f"m{first}.jsonl", _records(3, 4, first)))
        curves.append([tuple(line.get_xdata()) for line in fig.axes[0].get_lines()])
    assert curves[0] == curves[1]
    steps_x = curves[0][0]
    assert steps_x[3] == 1.0 and steps_x[-1] == 3.0 and steps_x[0] == 0.25  # step 4 ends epoch 1 of 4 steps each


def test_confusion_colour_bar_and_cells_share_units(tmp_path):
    matrix = [[80, 20, 0], [0, 0, 0], [10, 30, 60]]
    fig = plots.confusion_figure(matrix, ["road", "sky", "car"])
    ax = fig.axes[0]
    image = ax.get_images()[0]
    bar = image.colorbar
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 100.0)  # the colours are percent of the row
    assert "%" in bar.ax.get_ylabel()
    fig.canvas.draw()
    assert [t.get_text() for t in bar.ax.get_yticklabels() if t.get_text()][-1] == "100%"
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells[(0, 0)] == "80" and cells[(0, 1)] == "20" and cells[(2, 1)] == "30" and cells[(2, 2)] == "60"
    assert (1, 1) not in cells  # a class without ground truth: no number, drawn grey
    assert "%" in ax.get_title()


def test_legend_names_every_class_in_its_palette_colour(tmp_path):
    from matplotlib.colors import to_rgb

    from fusion_seg.data.io import default_palette

    names = [f"class {i}" for i in range(30)]
    palette = default_palette(30)
    fig = plots.legend_figure(names, palette)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == names
    patches = legend.get_patches()
    assert all(np.allclose(to_rgb(p.get_facecolor()), palette[i] / 255) for i, p in enumerate(patches))
    assert _png_size(plots.plot_legend(names, palette, tmp_path / "legend.png"))[1] > 100
    with pytest.raises(UserError, match="palette colours"):
        plots.legend_figure(names, palette[:3])


def test_figure2_has_a_legend_of_the_overlay_classes(runs, models):
    from matplotlib.colors import to_rgb

    from fusion_seg.data.io import default_palette

    _, ckpt = models["fpn"]
    fig = vis.figure2([runs["reverse-hrnet"] / "best.pt", runs["fpn"] / "best.pt"], runs["image"],
                      mask_path=runs["mask"])
    (legend,) = fig.legends  # both rows were trained on the same classes: one legend
    assert [t.get_text() for t in legend.get_texts()] == list(ckpt["classes"])
    palette = default_palette(len(ckpt["classes"]))
    assert all(np.allclose(to_rgb(p.get_facecolor()), palette[i] / 255) for i, p in enumerate(legend.get_patches()))
    fig.canvas.draw()
    legend_box = legend.get_window_extent(fig.canvas.get_renderer())
    lowest = min(ax.get_window_extent().y0 for ax in fig.axes)
    assert legend_box.y1 <= lowest  # under the panels, not over them

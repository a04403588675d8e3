"""What a decoder sees: its feature maps at strides 4..32 as PCA colour images (the paper's Figure 2).

:func:`decoder_feature_maps` captures a decoder's internal maps with forward
hooks, without any change to the decoders. Which modules are hooked is the
decoder's own choice, its ``feature_taps()``
(:class:`~fusion_seg.decoders.base.FeatureTaps`); the maps taken are:

* ``reverse-hrnet``: the **first stage**, the one place where all the
  streams (strides 4, 8, 16, 32; and 2 with ``streams=5``, which is not
  returned) exist together inside the decoder. The
  ``align`` outputs also hold all four streams, but they are only 1x1
  projections of the frozen backbone's maps, i.e. they show the encoder, not
  what the decoder made of it; every later stage has dropped the coarsest
  stream. Within the first stage each stream's *last* state is taken: the
  fused output of the stage for strides 4..16, and for stride 32 (which the
  stage's last module folds into the finer streams instead of returning it)
  the output of its branch in that module, its deepest state before it is
  dropped. With several modules in the first stage, the last module that
  still outputs a stream wins in the same way.
* ``fpn``: the FPN levels P2..P5 (outputs of the 3x3 output convs), the
  pyramid its semantic head reads.
* ``hrnet`` (the end-to-end baseline, a decoder with ``end_to_end = True``
  whose ``body`` is a timm ``hrnet_w18_small_v2``, ``features_only=True``):
  the four streams its body returns, i.e. the outputs of HRNet's last
  stage, which has just fused all resolutions -- the counterpart of the
  reverse HRNet's first stage. They are picked from the body's output by
  the size matching below.
* any other decoder: a size-matching fallback (``rule="size-match"`` forces
  it for any decoder). Every submodule's output (tensors, or the tensors of
  a list/tuple/dict it returns) whose spatial size is the expected size of
  a stride is a candidate, and the **last one computed** per stride is kept:
  the deepest representation at that resolution. Logits are skipped: the
  decoder's output and anything sharing its memory (the classifier output
  it crops or returns) and any map with as many channels as the logits
  (auxiliary classifiers). On the HRNet baseline this gives the body's
  streams at strides 8..32 and, at stride 4, its head (the 1x1 conv over
  all four streams concatenated).

Expected sizes per stride come from the encoder's own maps when it has one
at that stride, otherwise ``ceil(size / stride)`` (what stride-2 convs with
padding, as in ResNet and HRNet stems, produce). Maps of the image padded
bottom/right to a multiple of 32 (the HRNet baseline pads so) also match
and are cropped back to the expected size.

:func:`visualize` draws one row per checkpoint: input, prediction overlay,
ground-truth overlay (with a mask) and the four PCA maps, over a colour legend
naming the classes of the overlays. matplotlib is an
optional extra (``pip install 'fusion-seg[plots]'``), imported lazily.
"""
from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusion_seg.decoders.base import Decoder
from fusion_seg.errors import UserError
from fusion_seg.data.io import default_palette, overlay, read_image, read_mask
from fusion_seg.inference import arguments
from fusion_seg.files import check_out_file, reporting_write_errors
from fusion_seg.inference.segmenter import Segmenter, load_model
from fusion_seg.data.transforms import resize_pair, to_tensor

STRIDES = (4, 8, 16, 32)
# How many of the latest candidates per stride are kept, so that logits (the classifier, and
# containers or in-place activations returning its very tensor) can be skipped afterwards.
_KEEP = 16


# --------------------------------------------------------------------------- feature maps
def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for t in output if isinstance(t, torch.Tensor)]
    return []


def _expected_sizes(image_size: tuple[int, int], encoder_out, encoder, strides) -> dict[int, tuple[int, int]]:
    """Spatial size per stride: the encoder's map of that stride, else ceil(image / stride)."""
    by_stride = {}
    identity = getattr(encoder, "identity", None)
    if identity is not None and isinstance(encoder_out, dict):
        for f in identity.features:
            t = encoder_out.get(f["name"])
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                by_stride[int(f["stride"])] = tuple(t.shape[-2:])
    h, w = image_size
    return {s: by_stride.get(s, (math.ceil(h / s), math.ceil(w / s))) for s in strides}


def _accepted_sizes(image_size: tuple[int, int], natural: dict[int, tuple[int, int]]) -> list[tuple[tuple, int]]:
    """``[(size, stride)]`` in match order: every natural size first, then the sizes of the image
    padded bottom/right to a multiple of the largest stride (what the HRNet baseline runs on)."""
    top = max(32, *natural)
    h, w = (-(-d // top) * top for d in image_size)
    accepted = [(size, s) for s, size in natural.items()]
    accepted += [((h // s, w // s), s) for s in natural if (h // s, w // s) not in dict(accepted)]
    return accepted


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except RuntimeError:
        return a is b


def decoder_feature_maps(model: Segmenter, image_tensor: torch.Tensor, *, strides=STRIDES,
                         rule: str = "auto") -> dict[int, torch.Tensor]:
    """The decoder's feature maps ``{stride: (C, H, W) tensor}`` for one normalised image.

    ``image_tensor``: ``(3, H, W)`` or ``(1, 3, H, W)``, normalised as the encoder expects.
    ``rule``: ``"auto"`` (the decoder's own rule, see the module docstring) or ``"size-match"``
    (the generic fallback for any decoder). Strides for which no map is found are absent.

    A map matches a stride when its size is that stride's expected size, or the size of the
    image padded (bottom/right) to a multiple of 32 divided by the stride; a padded map is
    cropped back to the expected size. The size-match rule skips logits: the decoder's output
    (and any tensor sharing its memory, such as the classifier output it crops) and every map
    with as many channels as the output (auxiliary classifiers).
    """
    if rule not in ("auto", "size-match"):
        raise UserError(f"rule must be 'auto' or 'size-match', got {rule!r}")
    x = image_tensor if image_tensor.dim() == 4 else image_tensor.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise UserError(f"decoder_feature_maps takes one image (3, H, W), got shape {tuple(image_tensor.shape)}")
    decoder = model.decoder
    # The decoder's own taps, or the base class's default (every submodule, matched by size).
    rule, modules = decoder.feature_taps() if rule == "auto" else Decoder.feature_taps(decoder)
    generic = rule == "size-match"
    classifier = getattr(decoder, "classifier", None)
    logit_channels = classifier.out_channels if generic and isinstance(classifier, nn.Conv2d) else None
    device = next(iter(decoder.parameters()), torch.empty(0)).device
    x = x.to(device)

    state: dict = {"natural": None, "accepted": None, "final": None}
    candidates: dict[int, deque] = {s: deque(maxlen=_KEEP) for s in strides}

    def on_encoder(_module, _inputs, output):
        state["natural"] = _expected_sizes(tuple(x.shape[-2:]), output, model.encoder, strides)
        state["accepted"] = _accepted_sizes(tuple(x.shape[-2:]), state["natural"])

    def on_module(_module, _inputs, output):
        if state["accepted"] is None:
            return
        for t in _tensors(output):
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] == logit_channels:
                continue
            size = tuple(t.shape[-2:])
            for accepted, s in state["accepted"]:
                if size == accepted:
                    # Clone: a later in-place op (ReLU, residual +=) must not change what we saw.
                    candidates[s].append((t, t.detach()[0].float().clone()))
                    break

    def on_decoder(_module, _inputs, output):
        state["final"] = output

    handles = [model.encoder.register_forward_hook(on_encoder), decoder.register_forward_hook(on_decoder)]
    handles += [m.register_forward_hook(on_module) for m in modules]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    final = _tensors(state["final"]) if generic else []
    maps = {}
    for s in strides:
        for original, copy in reversed(candidates[s]):
            if any(_same_storage(original, f) or original.shape[1] == f.shape[1] for f in final):
                continue
            h, w = state["natural"][s]
            maps[s] = copy[:, :h, :w].contiguous().cpu()
            break
    return maps


def pca_rgb(fmap: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` feature map -> ``(H, W, 3)`` uint8: the first 3 principal components as RGB.

    Pixels are centred and projected onto the top eigenvectors of their channel
    covariance; each component is stretched from its 1st to its 99th percentile
    to 0..255 (robust to a few extreme pixels). Component signs are fixed (the
    largest loading positive) so the colours are deterministic. Components
    without variance (constant maps, fewer than 3 channels) are black.
    """
    f = torch.as_tensor(fmap).detach().to("cpu", torch.float64)
    if f.dim() == 4 and f.shape[0] == 1:
        f = f[0]
    if f.dim() != 3:
        raise ValueError(f"pca_rgb takes a (C, H, W) map, got shape {tuple(f.shape)}")
    c, h, w = f.shape
    out = np.zeros((h, w, 3), dtype=np.uint8)
    if h * w == 0 or c == 0:
        return out
    pixels = torch.nan_to_num(f.reshape(c, -1).T, nan=0.0, posinf=0.0, neginf=0.0)  # (HW, C)
    pixels = pixels - pixels.mean(0, keepdim=True)
    cov = pixels.T @ pixels / max(1, pixels.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    k = min(3, c)
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    signs = torch.sign(evecs.gather(0, evecs.abs().argmax(0, keepdim=True)))
    evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    proj = (pixels @ evecs).numpy()  # (HW, k)
    scale = float(evals.abs().max()) if k else 0.0
    for i in range(k):
        if evals[i] <= 1e-12 * max(scale, 1e-300) or evals[i] <= 0:
            continue
        lo, hi = np.percentile(proj[:, i], [1, 99])
        if not hi > lo:
            lo, hi = float(proj[:, i].min()), float(proj[:, i].max())
            if not hi > lo:
                continue
        channel = np.clip((proj[:, i] - lo) / (hi - lo), 0.0, 1.0) * 255.0
        out[..., i] = np.rint(channel).reshape(h, w).astype(np.uint8)
    return out


# --------------------------------------------------------------------------- the figure
def model_input(model: Segmenter, image: np.ndarray, ckpt: dict) -> torch.Tensor:
    """``(3, H, W)`` tensor of ``image`` resized and normalised as :func:`~fusion_seg.inference.segmenter.predict_logits` does."""
    resize = ckpt["data"].get("resize") or {}
    size = tuple(resize["size"]) if resize.get("size") else None
    resized, _ = resize_pair(image, None, short_side=resize.get("short_side"), size=size)
    identity = model.encoder.identity
    return to_tensor(resized, identity.mean, identity.std)


def _row_labels(checkpoints: list[Path], ckpts: list[dict]) -> list[str]:
    """Decoder name (run folder when it is missing or shared by two rows), and the val mIoU when recorded."""
    names = [str((c.get("decoder") or {}).get("name") or p.resolve().parent.name) for p, c in zip(checkpoints, ckpts)]
    labels = []
    for p, c, name in zip(checkpoints, ckpts, names):
        label = f"{name}\n({p.resolve().parent.name})" if names.count(name) > 1 else name
        miou = (c.get("val") or {}).get("miou")
        labels.append(label + (f"\nval mIoU {miou:.3f}" if isinstance(miou, (int, float)) else ""))
    return labels


def visualize(checkpoints: list[str | Path], image_path: str | Path, out_png: str | Path, *,
              mask_path: str | Path | None = None, device: str = "cpu", weights: str | None = None,
              panel_width: float = 3.0, dpi: float = 120) -> Path:
    """One figure for one image: a row per checkpoint, columns input | prediction | ground truth | strides 4..32.

    Rows are labelled with the checkpoint's decoder name (and its run folder when two
    rows share a decoder). Predictions and ground truth are drawn over the image in the
    default palette, named by a colour legend of the classes under the panels; the feature
    maps are :func:`pca_rgb` of :func:`decoder_feature_maps`, shown with nearest-neighbour
    scaling so that their resolution is visible.

    The figure is written in the format of ``out_png``'s suffix (``.png``, ``.pdf``, ``.svg``, ...:
    :func:`fusion_seg.plots.figure_format`). A suffix that names no figure format, an ``out_png`` that
    is a folder, lies under a file or cannot be written, and an argument the command line would refuse
    are refused before the models load; a write that fails all the same (a full disk) is a one-line
    :class:`UserError` naming the figure.
    """
    from fusion_seg.plots import figure_format, save_figure

    out = arguments.path("out_png", out_png, "the figure's file name")
    dpi = arguments.positive("dpi", dpi)
    figure_format(out, "--out")
    check_out_file(out, "the figure")
    fig = figure2(checkpoints, image_path, mask_path=mask_path, device=device, weights=weights,
                  panel_width=panel_width)
    with reporting_write_errors(out, "the figure"):
        return save_figure(fig, out, dpi=dpi)


def _legend_layout(class_lists: list[tuple[str, ...]], width: float) -> tuple[list[int], float]:
    """Columns of each legend (side by side across ``width`` inches) and the height they need, in inches."""
    share = width / max(1, len(class_lists))
    ncols, height = [], 0.0
    for classes in class_lists:
        entry = 0.45 + 0.075 * max(len(c) for c in classes)  # inches: patch, gap and the longest name at 9 pt
        ncol = max(1, min(len(classes), int(share // entry)))
        ncols.append(ncol)
        height = max(height, 0.45 + 0.22 * math.ceil(len(classes) / ncol))
    return ncols, height


def figure2(checkpoints: list[str | Path], image_path: str | Path, *, mask_path: str | Path | None = None,
            device: str = "cpu", weights: str | None = None, panel_width: float = 3.0):
    """The figure of :func:`visualize` (not saved). Its legends are ``fig.legends``: one for all rows, or
    one per distinct class list when the checkpoints were trained on different classes. Its arguments
    are checked before the models load (a UserError says what to pass)."""
    from fusion_seg.plots import legend_handles, new_figure

    if not isinstance(checkpoints, (list, tuple)):
        raise UserError(f"checkpoints={checkpoints!r}: pass a list of checkpoint paths, one row each, "
                        f"e.g. [{str(checkpoints)!r}].")
    checkpoints = [arguments.path("checkpoints", c, "a checkpoint's path") for c in checkpoints]
    if not checkpoints:
        raise UserError("visualize needs at least one checkpoint")
    image_path = arguments.path("image_path", image_path, "the image file's path")
    mask_path = arguments.path("mask_path", mask_path, "the mask file's path", optional=True)
    arguments.path("weights", weights, "the encoder's weights file", optional=True)
    device = arguments.text("device", device, "cpu")
    panel_width = arguments.positive("panel_width", panel_width)
    new_figure(1, 1, "visualize")  # fail before the (slow) model loading when matplotlib is missing
    image = read_image(image_path)
    mask = read_mask(mask_path) if mask_path is not None else None
    if mask is not None and mask.shape != image.shape[:2]:
        raise UserError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                        f"{image.shape[1]}x{image.shape[0]}; pass the mask that belongs to the image.")

    rows, ckpts = [], []
    for path in checkpoints:
        loaded = load_model(path, weights=weights, device=device)
        model, ckpt, palette = loaded.segmenter, loaded.checkpoint, loaded.palette
        pred = loaded.predict(image)
        fmaps = decoder_feature_maps(model, model_input(model, image, ckpt))
        gt = None
        if mask is not None:
            gt = overlay(image, mask, palette, ignore_index=int(ckpt.get("ignore_index", 255)))
        rows.append({"pred": overlay(image, pred, palette), "gt": gt,
                     "maps": {s: (pca_rgb(m), tuple(m.shape)) for s, m in fmaps.items()}})
        ckpts.append({k: ckpt.get(k) for k in ("decoder", "val")} | {"classes": tuple(map(str, ckpt["classes"]))})
        del model, loaded

    columns = (["input", "prediction"] + (["ground truth"] if mask is not None else [])
               + [f"stride {s}" for s in STRIDES])
    h, w = image.shape[:2]
    panel_height = panel_width * h / w
    width = panel_width * len(columns) + 0.6
    class_lists = list(dict.fromkeys(c["classes"] for c in ckpts))
    ncols, legend_height = _legend_layout(class_lists, width - 0.6)
    height = (panel_height + 0.35) * len(rows) + 0.2 + legend_height
    fig = new_figure(width, height, "visualize")
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    labels = _row_labels(checkpoints, ckpts)
    for r, (row, label) in enumerate(zip(rows, labels)):
        panels = [(image, None), (row["pred"], None)]
        if mask is not None:
            panels.append((row["gt"], None))
        for s in STRIDES:
            rgb, shape = row["maps"].get(s, (None, None))
            panels.append((rgb, f"{shape[1]}x{shape[2]}, {shape[0]} ch" if shape else "not found"))
        for c, (ax, (panel, note)) in enumerate(zip(axes[r], panels)):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if panel is not None:
                # Feature maps nearest-neighbour, so that their resolution shows.
                ax.imshow(panel, extent=(0, w, h, 0),
                          interpolation="nearest" if c >= len(panels) - len(STRIDES) else "antialiased")
            else:
                ax.set_xlim(0, w)
                ax.set_ylim(h, 0)
                ax.set_facecolor("0.9")
            ax.set_aspect("equal")
            if note:
                ax.set_xlabel(note, fontsize=7, labelpad=2)
            if r == 0:
                ax.set_title(columns[c], fontsize=10)
        axes[r][0].set_ylabel(label, fontsize=11, fontweight="bold")
    # The colour legend of the prediction and ground-truth overlays, under the panels.
    for k, (classes, ncol) in enumerate(zip(class_lists, ncols)):
        users = [str(r + 1) for r, c in enumerate(ckpts) if c["classes"] == classes]
        shown = "prediction and ground-truth" if mask is not None else "prediction"
        title = (f"classes ({shown} colours)" if len(class_lists) == 1
                 else f"classes of row{'s' if len(users) > 1 else ''} {', '.join(users)}")
        left = 0.6 / width
        x = left + (1 - left) * (k + 0.5) / len(class_lists)
        fig.legend(handles=legend_handles(classes, default_palette(len(classes))), loc="lower center",
                   bbox_to_anchor=(x, 0.05 / height), ncol=ncol, fontsize=9, title=title, title_fontsize=9,
                   frameon=False, handlelength=1.4, columnspacing=1.2)
    fig.subplots_adjust(left=0.6 / width, right=0.995, top=1 - 0.3 / height,
                        bottom=(0.15 + legend_height) / height, wspace=0.03, hspace=0.18)
    return fig

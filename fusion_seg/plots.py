"""Figures of a run and of a comparison: training curves, confusion matrix, speed/accuracy.

matplotlib is an optional extra (``pip install 'fusion-seg[plots]'``): it is
imported inside the functions, never at module import, so the core pipeline
runs without it. Figures are built on a bare :class:`matplotlib.figure.Figure`
rendered by the Agg canvas -- pyplot is never imported, so no global backend
is switched and no figure is left open in a user's interactive session.

Every figure is written in the format its file name says (``.png``, ``.pdf``, ``.svg``, ...: what the
Agg canvas writes, :func:`figure_format`), and atomically (:func:`fusion_seg.files.atomic_write`: a temporary
file in the same folder, then ``os.replace``): a reader never sees half a figure.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from fusion_seg.errors import UserError
from fusion_seg.files import atomic_write

_INSTALL = "pip install 'fusion-seg[plots]'"


def _import_matplotlib():
    """Import the optional dependency: ``matplotlib``, with its Agg canvas (fails early if Agg is broken).

    The one place it is imported first: a test replaces this function to play a missing matplotlib.
    """
    import matplotlib.backends.backend_agg  # matplotlib, and its Agg canvas: fails early if that is broken

    return matplotlib


def require_matplotlib(what: str = "plotting"):
    """The ``matplotlib`` module, or a :class:`UserError` that says how to install it."""
    try:
        return _import_matplotlib()
    except ImportError as exc:
        raise UserError(f"{what} needs matplotlib: {_INSTALL}") from exc


def new_figure(width: float, height: float, what: str = "plotting"):
    """A pyplot-free Figure with an Agg canvas, ``width`` x ``height`` inches."""
    require_matplotlib(what)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def figure_formats() -> list[str]:
    """The formats a figure can be written in here (file suffixes without the dot): what matplotlib's Agg
    canvas writes, less ``pgf`` when the TeX system that writing it runs (``rcParams["pgf.texsystem"]``) is
    not installed."""
    matplotlib = require_matplotlib("a figure")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = set(FigureCanvasAgg.get_supported_filetypes())
    if shutil.which(matplotlib.rcParams["pgf.texsystem"]) is None:
        formats.discard("pgf")
    return sorted(formats)


def figure_format(path: str | Path, option: str | None = None) -> str:
    """The format ``path``'s suffix names (``fig.pdf``: ``"pdf"``), or a :class:`UserError` naming the path (and
    the ``option`` that chose it) and the suffixes that can be written: a figure is written in the format its
    name says, or not at all."""
    suffix = Path(path).suffix.lower()
    formats = figure_formats()
    if suffix[1:] not in formats:
        said = f"its suffix {suffix} is not a figure format" if suffix else "it has no suffix to say the format"
        raise UserError(f"{option + ' ' if option else ''}{path}: {said}; end the name with one of "
                        f"{', '.join('.' + f for f in formats)} (e.g. .png, or .pdf or .svg for vector graphics).")
    return suffix[1:]


def save_figure(fig, out: str | Path, *, dpi: float = 100, metadata: dict[str, str] | None = None) -> Path:
    """Write ``fig`` atomically (:func:`fusion_seg.files.atomic_write`) in the format of ``out``'s suffix
    (:func:`figure_format`; a suffix that names no figure format is refused), with ``metadata`` (matplotlib's
    ``savefig(metadata=)``: a PNG's text chunks)."""
    fmt = figure_format(out)
    return atomic_write(out, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi, metadata=metadata))


# --------------------------------------------------------------------------- training curves
def read_metrics(metrics_jsonl: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, epoch records) of a run's ``metrics.jsonl``; a line cut by an interruption is skipped."""
    path = Path(metrics_jsonl)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no training log at {path}; pass a run directory's metrics.jsonl.")
    steps, epochs = [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("type") == "step" and rec.get("loss") is not None:
            steps.append(rec)
        elif rec.get("type") == "epoch":
            epochs.append(rec)
    if not steps and not epochs:
        raise UserError(f"{path} holds no step or epoch records; has the run logged anything yet?")
    return steps, epochs


def step_epochs(steps: list[dict], epochs: list[dict]) -> list[float] | None:
    """Where each step record falls in epochs (fractional: 2.5 is half-way through the third epoch).

    Read from the step counts alone: each epoch record says which step ended that epoch (``epoch`` is the
    number of epochs done), and steps in between are interpolated. A step record's own ``epoch`` field is
    not used, so logs that number it from 0 and logs that number it from 1 give the same curve. None when
    there is no epoch record yet (the first epoch is still running): then the curves are drawn per step.
    """
    ends = sorted({(int(r["step"]), int(r["epoch"])) for r in epochs
                   if isinstance(r.get("step"), int) and isinstance(r.get("epoch"), int)})
    if not ends:
        return None
    xs, ys = [0] + [s for s, _ in ends], [0] + [e for _, e in ends]
    per_epoch = (xs[-1] - xs[-2]) / max(1, ys[-1] - ys[-2]) or 1  # past the last epoch record: its pace
    out = []
    for r in steps:
        step = r["step"]
        out.append(float(np.interp(step, xs, ys)) if step <= xs[-1] else ys[-1] + (step - xs[-1]) / per_epoch)
    return out


def training_curves_figure(metrics_jsonl: str | Path):
    """The figure of :func:`plot_training_curves` (not saved): ``fig.axes`` is [loss, validation]."""
    path = Path(metrics_jsonl)
    steps, epochs = read_metrics(path)
    run_name = (path if path.is_dir() else path.parent).resolve().name
    fig = new_figure(8, 6.5, "plot_training_curves")
    fig.set_layout_engine("constrained")  # titles, labels and tick labels laid out without overlapping
    ax_loss, ax_val = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 2]})
    from matplotlib.ticker import MaxNLocator

    x_steps = step_epochs(steps, epochs)
    per_step = x_steps is None  # no finished epoch yet: the loss per step is all there is
    if steps:
        ax_loss.plot([r["step"] for r in steps] if per_step else x_steps, [r["loss"] for r in steps],
                     color="tab:blue", lw=0.8, alpha=0.45, label="loss per logged step")
    means = [r for r in epochs if r.get("loss") is not None]
    if means:
        ax_loss.plot([r["epoch"] for r in means], [r["loss"] for r in means], color="tab:blue", lw=1.8,
                     marker="o", ms=4, label="epoch mean")
    ax_loss.set_xlabel("step (no epoch finished yet)" if per_step else "epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    if steps or means:
        ax_loss.legend(loc="best", fontsize=9)  # where it covers the fewest points

    vals = [r for r in epochs if isinstance(r.get("val"), dict) and r["val"].get("miou") is not None]
    if vals:
        x = [r["epoch"] for r in vals]
        y = [r["val"]["miou"] for r in vals]
        ax_val.plot(x, y, color="tab:green", marker="o", ms=4, lw=1.8, label="val mIoU")
        accs = [r["val"].get("pixel_acc") for r in vals]
        if all(a is not None for a in accs):
            ax_val.plot(x, accs, color="tab:gray", marker=".", lw=1, ls="--", label="val pixel acc")
        best = int(np.argmax(y))
        ax_val.legend(loc="best", fontsize=9, title=f"best mIoU {y[best]:.4f} (epoch {x[best]})",
                      title_fontsize=9)
        ax_val.plot([x[best]], [y[best]], marker="*", ms=12, color="tab:green", ls="none", zorder=3)
    else:
        ax_val.text(0.5, 0.5, "no validation records", ha="center", va="center", transform=ax_val.transAxes,
                    color="gray")
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("validation")
    ax_val.grid(alpha=0.3)
    # One epoch axis for both panels, from 0 (the start of training) to the last epoch; whole-epoch ticks only,
    # as many as fit without their labels touching (MaxNLocator).
    last = max([r["epoch"] for r in epochs if isinstance(r.get("epoch"), int)] + [1])
    if x_steps:
        last = max(last, math.ceil(max(x_steps)))
    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax is ax_val or not per_step:
            ax.set_xlim(0, last + max(0.25, 0.03 * last))
    fig.suptitle(f"training: {run_name}")
    return fig


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Two panels on one epoch axis: the training loss (per logged step and each epoch's mean) and the
    validation mIoU and pixel accuracy per epoch, best epoch starred.

    ``metrics_jsonl`` may also be the run directory. The title is the run's name (its folder).
    Steps are placed by the epoch they fall in (see :func:`step_epochs`); the x ticks are whole epochs.
    """
    return save_figure(training_curves_figure(metrics_jsonl), out_png)


# --------------------------------------------------------------------------- confusion matrix
def row_percent(confusion) -> np.ndarray:
    """Each row of a confusion matrix as percent of its ground-truth pixels (recall); NaN for empty rows."""
    matrix = np.asarray(confusion, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100.0 * matrix / np.where(totals > 0, totals, 1), np.nan)


def confusion_figure(confusion, class_names, *, title: str | None = None):
    """The figure of :func:`plot_confusion` (not saved); the cells and the colour bar are in percent."""
    matrix = np.asarray(confusion, dtype=np.float64)
    n = len(class_names)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise UserError(f"the confusion matrix must be square, got shape {matrix.shape}")
    if matrix.shape[0] != n:
        raise UserError(f"the confusion matrix is {matrix.shape[0]}x{matrix.shape[1]} but {n} class names were "
                        "given; pass the class list the matrix was computed with.")
    if n == 0:
        raise UserError("the confusion matrix is empty")
    percent = row_percent(matrix)

    cell = 0.36 if n <= 20 else 0.24  # inches per cell
    side = max(4.5, cell * n)
    font = float(np.clip(0.42 * cell * 72, 6.0, 10.0))  # points: about 40% of a cell's height
    label_room = 0.09 * max(len(str(c)) for c in class_names) * font / 8 + 0.8
    fig = new_figure(side + label_room + 1.3, side + label_room + 0.7, "plot_confusion")
    ax = fig.add_subplot()
    import matplotlib
    from matplotlib.ticker import PercentFormatter

    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(percent), cmap=cmap, vmin=0.0, vmax=100.0, interpolation="nearest")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels([str(c) for c in class_names], rotation=90, fontsize=font)
    ax.set_yticklabels([str(c) for c in class_names], fontsize=font)
    ax.set_xlabel("prediction", fontsize=font + 2)
    ax.set_ylabel("ground truth", fontsize=font + 2)
    ax.tick_params(length=2)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                v = percent[i, j]
                if np.isfinite(v) and (v >= 0.5 or i == j):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=font - 1,
                            color="white" if v > 60 else "black")
    cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, format=PercentFormatter(100, decimals=0))
    cbar.set_label("% of the row's ground-truth pixels (recall)" + (", as in the cells" if n <= 20 else ""),
                   fontsize=font + 1)
    cbar.ax.tick_params(labelsize=font)
    present = np.isfinite(np.diag(percent))
    mean_recall = float(np.mean(np.diag(percent)[present])) if present.any() else float("nan")
    ax.set_title(title or f"confusion matrix, % of each row (mean recall {mean_recall:.1f}%)", fontsize=font + 3)
    fig.tight_layout()
    return fig


def plot_confusion(confusion, class_names, out_png: str | Path, *, title: str | None = None) -> Path:
    """Row-normalised (recall) confusion matrix: rows ground truth, columns prediction, in percent.

    The cells are labelled with the percent of their row's ground-truth pixels and the colour bar
    is in the same percent (0-100%). The figure grows with the number of classes and the fonts
    shrink, so that 19 (Cityscapes) to 65 (Mapillary Vistas) classes stay legible; cell values
    are written in only for 20 classes or fewer. Classes without ground-truth pixels are drawn grey.
    """
    return save_figure(confusion_figure(confusion, class_names, title=title), out_png)


# --------------------------------------------------------------------------- class colour legends
def legend_handles(class_names, palette) -> list:
    """One colour patch per class (``palette[i]`` labelled ``class_names[i]``), for ``ax.legend(handles=...)``."""
    require_matplotlib("a colour legend")
    from matplotlib.patches import Patch

    palette = np.asarray(palette, dtype=np.float64).reshape(-1, 3)
    if len(palette) < len(class_names):
        raise UserError(f"{len(class_names)} classes but {len(palette)} palette colours; pass one colour per class.")
    return [Patch(facecolor=palette[i] / 255.0, edgecolor="0.3", linewidth=0.5, label=str(name))
            for i, name in enumerate(class_names)]


def legend_columns(n: int, max_rows: int = 12) -> int:
    return max(1, math.ceil(n / max_rows))


def legend_figure(class_names, palette, *, title: str = "classes"):
    """A figure holding only the colour legend of ``class_names`` in ``palette`` (``(N, 3)`` uint8)."""
    handles = legend_handles(class_names, palette)
    ncol = legend_columns(len(handles))
    rows = math.ceil(len(handles) / ncol)
    width = max(2.0, ncol * (0.5 + 0.075 * max([len(str(c)) for c in class_names] + [len(title)])))
    fig = new_figure(width, 0.5 + 0.2 * rows, "a colour legend")
    fig.legend(handles=handles, loc="center", ncol=ncol, frameon=False, title=title, fontsize=9,
               title_fontsize=10, handlelength=1.6)
    return fig


def plot_legend(class_names, palette, out_png: str | Path, *, title: str = "classes",
                metadata: dict[str, str] | None = None) -> Path:
    """Write the colour legend of a palette (e.g. ``legend.png`` beside ``predict``'s overlays)."""
    return save_figure(legend_figure(class_names, palette, title=title), out_png, metadata=metadata)


# --------------------------------------------------------------------------- speed / accuracy
def plot_compare(rows: list[dict], out_png: str | Path, *, title: str | None = None) -> Path:
    """mIoU against training step time, one labelled point per decoder; marker area grows with parameters.

    ``rows``: ``{"decoder", "miou", "step_ms", "params_M"}`` each (``params_M`` may be missing or None:
    a default size is used). Rows without a finite mIoU or step time are skipped.
    """
    points = []
    for i, row in enumerate(rows):
        missing = [k for k in ("decoder", "miou", "step_ms") if k not in row]
        if missing:
            raise UserError(f"comparison row {i} ({row}) lacks {', '.join(missing)}")
        try:
            miou, ms = float(row["miou"]), float(row["step_ms"])
        except (TypeError, ValueError):
            continue
        if math.isfinite(miou) and math.isfinite(ms):
            params = row.get("params_M")
            points.append((str(row["decoder"]), ms, miou,
                           float(params) if params is not None and math.isfinite(float(params)) else None))
    if not points:
        raise UserError("no comparison row has both an mIoU and a step time to plot")

    fig = new_figure(7.5, 5.5, "plot_compare")
    ax = fig.add_subplot()
    known = [p for *_, p in points if p is not None]
    largest = max(known) if known else 1.0
    import matplotlib

    colors = matplotlib.colormaps["tab10"]
    for k, (name, ms, miou, params) in enumerate(points):
        size = 40 + 560 * (params / largest if params is not None and largest > 0 else 0.15)
        ax.scatter([ms], [miou], s=size, color=colors(k % 10), alpha=0.7, edgecolors="black", linewidths=0.6,
                   zorder=3)
        label = name if params is None else f"{name}\n{params:.2f}M params"
        ax.annotate(label, (ms, miou), xytext=(8, 6), textcoords="offset points", fontsize=9, zorder=4)
    ax.set_xlabel("training step time (ms)")
    ax.set_ylabel("mIoU")
    ax.grid(alpha=0.3, zorder=0)
    ax.margins(x=0.2, y=0.15)
    ax.set_title(title or "accuracy vs training speed (marker area ~ parameters)")
    fig.tight_layout()
    return save_figure(fig, out_png)


def plot_if_available(name: str, *args, **kwargs) -> Path | None:
    """Call the plot function ``name`` when matplotlib is installed; else do nothing (it is optional)."""
    try:
        return globals()[name](*args, **kwargs)
    except UserError:  # matplotlib missing
        return None

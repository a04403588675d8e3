"""``fusion-seg``: a thin command-line shell over the library functions.

User errors (:class:`fusion_seg.errors.UserError`) are printed as one line, with
no traceback, and exit with status 2. Every numeric option is range-checked while
the command line is parsed (click's usage error, also exit 2), before any work.

Importing this module (``--help``, ``info``, ``verify``) does not import torch or timm:
commands import the library inside their bodies, and the registries' names that the
options list come from torch-free modules or the copies below (tested against the registries).
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path

import click

from fusion_seg.checks import (CACHE_MODES, FEATURE_CROP_ALIGN, MAX_SEED, RESIDENT_DTYPES, scale_range_problem,
                               size_problem, strides_problem)
from fusion_seg.errors import UserError, os_error_message
from fusion_seg.cache.codecs import CODECS, DEFAULT_CODEC, DEFAULT_DTYPE, DTYPES  # torch-free

# Copies of the registries' names, which live in modules that import torch (decoders, encoder) or PIL and
# every dataset module (datasets): --help imports none of them. tests/test_cli.py checks them against the originals.
DATASET_NAMES = ("synthetic", "camvid", "folder", "cityscapes", "mapillary", "voc", "coco")  # datasets.DATASETS
DECODER_NAMES = ("reverse-hrnet", "linear", "fpn", "eseg", "frm", "exfuse", "hrnet")  # decoders.DECODERS
CACHE_DECODER_NAMES = tuple(d for d in DECODER_NAMES if d != "hrnet")  # hrnet trains end to end (--online) only
DEFAULT_ENCODER = "resnet50.fb_ssl_yfcc100m_ft_in1k"  # encoder.DEFAULT_ENCODER
DEFAULT_STRIDES = (2, 4, 8, 16, 32)  # encoder.DEFAULT_STRIDES
DECODER_OPT_EXAMPLE = "widths=[32,64,128,256]"  # --decoder-opt's help; tests/test_cli.py trains with it


class HxW(click.ParamType):
    """``512x1024`` -> (512, 1024); a single number means a square. ``multiple``: each side a multiple of it."""

    name = "HxW"

    def __init__(self, multiple: int = 1):
        self.multiple = multiple

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            parts = value
        else:
            try:
                parts = tuple(int(p) for p in str(value).lower().split("x"))
            except ValueError:
                self.fail(f"{value!r} is not a size like 512x1024 (height x width)", param, ctx)
            if len(parts) == 1:
                parts *= 2
        problem = size_problem(parts, self.multiple)
        if problem:
            self.fail(f"{value if isinstance(value, str) else 'x'.join(map(str, value))}: {problem}", param, ctx)
        return tuple(parts)


class HxWList(click.ParamType):
    """``360x480,720x960`` -> ((360, 480), (720, 960))."""

    name = "HxW,HxW,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        sizes = tuple(HxW().convert(s.strip(), param, ctx) for s in str(value).split(",") if s.strip())
        if not sizes:
            self.fail(f"{value!r}: give at least one size, e.g. 360x480,720x960", param, ctx)
        return sizes


class IntList(click.ParamType):
    """``3,4,1`` -> (3, 4, 1); ``minimum``: the least each entry may be."""

    name = "N,N,..."

    def __init__(self, minimum: int | None = None):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            out = tuple(int(v) for v in value)
        else:
            try:
                out = tuple(int(v) for v in str(value).split(",") if v.strip())
            except ValueError:
                self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if self.minimum is not None and (not out or min(out) < self.minimum):
            self.fail(f"{value!r}: give one or more integers, each >= {self.minimum}", param, ctx)
        return out


class Scales(click.ParamType):
    """``0.75,1.0,1.25`` -> (0.75, 1.0, 1.25): test-time scale factors, each > 0 and at most 4."""

    name = "S,S,..."

    def convert(self, value, param, ctx):
        from fusion_seg.checks import scales_problem

        if isinstance(value, (list, tuple)):
            out = tuple(value)
        else:
            try:
                out = tuple(float(v) for v in str(value).split(",") if v.strip())
            except ValueError:
                self.fail(f"{value!r} is not a comma-separated list of numbers, e.g. 0.75,1.0,1.25", param, ctx)
        problem = scales_problem(out)
        if problem:
            self.fail(f"{value!r}: {problem}", param, ctx)
        return out


class Strides(IntList):
    """Feature strides, ``4,8,16,32``: powers of 2 from 2 to 32, ascending, each once."""

    name = "S,S,..."

    def convert(self, value, param, ctx):
        strides = super().convert(value, param, ctx)
        problem = strides_problem(strides)
        if problem:
            self.fail(f"{value if isinstance(value, str) else ','.join(map(str, value))}: {problem}", param, ctx)
        return strides


class NameList(click.ParamType):
    """``linear,fpn`` -> ("linear", "fpn"), each one of ``choices``."""

    name = "NAME,NAME,..."

    def __init__(self, choices):
        self.choices = tuple(choices)

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        names = tuple(v.strip() for v in str(value).split(",") if v.strip())
        unknown = [n for n in names if n not in self.choices]
        if unknown:
            self.fail(f"{', '.join(map(repr, unknown))} is not one of {', '.join(self.choices)}", param, ctx)
        if not names:
            self.fail(f"{value!r}: give one or more of {', '.join(self.choices)}, comma-separated", param, ctx)
        return names


def check_scale_range(ctx, param, value):
    """``--scale-range LOW HIGH``: 0 < LOW <= HIGH (a click callback, so the error names the option)."""
    problem = value is not None and scale_range_problem(value)
    if problem:
        raise click.BadParameter(f"{' '.join(map(str, value))}: {problem}", ctx=ctx, param=param)
    return value


def written_as(kind: str, *suffixes: str):
    """A click callback for an option that names a file written as ``kind`` (JSON, Markdown): a name whose
    suffix says another format (``plan.csv`` for JSON) is refused while the command line is read, before any
    work; ``suffixes`` are the suffixes of ``kind`` (the first is suggested). A name without a suffix is taken."""
    def check(ctx, param, value):
        suffix = Path(value).suffix.lower() if value else ""
        if suffix and suffix not in suffixes:
            raise click.BadParameter(f"{value}: the file is written as {kind}, but its suffix {suffix} says another "
                                     f"format; name it {Path(value).with_suffix(suffixes[0])}", ctx=ctx, param=param)
        return value
    return check


POSITIVE = click.FloatRange(min=0, min_open=True)


def parse_key_values(pairs) -> dict:
    """``("num_images=4", "size=[64,96]")`` -> ``{"num_images": 4, "size": [64, 96]}`` (values as JSON, else text)."""
    out = {}
    for item in pairs:
        if "=" not in item:
            raise UserError(f"{item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def option_values(params: dict) -> dict:
    """A command's parsed options under the names a recipe stage gives them, from which the library's
    requests are built (pipeline/requests.py): ``--no-augment``/``--no-flip`` as ``augment``/``flip``,
    the ``--dataset-opt``/``--decoder-opt`` pairs as ``dataset_options``/``decoder_options``, and extract's
    ``--dask-workers`` as ``workers``."""
    values = dict(params)
    for flag in ("augment", "flip"):
        if f"no_{flag}" in values:
            values[flag] = not values.pop(f"no_{flag}")
    for kind in ("dataset", "decoder"):
        if f"{kind}_opt" in values:
            values[f"{kind}_options"] = parse_key_values(values.pop(f"{kind}_opt"))
    if "dask_workers" in values:
        values["workers"] = values.pop("dask_workers")
    return values


# What Ctrl-C leaves behind, by command: each says only what is true of that command.
INTERRUPTED = {
    "extract": "Interrupted. Re-run the same command to resume: the views already written are kept.",
    "train_decoder": "Interrupted. {out}/last.pt holds the last finished epoch: re-run the same command with --resume "
                     "to continue from it (as it was, without --resume, if no epoch had finished).",
    "compare": "Interrupted. Re-run the same command to continue: a decoder already trained is not trained again.",
    "run": "Interrupted. Re-run the same command: stages that finished are skipped, an extraction resumes and a "
           "train stage continues its run.",
    "predict": "Interrupted. predict does not resume: re-running it predicts every image again (the files written "
               "so far are whole).",
}
NOT_RESUMED = "Interrupted. Nothing to resume: re-run the command to start it again."


def user_errors(fn):
    """Print a user's error as one line (exit 2), and what an interruption leaves (exit 130); a failed
    file-system call or a failed allocation that no library check turned into a UserError is one line too."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(os_error_message(exc))
        except (MemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):
                raise
            fail(f"{fn.__name__.replace('_', '-')} ran out of memory ({str(exc).splitlines()[0][:160]}): reduce "
                 "--batch-size, --crop or the image size, or run it on a machine with more memory.")
        except KeyboardInterrupt:
            message = INTERRUPTED.get(fn.__name__, NOT_RESUMED)
            click.secho(message.format(out=kwargs.get("out", "OUT")), fg="yellow", err=True)
            sys.exit(130)
    return wrapper


@contextlib.contextmanager
def writing(path, what: str, option: str):
    """A failed write of a file a command writes at its end (``--json`` ...): one line naming it, its option
    and the fix (:func:`fusion_seg.errors.write_error`), where the last-resort OSError line could not name it."""
    from fusion_seg.errors import write_error

    try:
        yield
    except OSError as exc:
        raise write_error(path, exc, what=what, option=option) from None


def out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, torch's CPU allocator ("can't allocate memory") or CUDA's
    out-of-memory error (a RuntimeError whose message says so)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def fail(message: str) -> None:
    click.secho(f"Error: {message}", fg="red", err=True)
    sys.exit(2)


def dataset_options(fn):
    for opt in reversed([
        click.option("--dataset", required=True, type=click.Choice(DATASET_NAMES), help="Dataset name."),
        click.option("--root", type=click.Path(), default=None, help="Dataset root folder."),
        click.option("--split", required=True, help="Split name, e.g. train or val."),
        click.option("--dataset-opt", "dataset_opt", multiple=True, metavar="KEY=VALUE",
                     help="Dataset-specific option, e.g. num_images=8 for synthetic (repeatable)."),
    ]):
        fn = opt(fn)
    return fn


def _view_options(fn, crop_option, prefix: str = ""):
    for opt in reversed([
        click.option("--no-augment", is_flag=True, help=prefix + "Take the whole (resized) image, no augmentation."),
        crop_option,
        click.option("--scale-range", type=float, nargs=2, default=(0.5, 2.0), show_default=True,
                     callback=check_scale_range, metavar="LOW HIGH",
                     help=prefix + "Random scale range, 0 < LOW <= HIGH (HRNet: 0.5 2.0)."),
        click.option("--no-flip", is_flag=True, help=prefix + "Disable the random horizontal flip."),
        click.option("--short-side", type=click.IntRange(min=1), default=None,
                     help=prefix + "Resize so the short side is N, before anything else."),
        click.option("--size", type=HxW(), default=None, help=prefix + "Resize to exactly HxW, before anything else."),
    ]):
        fn = opt(fn)
    return fn


def view_options(fn):
    """extract's: how each view is made from an image."""
    return _view_options(fn, click.option("--crop", type=HxW(), default=None,
                                          help="Crop of each augmented view (default: 512x512)."))


def train_view_options(fn):
    """train-decoder's: --crop means two things (from a cache, or --online); the other options are --online's."""
    crop = click.option(
        "--crop", type=HxW(), default=None,
        help=f"From a cache: a random crop in feature space, each side a multiple of {FEATURE_CROP_ALIGN} (default: "
             "none, whole stored views). With --online: the augmentation crop, as extract's (default: 512x512).")
    return _view_options(fn, crop, prefix="[--online] ")


def encoder_options(fn):
    for opt in reversed([
        click.option("--encoder", default=DEFAULT_ENCODER, show_default=True,
                     help="timm model tag. The default (semi-supervised ResNet-50) is CC-BY-NC 4.0."),
        click.option("--weights", type=click.Path(), default=None, help="Encoder weights (.pth/.safetensors), offline."),
        click.option("--random-init", is_flag=True, help="Explicitly random encoder weights (seeded by --seed)."),
        click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                     help="Seed of every random draw: the --random-init weights and each view's augmentation "
                          "(train-decoder: also the decoder's initialisation, the batch order and the "
                          "feature-space crops)."),
        click.option("--strides", type=Strides(), default=",".join(map(str, DEFAULT_STRIDES)), show_default=True,
                     help="Feature strides to extract: powers of 2 from 2 to 32, ascending."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
    ]):
        fn = opt(fn)
    return fn


def cache_options(fn):
    """train-decoder's and compare's: where cached views are read from, how they are held, and checkpointing."""
    for opt in reversed([
        click.option("--cache-mode", type=click.Choice(CACHE_MODES), default="auto", show_default=True,
                     help="Where cached views are read from: decoded once into device memory, into (pinned) host RAM, "
                          "or streamed from the store by DataLoader workers every epoch. auto: the fastest that fits "
                          "(it says which and why)."),
        click.option("--resident-dtype", type=click.Choice(RESIDENT_DTYPES), default="auto", show_default=True,
                     help="How the device and ram tiers hold the views, whatever the store's dtype: float16 (as "
                          "stored), uint8, float8 (e4m3) or int4 (per-channel scale and offset, stochastic rounding), "
                          "decoded per batch on the device. auto: the most precise that fits (it says which and why)."),
        click.option("--checkpoint-activations", is_flag=True,
                     help="Recompute the decoder's activations in the backward pass, per HRNet module, instead of "
                          "keeping them (torch.utils.checkpoint): less memory, more time, the same gradients."),
    ]):
        fn = opt(fn)
    return fn


def tta_options(fn):
    """evaluate's and predict's: test-time augmentation."""
    for opt in reversed([
        click.option("--flip", is_flag=True, help="Test-time augmentation: also predict the mirrored image and "
                     "average the logits (as HRNet's and mmsegmentation's evaluations)."),
        click.option("--scales", type=Scales(), default="1.0", show_default=True,
                     help="Test-time scales, e.g. 0.75,1.0,1.25: the image is resized by each and the logits "
                          "averaged."),
    ]):
        fn = opt(fn)
    return fn


def schedule_options(fn):
    """train-decoder's and compare's: the views, the schedule, the loss and where training starts from."""
    for opt in reversed([
        click.option("--views", type=click.IntRange(min=1), default=None,
                     help="Use only each image's first N cached views (default: all); e.g. to see how many a task "
                          "needs."),
        click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="The global batch."),
        click.option("--lr", type=POSITIVE, default=0.01, show_default=True, help="Initial learning rate (poly decay)."),
        click.option("--loss", type=click.Choice(["ohem", "ce"]), default="ohem", show_default=True),
        click.option("--ohem-thresh", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
                     help="[ohem] Pixels whose true class has a lower predicted probability are kept as hard."),
        click.option("--ohem-min-kept", type=click.IntRange(min=1), default=131072, show_default=True,
                     help="[ohem] Keep at least this many hardest pixels per batch."),
        click.option("--class-weights", default="none", show_default=True, metavar="none|median-freq|inverse-log|FILE",
                     help="Per-class loss weights: SegNet's median frequency balancing, ENet's 1/ln(1.02 + p), or a "
                          "JSON file (a list in class order, or {class: weight}); counted from the training store's "
                          "labels."),
        click.option("--val-every", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Validate every N epochs."),
        click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Log the loss every N steps."),
        click.option("--init", "init", type=click.Path(), default=None,
                     help="Start from a decoder checkpoint trained on another dataset (classifier re-initialised "
                          "when the class sets differ)."),
    ]):
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fusion-seg")
def main():
    """Train segmentation decoders on a frozen backbone from a Zarr feature cache."""


@main.command()
@dataset_options
@click.option("--views", type=click.IntRange(min=1), default=1, show_default=True, help="Augmented views per image.")
@view_options
@encoder_options
@click.option("--dtype", type=click.Choice(DTYPES), default=DEFAULT_DTYPE, show_default=True,
              help="Storage dtype; uint8 is lossy (per-channel scale), see BENCHMARKS.md for its accuracy cost.")
@click.option("--codec", type=click.Choice(list(CODECS)), default=DEFAULT_CODEC,
              show_default=True, help="Chunk compression (each chunk also carries a crc32c checksum).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Views per encoder forward.")
@click.option("--loader-workers", "--workers", "loader_workers", type=click.IntRange(min=0), default=2,
              show_default=True,
              help="DataLoader processes decoding views (in-process extraction); --workers is the same option, "
                   "DataLoader processes as in every command.")
@click.option("--dask-workers", type=click.IntRange(min=1), default=None,
              help="Extract on a new local dask cluster of N worker processes (pip install 'fusion-seg[distributed]').")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Extract on a running dask.distributed cluster (see README, Scaling out).")
@click.option("--repair", is_flag=True, help="Verify every chunk first and re-extract corrupt or skipped views.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable samples (`fusion-seg info` lists them) instead of stopping.")
@click.option("--out", required=True, type=click.Path(), help="Feature store (a .zarr folder).")
@user_errors
def extract(**params):
    """Run the frozen encoder once per view and store multi-scale features (resumable)."""
    from fusion_seg.extract.local import extract as run
    from fusion_seg.pipeline.requests import extract_arguments

    r = run(**extract_arguments(option_values(params)))
    of_them = f", {len(r.skipped)} of them skipped as bad input" if r.skipped else ""
    click.echo(f"{r.store}: {r.views_written} views written{of_them} ({r.views_total} in store), "
               f"{r.views_per_second:.2f} views/s")
    for bad in r.skipped:
        click.secho(f"skipped view {bad['view']} ({bad['image_id']}): {bad['error']}", fg="yellow", err=True)
    if r.views_skipped:  # this run's, or an earlier one's: the store is complete without them
        views = f"{r.views_skipped} view" + ("s" if r.views_skipped > 1 else "")
        click.secho(f"{r.store} holds {views} skipped as bad input (`fusion-seg info {r.store}` lists why): once the "
                    "inputs are fixed, re-run this command with --repair to extract them.", fg="yellow", err=True)


@main.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@user_errors
def verify(store, as_json):
    """Read every chunk of a feature store and list the views that are corrupt or missing (exit 1 if any)."""
    from fusion_seg.cache.store import verify_store

    report = verify_store(store, progress=not as_json)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for bad in report["metadata"]:
            click.echo(f"BAD array {bad['array']}: {bad['file']}: {bad['error']}")
        for bad in report["bad"]:
            click.echo(f"BAD view {bad['view']}: {bad['chunk']}: {bad['error']}")
        if report["incomplete"]:
            click.echo(f"INCOMPLETE {len(report['incomplete'])} views (first: {report['incomplete'][:10]})")
        if report["skipped"]:
            click.echo(f"SKIPPED {len(report['skipped'])} views as bad input (`fusion-seg info` lists why)")
        views_bad = len({b["view"] for b in report["bad"]})
        arrays_bad = f", {len(report['metadata'])} arrays with unusable metadata" if report["metadata"] else ""
        click.echo(f"{store}: {report['views']} views, {views_bad} corrupt, {len(report['incomplete'])} incomplete, "
                   f"{len(report['skipped'])} skipped{arrays_bad}")
        if not report["ok"]:
            click.echo("Fix: re-run the extract command that made this store with --repair.")
    sys.exit(0 if report["ok"] else 1)


@main.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@user_errors
def info(store, as_json):
    """Schema, size, compression ratio and encoder identity of a feature store."""
    from fusion_seg.cache.store import FeatureStore
    from fusion_seg.cache.codecs import codec_label

    d = FeatureStore.open(store).info()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    enc = d["encoder"]
    ratio = d["compression_ratio"]
    versus_raw = ("n/a" if not ratio else f"{ratio:.2f}x smaller than raw fp16" if ratio >= 1
                  else f"{1 / ratio:.2f}x larger than raw fp16")
    size = f"{d['bytes_on_disk'] / 2**20:.1f} MiB" if d["bytes_on_disk"] is not None else "n/a (remote)"
    skipped = f", {len(d['skipped'])} skipped as bad input" if d["skipped"] else ""
    click.echo(f"store          {d['path']}\nschema         v{d['schema_version']}\n"
               f"dataset        {d['dataset']} / {d['split']} ({d['num_classes']} classes)\n"
               f"views          {d['views_complete']} of {d['views']} complete ({d['images']} images){skipped}\n"
               f"stored         {size}, {versus_raw} ({d['dtype']}, {codec_label(d['codec'])})\n"
               f"encoder        {enc['tag']}  weights={enc['weights']}  sha256={enc['weights_sha256'][:16]}\n"
               f"normalise      mean={enc['mean']} std={enc['std']}")
    for name, a in d["arrays"].items():
        click.echo(f"  {name:<6} {str(a['shape']):<28} {a['dtype']}")
    click.echo(f"  labels {d['label_shape']}  augment={d['augment']}  resize={d['resize']}")
    for bad in d["skipped"]:
        click.echo(f"  skipped view {bad['view']} ({bad['image_id']}): {bad['error']}")


# train-decoder's options that only one of its two modes uses, and what to say when the other is given them.
ONLINE_ONLY = ("dataset", "root", "split", "dataset_opt", "no_augment", "scale_range", "no_flip", "short_side", "size",
               "encoder", "weights", "random_init", "strides")
CACHE_ONLY = ("cache", "views", "resident_dtype")
UNUSED = {False: "only --online training uses {flags} (from a cache, its views were made by extract); drop {them}, "
                 "or add --online to train from images.",
          True: "--online training does not use {flags} (it draws a fresh view of each image every epoch); drop "
                "{them}, or drop --online to train from a cache."}


def refuse_unused_options(ctx: click.Context, online: bool) -> None:
    """Refuse options given on the command line that the mode in use would ignore (the other mode's)."""
    names = CACHE_ONLY if online else ONLINE_ONLY
    given = [p for p in ctx.command.params
             if p.name in names and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    if given:
        flags = ", ".join(p.opts[-1] if p.name.startswith("no_") else p.opts[0] for p in given)
        raise UserError(UNUSED[online].format(flags=flags, them="them" if len(given) > 1 else "it"))


@main.command("train-decoder")
@click.option("--cache", type=click.Path(), default=None, help="Training feature store.")
@click.option("--val-cache", type=click.Path(), default=None, help="Validation feature store (whole images).")
@click.option("--allow-val-on-train", is_flag=True,
              help="Accept a --val-cache that holds the training data (the --cache store, or the same split with "
                   "the same augmentation), with a warning; refused otherwise.")
@click.option("--online", is_flag=True, help="Run the frozen encoder every step instead of reading a cache.")
@click.option("--dataset", type=click.Choice(DATASET_NAMES), default=None, help="[--online] dataset name.")
@click.option("--root", type=click.Path(), default=None, help="[--online] dataset root.")
@click.option("--split", default="train", show_default=True, help="[--online] split.")
@click.option("--dataset-opt", "dataset_opt", multiple=True, metavar="KEY=VALUE", help="[--online] dataset option.")
@train_view_options
@encoder_options
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="DataLoader worker processes.")
@cache_options
@click.option("--decoder", type=click.Choice(DECODER_NAMES), default="reverse-hrnet", show_default=True,
              help="Decoder to train (hrnet: the end-to-end HRNet baseline, with --online only).")
@click.option("--streams", type=click.IntRange(4, 5), default=None, help="[reverse-hrnet] 4 (default) or 5 streams.")
@click.option("--preset", default=None, help="Decoder size preset, small by default (reverse-hrnet: small, w18, "
              "w48; fpn: small, paper; eseg: small, d0, d3; frm: small, base; exfuse: small, large).")
@click.option("--modules", type=IntList(minimum=1), default=None,
              help="[reverse-hrnet] HR modules per stage, e.g. 3,4,1.")
@click.option("--blocks", type=click.IntRange(min=1), default=None, help="[reverse-hrnet] BasicBlocks per branch.")
@click.option("--decoder-opt", "decoder_opt", multiple=True, metavar="KEY=VALUE",
              help=f"Any other decoder option as KEY=VALUE, the value in JSON, e.g. {DECODER_OPT_EXAMPLE} "
                   "(repeatable).")
@schedule_options
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last.pt (with the same settings; an explicit --lr may change).")
@click.option("--tensorboard", is_flag=True,
              help="Also write the scalars to OUT/tensorboard (pip install 'fusion-seg[tensorboard]').")
@click.option("--sync-bn", is_flag=True,
              help="[torchrun, CUDA] BatchNorm statistics over the global batch (SyncBatchNorm), not each process's.")
@click.option("--out", required=True, type=click.Path(), help="Run directory, e.g. runs/NAME.")
@click.pass_context
@user_errors
def train_decoder(ctx, **params):
    """Train only the decoder, from a feature cache (or --online from images).

    Under torchrun (`torchrun --nproc_per_node N -m fusion_seg train-decoder ...`) the cache path
    trains with DistributedDataParallel; --batch-size stays the global batch.
    """
    from fusion_seg.training.ddp import is_main_process
    from fusion_seg.progress import require_tensorboard
    from fusion_seg.pipeline.requests import online_arguments, split_train_options
    from fusion_seg.pipeline.stages import train_config
    from fusion_seg.training.run_dir import resumed_lr
    from fusion_seg.training.train import train_decoder as from_cache, train_online

    refuse_unused_options(ctx, params["online"])
    options = option_values(params)
    cache, val_cache, allow_val_on_train, online, resume, out = (
        options.pop(k) for k in ("cache", "val_cache", "allow_val_on_train", "online", "resume", "out"))
    if resume and ctx.get_parameter_source("lr").name == "DEFAULT":
        options["lr"] = resumed_lr(out, options["lr"])  # --resume keeps the run's lr; only an explicit --lr changes it
    options, images = split_train_options(options, online=online)  # which --crop is meant: see there
    cfg = train_config(options)
    if cfg.tensorboard:
        require_tensorboard()  # refuse before any cache is loaded
    if online:
        if not images["dataset"]:
            raise UserError("--online needs --dataset (and --root, --split) to read images from.")
        r = train_online(out, cfg, **online_arguments(images), val_cache=val_cache, resume=resume,
                         allow_val_on_train=allow_val_on_train)
    else:
        if not cache:
            raise UserError("pass --cache STORE (made by `fusion-seg extract`), or --online with dataset options.")
        r = from_cache(cache, out, cfg, val_cache=val_cache, resume=resume, allow_val_on_train=allow_val_on_train)
    best = f"{r.best_miou:.4f}" if r.best_miou is not None else "n/a"
    if is_main_process():  # under torchrun, print once
        if r.losses:
            click.echo(f"{r.run_dir}: {len(r.losses)} steps in {r.seconds:.1f}s (step {r.steps} of the run), "
                       f"best val mIoU {best}")
        else:
            click.echo(f"{r.run_dir}: already finished ({r.epochs} epochs, {r.steps} steps), nothing to train; "
                       f"best val mIoU {best}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path())
@dataset_options
@click.option("--out", type=click.Path(), default=None,
              help="Output folder (default: one beside the checkpoint per evaluation setting, e.g. "
                   "eval-best-camvid-val-flip-1a2b3c4d: checkpoint, dataset, split, TTA, a hash of root and options).")
@click.option("--sliding-window", is_flag=True, help="Sliding-window inference with the training crop.")
@tta_options
@click.option("--weights", type=click.Path(), default=None, help="Encoder weights file, if the checkpoint needs one.")
@click.option("--device", default="auto", show_default=True)
@user_errors
def evaluate(checkpoint, dataset, root, split, dataset_opt, out, sliding_window, flip, scales, weights, device):
    """Pixel accuracy, mIoU, per-class IoU and confusion matrix, end to end on images."""
    from fusion_seg.evaluation.evaluate import evaluate as run

    r = run(checkpoint, dataset=dataset, root=root, split=split, out=out, sliding_window=sliding_window,
            flip=flip, scales=scales, weights=weights, device=device, dataset_options=parse_key_values(dataset_opt))
    click.echo(f"pixel acc {r['pixel_acc']:.4f}  mIoU {r['miou']:.4f}  mean acc {r['mean_acc']:.4f}")
    if "iiou_class" in r:  # Cityscapes with instance maps
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        click.echo(f"iIoU class {fmt(r['iiou_class'])}  IoU category {fmt(r['iou_category'])}  "
                   f"iIoU category {fmt(r['iiou_category'])}")
    for name, iou in r["per_class_iou"].items():
        click.echo(f"  {name:<20} {'absent' if iou is None else f'{iou:.4f}'}")
    click.echo(f"written to {r['out']}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path())
@click.option("--input", "inputs", required=True, type=click.Path(), help="An image file or a folder of images.")
@click.option("--out", required=True, type=click.Path())
@click.option("--sliding-window", is_flag=True, help="Sliding-window inference with the training crop.")
@tta_options
@click.option("--weights", type=click.Path(), default=None, help="Encoder weights file, if the checkpoint needs one.")
@click.option("--device", default="auto", show_default=True)
@user_errors
def predict(checkpoint, inputs, out, sliding_window, flip, scales, weights, device):
    """Image(s) to label PNGs and colour overlays, end to end."""
    from fusion_seg.inference.predict import predict as run

    r = run(checkpoint, inputs, out, sliding_window=sliding_window, flip=flip, scales=scales, weights=weights,
            device=device)
    click.echo(f"{r['images']} image(s) -> {r['out']}")


@main.command()
@click.option("--cache", required=True, type=click.Path(), help="Training feature store.")
@click.option("--val-cache", type=click.Path(), default=None, help="Validation feature store.")
@click.option("--decoders", type=NameList(CACHE_DECODER_NAMES), default=",".join(CACHE_DECODER_NAMES),
              show_default=True, help="Comma-separated decoder names, each trained with its defaults (not hrnet, "
                                      "which trains end to end: train-decoder --online).")
@schedule_options
@click.option("--crop", type=HxW(multiple=FEATURE_CROP_ALIGN), default=None,
              help=f"Random feature-space crop, each side a multiple of {FEATURE_CROP_ALIGN} (default: whole views).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the decoders' initialisation, the batch order and the crops.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="DataLoader worker processes.")
@cache_options
@click.option("--device", default="auto", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timing repetitions (median).")
@click.option("--tensorboard", is_flag=True,
              help="Also write each decoder's scalars to OUT/DECODER/tensorboard (pip install 'fusion-seg[tensorboard]').")
@click.option("--out", required=True, type=click.Path(), help="Output folder, e.g. runs/compare.")
@user_errors
def compare(**params):
    """Train several decoders from one cache with one schedule and tabulate them.

    Each decoder trains with its defaults and every other setting given here, as train-decoder would train it
    (the whole configuration goes to its training process as data), and its run folder OUT/DECODER continues
    a run of the same settings or keeps one of other settings aside, as a recipe's does."""
    from fusion_seg.pipeline.stages import train_config
    from fusion_seg.reports.compare import compare as run

    options = option_values(params)
    cache, val_cache, decoders, repeats, out = (options.pop(k) for k in ("cache", "val_cache", "decoders", "repeats",
                                                                        "out"))
    run(cache, out, train_config(options), val_cache=val_cache, decoders=decoders, repeats=repeats)
    click.echo((Path(out) / "compare.md").read_text())
    click.echo(f"written to {out}/compare.json, compare.md" + (", compare.png" if (Path(out) / "compare.png").exists()
                                                                 else ""))


@main.command()
@click.option("--checkpoint", "checkpoints", required=True, multiple=True, type=click.Path(),
              help="Decoder checkpoint; repeat to compare rows (e.g. HRNet baseline and reverse HRNet).")
@click.option("--input", "image", required=True, type=click.Path(), help="An image file.")
@click.option("--mask", type=click.Path(), default=None, help="Its ground-truth mask, if any.")
@click.option("--out", required=True, type=click.Path(),
              help="Output figure; its suffix says the format: .png, .pdf, .svg, .jpg, ...")
@click.option("--weights", type=click.Path(), default=None, help="Encoder weights file, if a checkpoint needs one.")
@click.option("--device", default="cpu", show_default=True)
@user_errors
def visualize(checkpoints, image, mask, out, weights, device):
    """The paper's Figure 2: prediction and decoder feature maps (PCA) at strides 4-32, per checkpoint."""
    from fusion_seg.reports.visualize import visualize as run

    path = run([Path(c) for c in checkpoints], Path(image), Path(out), mask_path=Path(mask) if mask else None,
               device=device, weights=weights)
    click.echo(f"written {path}")


@main.command()
@click.argument("store", type=click.Path(), required=False)
@click.option("--dataset", type=click.Choice(DATASET_NAMES), default=None,
              help="Plan for a dataset not extracted yet (with --size; see --root, --split).")
@click.option("--root", type=click.Path(), default=None, help="[--dataset] root folder.")
@click.option("--split", default="train", show_default=True, help="[--dataset] split.")
@click.option("--dataset-opt", "dataset_opt", multiple=True, metavar="KEY=VALUE", help="[--dataset] option.")
@click.option("--size", type=HxW(), default=None, help="[--dataset] size of each cached view, e.g. 512x1024.")
@click.option("--views", type=click.IntRange(min=1), default=None,
              help="K cached views per image (default: the store's, or 2).")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True,
              help="E passes over the images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--decoder", type=click.Choice(CACHE_DECODER_NAMES), default="reverse-hrnet", show_default=True)
@click.option("--decoder-opt", "decoder_opt", multiple=True, metavar="KEY=VALUE", help="Decoder option (repeatable).")
@click.option("--encoder", default="resnet50", show_default=True, help="timm tag (timings only: random-init weights).")
@click.option("--device", default="auto", show_default=True, help="The device you will train on.")
@click.option("--bench-json", type=click.Path(), default=None,
              help="Rates from `fusion-seg bench --json FILE` instead of probing (scaled to this batch and size).")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True, help="Probe repetitions.")
@click.option("--images", type=click.IntRange(min=1), default=None,
              help="[--dataset] its training images, to plan without its data (the view shapes come from the encoder "
                   "at --size; e.g. 2975 for Cityscapes).")
@click.option("--device-memory", type=POSITIVE, default=None, metavar="GIB",
              help="Plan for this much free device memory (another machine's, e.g. 141 for an H200).")
@click.option("--host-memory", type=POSITIVE, default=None, metavar="GIB",
              help="Plan for this much host RAM (another machine's).")
@click.option("--json", "json_path", type=click.Path(), default=None, callback=written_as("JSON", ".json"),
              help="Also write the plan as JSON (a .json file).")
@user_errors
def plan(store, dataset, root, split, dataset_opt, size, views, epochs, batch_size, decoder, decoder_opt, encoder,
         device, bench_json, repeats, images, device_memory, host_memory, json_path):
    """Project the whole schedule's time and memory: cache (each tier and resident format), online-frozen,
    fine-tuning; recommend one.

    It says so when online-frozen training beats the cache on this hardware. For a machine that is not this one,
    give its memory (--device-memory, --host-memory); without its rates (--bench-json), the plan is of memory alone.
    """
    from fusion_seg.reports.plan import PlanRequest, plan as run, to_text

    req = PlanRequest(store=store, dataset=dataset, root=root, split=split,
                      dataset_options=parse_key_values(dataset_opt), size=tuple(size) if size else None, views=views,
                      epochs=epochs, batch_size=batch_size, device=device, decoder=decoder,
                      decoder_config=parse_key_values(decoder_opt), encoder=encoder, bench_json=bench_json,
                      repeats=repeats, images=images, device_memory=device_memory, host_memory=host_memory)
    result = run(req, echo=lambda m: click.echo(m, err=True))
    click.echo(to_text(result))
    if json_path:
        from dataclasses import asdict

        from fusion_seg.files import write_json_atomic

        with writing(json_path, "the plan", "--json"):
            write_json_atomic(json_path, asdict(result))


@main.command()
@click.argument("recipe", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE", help="Override a [vars] entry.")
@click.option("--dry-run", is_flag=True, help="Print the stages and resolved settings, run nothing.")
@click.option("--epoch-scale", type=POSITIVE, default=1.0, show_default=True,
              help="Multiply every train stage's epochs (e.g. 0.1 for a tenth of the paper's schedule).")
@user_errors
def run(recipe, overrides, dry_run, epoch_scale):
    """Run the stages of a TOML recipe; stages already done with the same settings are skipped."""
    from fusion_seg.pipeline.recipes import run_recipe

    pairs = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        pairs[k] = v
    run_recipe(recipe, overrides=pairs, dry_run=dry_run, epoch_scale=epoch_scale, echo=click.echo)


@main.command()
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (AMP bf16, channels_last, pinned memory).")
@click.option("--sections", default="extraction,format,training,scaling,inference", show_default=True,
              help="Comma-separated sections to run.")
@click.option("--camvid", type=click.Path(), default="../shared/data/camvid", show_default=True,
              help="CamVid root for real images and features (synthetic images when it does not exist).")
@click.option("--encoder", default="resnet50", show_default=True)
@click.option("--weights", type=click.Path(), default=None, help="Encoder weights; default a seeded random init.")
@click.option("--decoder", type=click.Choice(CACHE_DECODER_NAMES), default="reverse-hrnet", show_default=True)
@click.option("--decoder-opt", "decoder_opt", multiple=True, metavar="KEY=VALUE",
              help="Decoder option (repeatable); default: the reverse HRNet's preset=small streams=4, another "
                   "decoder's own defaults. Options given replace the default ones.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--size", type=HxW(), default="360x480", show_default=True, help="Input size of the main comparisons.")
@click.option("--scaling-sizes", type=HxWList(), default="360x480,720x960,1024x2048", show_default=True,
              help="Sizes (HxW, comma-separated) of the scaling section.")
@click.option("--forward-sizes", type=HxWList(), default="360x480,512x1024", show_default=True,
              help="Sizes (HxW, comma-separated) of the extraction section's bare encoder forward table.")
@click.option("--views", type=click.IntRange(min=1), default=32, show_default=True, help="Views per extraction run.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed repetitions (the median is quoted).")
@click.option("--loader-workers", "--workers", "loader_workers", type=click.IntRange(min=0), default=2,
              show_default=True, help="Training DataLoader worker processes.")
@click.option("--json", "json_path", type=click.Path(), default=None, callback=written_as("JSON", ".json"),
              help="Write the results as JSON (a .json file).")
@click.option("--markdown", "markdown_path", type=click.Path(), default=None,
              callback=written_as("Markdown", ".md", ".markdown"), help="Write the tables as Markdown (a .md file).")
@click.option("--update", "update_path", type=click.Path(), default=None,
              callback=written_as("Markdown", ".md", ".markdown"),
              help="Replace this device's bench block in a Markdown file (e.g. BENCHMARKS.md).")
@click.option("--workdir", type=click.Path(), default=None, help="Scratch folder (default: a temporary one).")
@user_errors
def bench(device, sections, camvid, encoder, weights, decoder, decoder_opt, batch_size, size, scaling_sizes,
          forward_sizes, views, repeats, loader_workers, json_path, markdown_path, update_path, workdir):
    """Measure extraction, cache formats, loader, training (cache/online/fine-tune), scaling and predict."""
    from fusion_seg.decoders import check_options
    from fusion_seg.reports.bench import BenchConfig, render_markdown, run_bench, save_json, update_benchmarks
    from fusion_seg.device import resolve_device

    resolve_device(device)  # a clear error when CUDA is asked for and absent
    decoder_config = parse_key_values(decoder_opt) or None
    check_options(decoder, decoder_config or {})
    cfg = BenchConfig(device=device, camvid=camvid, encoder=encoder, weights=weights, decoder=decoder,
                      decoder_config=decoder_config, batch_size=batch_size, size=tuple(size), views=views, repeats=repeats,
                      loader_workers=loader_workers, workdir=workdir,
                      scaling_sizes=scaling_sizes, forward_sizes=forward_sizes)
    results = run_bench(cfg, tuple(x.strip() for x in sections.split(",") if x.strip()), echo=click.echo)
    markdown = render_markdown(results)
    click.echo(markdown)
    if json_path:
        with writing(json_path, "the results", "--json"):
            save_json(results, Path(json_path))
    if markdown_path:
        from fusion_seg.files import write_text_atomic

        with writing(markdown_path, "the tables", "--markdown"):
            write_text_atomic(markdown_path, markdown)
    if update_path:
        with writing(update_path, "the tables", "--update"):
            update_benchmarks(Path(update_path), markdown, heading=device)
        click.echo(f"updated {update_path}")


if __name__ == "__main__":
    main()

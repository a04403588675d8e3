"""Stage two: ``train-decoder`` (from a cache, or ``--online``) and ``compare`` (several decoders, one schedule)."""
from __future__ import annotations

from pathlib import Path

import click

from fusion_seg.checks import FEATURE_CROP_ALIGN, MAX_SEED
from fusion_seg.cli.app import main
from fusion_seg.cli.names import CACHE_DECODER_NAMES, DATASET_NAMES, DECODER_NAMES, DECODER_OPT_EXAMPLE
from fusion_seg.cli.options import cache_options, encoder_options, schedule_options, train_view_options
from fusion_seg.cli.params import HxW, IntList, NameList, option_values
from fusion_seg.cli.shell import user_errors
from fusion_seg.errors import UserError


# train-decoder's options that only one of its two modes uses, and what to say when the other is given them.
ONLINE_ONLY = ("dataset", "root", "split", "dataset_opt", "no_augment", "scale_range", "no_flip", "short_side", "size",
               "encoder", "weights", "random_init", "strides", "photometric", "brightness", "contrast", "saturation",
               "hue", "blur")
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
    from fusion_seg.requests import online_arguments, split_train_options
    from fusion_seg.training.config import train_config

    refuse_unused_options(ctx, params["online"])
    options = option_values(params)
    cache, val_cache, allow_val_on_train, online, resume, out = (
        options.pop(k) for k in ("cache", "val_cache", "allow_val_on_train", "online", "resume", "out"))
    if resume and ctx.get_parameter_source("lr").name == "DEFAULT":
        from fusion_seg.training.run_dir import resumed_lr

        options["lr"] = resumed_lr(out, options["lr"])  # --resume keeps the run's lr; only an explicit --lr changes it
    options, images = split_train_options(options, online=online)  # which --crop is meant: see there
    if online and not images["dataset"]:
        raise UserError("--online needs --dataset (and --root, --split) to read images from.")
    if not online and not cache:
        raise UserError("pass --cache STORE (made by `fusion-seg extract`), or --online with dataset options.")
    requests = online_arguments(images) if online else None  # built and checked torch-free (requests.py)
    cfg = train_config(options)  # its decoder options are checked against the decoder registry (torch)
    from fusion_seg.progress import require_tensorboard
    from fusion_seg.training.ddp import is_main_process
    from fusion_seg.training.train import train_decoder as from_cache, train_online

    if cfg.tensorboard:
        require_tensorboard()  # refuse before any cache is loaded
    if online:  # both are fusion_seg.train, with OnlineData or CachedData
        r = train_online(out, cfg, **requests, val_cache=val_cache, resume=resume,
                         allow_val_on_train=allow_val_on_train)
    else:
        r = from_cache(cache, out, cfg, val_cache=val_cache, resume=resume, allow_val_on_train=allow_val_on_train)
    best = f"{r.best_miou:.4f}" if r.best_miou is not None else "n/a"
    if r.stopped_early:
        best += f" (epoch {r.stopped_early['best_epoch']}; stopped early after epoch {r.stopped_early['epoch']})"
    if is_main_process():  # under torchrun, print once
        if r.losses:
            click.echo(f"{r.run_dir}: {len(r.losses)} steps in {r.seconds:.1f}s (step {r.steps} of the run), "
                       f"best val mIoU {best}")
        else:
            click.echo(f"{r.run_dir}: already finished ({r.epochs} epochs, {r.steps} steps), nothing to train; "
                       f"best val mIoU {best}")


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
    from fusion_seg.training.config import train_config
    from fusion_seg.reports.compare import compare as run

    options = option_values(params)
    cache, val_cache, decoders, repeats, out = (options.pop(k) for k in ("cache", "val_cache", "decoders", "repeats",
                                                                        "out"))
    run(cache, out, train_config(options), val_cache=val_cache, decoders=decoders, repeats=repeats)
    click.echo((Path(out) / "compare.md").read_text())
    click.echo(f"written to {out}/compare.json, compare.md" + (", compare.png" if (Path(out) / "compare.png").exists()
                                                                 else ""))

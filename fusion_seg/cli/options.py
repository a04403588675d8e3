"""Options that several commands share, as decorators: a dataset, its views, the encoder, the cache tiers,
the training schedule and test-time augmentation."""
from __future__ import annotations

import click

from fusion_seg.checks import BACKENDS, CACHE_MODES, FEATURE_CROP_ALIGN, MAX_SEED, PRECISIONS, RESIDENT_DTYPES
from fusion_seg.cli.names import DATASET_NAMES, DEFAULT_ENCODER, DEFAULT_STRIDES
from fusion_seg.cli.params import POSITIVE, HxW, Scales, Strides, check_scale_range


def stacked(*options):
    """A decorator adding ``options`` to a command, in the order given (the order ``--help`` lists them)."""
    def add(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return add


# extract's, train-decoder's, compare's, evaluate's and predict's: the forward's precision (device.py).
precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="The forward's precision: fp32, or bf16 autocast (on CUDA, or a CPU with AVX-512 BF16/AMX). auto: bf16 "
         "on CUDA, fp32 on the CPU (see BENCHMARKS.md, Deploying). Stores record the encoder's.")

# evaluate's and predict's: which runtime runs the model.
backend_option = click.option(
    "--backend", type=click.Choice(BACKENDS), default="torch", show_default=True,
    help="torch runs a checkpoint (.pt); onnxruntime runs the model `fusion-seg export` wrote (--checkpoint "
         "model.onnx; pip install 'fusion-seg[onnx]').")


dataset_options = stacked(
    click.option("--dataset", required=True, type=click.Choice(DATASET_NAMES), help="Dataset name."),
    click.option("--root", type=click.Path(), default=None, help="Dataset root folder."),
    click.option("--split", required=True, help="Split name, e.g. train or val."),
    click.option("--dataset-opt", "dataset_opt", multiple=True, metavar="KEY=VALUE",
                 help="Dataset-specific option, e.g. num_images=8 for synthetic (repeatable)."),
)


def _view_options(crop_option, prefix: str = ""):
    return stacked(
        click.option("--no-augment", is_flag=True, help=prefix + "Take the whole (resized) image, no augmentation."),
        crop_option,
        click.option("--scale-range", type=float, nargs=2, default=(0.5, 2.0), show_default=True,
                     callback=check_scale_range, metavar="LOW HIGH",
                     help=prefix + "Random scale range, 0 < LOW <= HIGH (HRNet: 0.5 2.0)."),
        click.option("--no-flip", is_flag=True, help=prefix + "Disable the random horizontal flip."),
        click.option("--photometric", is_flag=True,
                     help=prefix + "Also a photometric draw per view: mmseg's PhotoMetricDistortion (brightness, "
                                   "contrast, saturation, hue; each step with probability 1/2) and --blur."),
        click.option("--brightness", type=click.FloatRange(0, 255), default=None, metavar="DELTA",
                     help=prefix + "[--photometric] Brightness delta in pixel values (default 32, mmseg's)."),
        click.option("--contrast", type=float, nargs=2, default=None, callback=check_scale_range,
                     metavar="LOW HIGH", help=prefix + "[--photometric] Contrast factor range (default 0.5 1.5)."),
        click.option("--saturation", type=float, nargs=2, default=None, callback=check_scale_range,
                     metavar="LOW HIGH", help=prefix + "[--photometric] Saturation factor range (default 0.5 1.5)."),
        click.option("--hue", type=click.FloatRange(0, 180), default=None, metavar="DEGREES",
                     help=prefix + "[--photometric] Hue rotation up to this many degrees (default 36: mmseg's 18 "
                                   "on OpenCV's 0-180 scale)."),
        click.option("--blur", type=click.FloatRange(0, 1), default=None, metavar="P",
                     help=prefix + "[--photometric] Probability of a Gaussian blur, sigma 0.1-2.0 (default 0)."),
        click.option("--short-side", type=click.IntRange(min=1), default=None,
                     help=prefix + "Resize so the short side is N, before anything else."),
        click.option("--size", type=HxW(), default=None, help=prefix + "Resize to exactly HxW, before anything else."),
    )


# extract's: how each view is made from an image.
view_options = _view_options(click.option("--crop", type=HxW(), default=None,
                                          help="Crop of each augmented view (default: 512x512)."))


# train-decoder's: --crop means two things (from a cache, or --online); the other options are --online's.
train_view_options = _view_options(click.option(
    "--crop", type=HxW(), default=None,
    help=f"From a cache: a random crop in feature space, each side a multiple of {FEATURE_CROP_ALIGN} (default: "
         "none, whole stored views). With --online: the augmentation crop, as extract's (default: 512x512)."),
    prefix="[--online] ")


encoder_options = stacked(
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
)


# train-decoder's and compare's: where cached views are read from, how they are held, and checkpointing.
cache_options = stacked(
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
)


# evaluate's and predict's: test-time augmentation.
tta_options = stacked(
    click.option("--flip", is_flag=True, help="Test-time augmentation: also predict the mirrored image and "
                 "average the logits (as HRNet's and mmsegmentation's evaluations)."),
    click.option("--scales", type=Scales(), default="1.0", show_default=True,
                 help="Test-time scales, e.g. 0.75,1.0,1.25: the image is resized by each and the logits "
                      "averaged."),
)


# evaluate's and predict's: how the model runs on an image.
inference_options = stacked(
    click.option("--sliding-window", is_flag=True, help="Sliding-window inference with the training crop."),
    tta_options,
    click.option("--weights", type=click.Path(), default=None, help="Encoder weights file, if the checkpoint needs one."),
    click.option("--device", default="auto", show_default=True),
    precision_option,
    backend_option,
)


# train-decoder's and compare's: the views, the schedule, the loss and where training starts from.
schedule_options = stacked(
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
    click.option("--patience", type=click.IntRange(min=1), default=None,
                 help="Stop early once the val mIoU has not improved for N epochs (needs --val-cache); best.pt "
                      "keeps the best epoch. Default: train every epoch."),
    click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
                 help="Log the loss every N steps."),
    click.option("--init", "init", type=click.Path(), default=None,
                 help="Start from a decoder checkpoint trained on another dataset (classifier re-initialised "
                      "when the class sets differ)."),
    precision_option,
)

"""Models at work on images: ``evaluate``, ``predict``, ``export`` (ONNX) and ``visualize`` (the paper's Figure 2)."""
from __future__ import annotations

from pathlib import Path

import click

from fusion_seg.cli.app import main
from fusion_seg.cli.options import dataset_options, inference_options
from fusion_seg.cli.params import parse_key_values
from fusion_seg.cli.shell import user_errors


@main.command()
@click.option("--checkpoint", required=True, type=click.Path())
@dataset_options
@click.option("--out", type=click.Path(), default=None,
              help="Output folder (default: one beside the checkpoint per evaluation setting, e.g. "
                   "eval-best-camvid-val-flip-1a2b3c4d: checkpoint, dataset, split, TTA, a hash of root and options).")
@inference_options
@user_errors
def evaluate(checkpoint, dataset, root, split, dataset_opt, out, sliding_window, flip, scales, weights, device,
             precision, backend):
    """Pixel accuracy, mIoU, per-class IoU and confusion matrix, end to end on images."""
    from fusion_seg.evaluation.evaluate import evaluate as run

    r = run(checkpoint, dataset=dataset, root=root, split=split, out=out, sliding_window=sliding_window,
            flip=flip, scales=scales, weights=weights, device=device, dataset_options=parse_key_values(dataset_opt),
            precision=precision, backend=backend)
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
@inference_options
@user_errors
def predict(checkpoint, inputs, out, sliding_window, flip, scales, weights, device, precision, backend):
    """Image(s) to label PNGs and colour overlays, end to end."""
    from fusion_seg.inference.predict import predict as run

    r = run(checkpoint, inputs, out, sliding_window=sliding_window, flip=flip, scales=scales, weights=weights,
            device=device, precision=precision, backend=backend)
    click.echo(f"{r['images']} image(s) -> {r['out']}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="A run's best.pt or last.pt.")
@click.option("--out", required=True, type=click.Path(), help="The ONNX file to write, e.g. model.onnx.")
@click.option("--weights", type=click.Path(), default=None, help="Encoder weights file, if the checkpoint needs one.")
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True, help="ONNX opset (17 or newer).")
@user_errors
def export(checkpoint, out, weights, opset):
    """The trained model (frozen encoder, decoder, upsample to the input size) as one ONNX file, with dynamic
    batch, height and width; run it with `predict --backend onnxruntime --checkpoint model.onnx`."""
    from fusion_seg.inference.export import export_onnx

    r = export_onnx(checkpoint, out, weights=weights, opset=opset)
    click.echo(f"{r.out}: {r.encoder} + {r.decoder} ({r.num_classes} classes), opset {r.opset}, "
               f"{r.bytes / 2**20:.1f} MiB, {r.seconds:.1f} s")


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

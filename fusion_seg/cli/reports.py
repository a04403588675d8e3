"""Planning and measuring, and the recipes: ``plan``, ``run`` and ``bench``."""
from __future__ import annotations

from pathlib import Path

import click

from fusion_seg.cli.app import main
from fusion_seg.cli.names import CACHE_DECODER_NAMES, DATASET_NAMES
from fusion_seg.cli.params import POSITIVE, HxW, HxWList, parse_key_values, written_as
from fusion_seg.cli.shell import user_errors, writing
from fusion_seg.errors import UserError


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
    from fusion_seg import run_recipe

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
              help="Comma-separated sections to run; also deploy (PyTorch fp32 against bf16, ONNX Runtime and "
                   "torch.compile; needs the onnx extra).")
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

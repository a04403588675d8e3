"""Stage one and its stores: ``extract``, ``info``, ``verify``."""
from __future__ import annotations

import json
import sys

import click

from fusion_seg.cache.codecs import CODECS, DEFAULT_CODEC, DEFAULT_DTYPE, DTYPES  # torch-free
from fusion_seg.cli.app import main
from fusion_seg.cli.options import dataset_options, encoder_options, precision_option, view_options
from fusion_seg.cli.params import option_values
from fusion_seg.cli.shell import user_errors


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
              help="Extract on a running dask.distributed cluster (see docs/scaling-out.md).")
@click.option("--repair", is_flag=True, help="Verify every chunk first and re-extract corrupt or skipped views.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable samples (`fusion-seg info` lists them) instead of stopping.")
@click.option("--out", required=True, type=click.Path(), help="Feature store (a .zarr folder).")
@precision_option
@user_errors
def extract(**params):
    """Run the frozen encoder once per view and store multi-scale features (resumable)."""
    from fusion_seg.requests import extract_arguments

    arguments = extract_arguments(option_values(params))  # built and checked torch-free (requests.py)
    from fusion_seg.extract.local import extract as run

    r = run(**arguments)
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

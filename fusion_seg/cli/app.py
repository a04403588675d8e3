"""The ``fusion-seg`` command group; each command registers itself on it from its module."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fusion-seg")
def main():
    """Train segmentation decoders on a frozen backbone from a Zarr feature cache."""

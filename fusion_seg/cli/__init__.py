"""``fusion-seg``: a thin command-line shell over the library functions.

User errors (:class:`fusion_seg.errors.UserError`) are printed as one line, with
no traceback, and exit with status 2. Every numeric option is range-checked while
the command line is parsed (click's usage error, also exit 2), before any work.

Importing this package (``--help``, ``info``, ``verify``) does not import torch or timm:
commands import the library inside their bodies, and the registries' names that the
options list come from torch-free modules or the copies in names.py (tested against the registries).

The package by job: ``app`` (the command group), ``names`` (the registries' names), ``params`` (parameter
types and parsing), ``options`` (options several commands share), ``shell`` (how a command ends: errors,
interruptions), and the commands by stage: ``stores`` (extract, info, verify), ``training`` (train-decoder,
compare), ``inference`` (evaluate, predict, visualize), ``reports`` (plan, run, bench).
"""
from __future__ import annotations

from fusion_seg.cli import inference, reports, stores, training  # noqa: F401  (each registers its commands)
from fusion_seg.cli.app import main
from fusion_seg.cli.names import (CACHE_DECODER_NAMES, DATASET_NAMES, DECODER_NAMES, DECODER_OPT_EXAMPLE,
                                  DEFAULT_ENCODER, DEFAULT_STRIDES)
from fusion_seg.cli.options import cache_options
from fusion_seg.cli.params import option_values, parse_key_values

__all__ = ["CACHE_DECODER_NAMES", "DATASET_NAMES", "DECODER_NAMES", "DECODER_OPT_EXAMPLE", "DEFAULT_ENCODER",
           "DEFAULT_STRIDES", "cache_options", "main", "option_values", "parse_key_values"]

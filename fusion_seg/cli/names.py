"""The registries' names as the command line lists them (choices, help), without importing the registries'
modules: --help stays torch-free. tests/test_cli.py checks each copy against its original."""
from __future__ import annotations

# Copies of the registries' names, which live in modules that import torch (decoders, encoder) or PIL and
# every dataset module (datasets): --help imports none of them. tests/test_cli.py checks them against the originals.
DATASET_NAMES = ("synthetic", "camvid", "folder", "cityscapes", "mapillary", "voc", "coco")  # datasets.DATASETS
DECODER_NAMES = ("reverse-hrnet", "linear", "fpn", "eseg", "frm", "exfuse", "hrnet")  # decoders.DECODERS
CACHE_DECODER_NAMES = tuple(d for d in DECODER_NAMES if d != "hrnet")  # hrnet trains end to end (--online) only
DEFAULT_ENCODER = "resnet50.fb_ssl_yfcc100m_ft_in1k"  # encoder.DEFAULT_ENCODER
DEFAULT_STRIDES = (2, 4, 8, 16, 32)  # encoder.DEFAULT_STRIDES
DECODER_OPT_EXAMPLE = "widths=[32,64,128,256]"  # --decoder-opt's help; tests/test_cli.py trains with it

"""The segmentation model (fusion_seg/inference/segmenter.py, sliding_window.py): encoder + decoder, rebuilt
from a checkpoint, logits at the image's size, whole or window by window."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fusion_seg.data.io import default_palette
from fusion_seg.decoders import build_decoder
from fusion_seg.encoder.build import build_encoder
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.inference.segmenter import (Segmenter, checkpoint_palette, load_segmenter, predict_logits,
                                            train_crop)
from fusion_seg.inference.sliding_window import sliding_window_logits
from fusion_seg.training.train import train_decoder
from pipeline_helpers import ENCODER, SYNTH, extract_synthetic, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch tiny decoder trained on 64x64 crops of 64x96 synthetic images; its run folder."""
    d = tmp_path_factory.mktemp("segmenter")
    extract_synthetic(d / "s.zarr", views=1, crop=(64, 64), num_images=2)
    train_decoder(str(d / "s.zarr"), d / "run", tiny_config(epochs=1), progress=False)
    return d / "run"


@pytest.fixture(scope="module")
def loaded(run):
    return load_segmenter(run / "best.pt", device="cpu")


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 255, (*SYNTH["size"], 3), dtype=np.uint8)


def test_segmenter_gives_logits_at_the_input_size():
    encoder = build_encoder(ENCODER, random_init=True, strides=(4, 8, 16, 32))
    torch.manual_seed(0)
    model = Segmenter(encoder, build_decoder("fpn", encoder.output_shape(), 5)).eval()
    for h, w in ((64, 64), (50, 70), (33, 97)):  # also sizes that are not multiples of the strides
        with torch.inference_mode():  # as predict and evaluate run it: the encoder's maps are inference tensors
            logits = model(torch.randn(2, 3, h, w))
        assert logits.shape == (2, 5, h, w) and torch.isfinite(logits).all()
    assert all(not p.requires_grad for p in model.encoder.parameters())  # the encoder stays frozen


def test_load_segmenter_round_trip(run, loaded):
    model, ckpt = loaded
    assert isinstance(model, Segmenter) and not model.training
    # The decoder is the trained one, weight for weight; the encoder is rebuilt as the checkpoint records it.
    state = model.decoder.state_dict()
    assert set(state) == set(ckpt["model"])
    assert all(torch.equal(state[k], ckpt["model"][k]) for k in state)
    assert model.encoder.identity == EncoderIdentity.from_dict(ckpt["encoder"])
    assert ckpt["classes"] == ["background", "disk", "box", "triangle"]
    # Loading again gives the same model.
    again, _ = load_segmenter(run / "best.pt", device="cpu")
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))
    # last.pt of a finished run holds the same weights as best.pt here (no validation: best is the last).
    last, _ = load_segmenter(run / "last.pt", device="cpu")
    with torch.inference_mode():
        assert torch.equal(model(x), last(x))


def test_predict_logits_at_the_image_size_or_out_size(loaded, image):
    model, ckpt = loaded
    logits = predict_logits(model, image, ckpt)
    assert logits.shape == (1, 4, *SYNTH["size"]) and logits.dtype == torch.float32
    assert predict_logits(model, image, ckpt, out_size=(32, 48)).shape == (1, 4, 32, 48)
    small = image[:40, :50]
    assert predict_logits(model, small, ckpt).shape == (1, 4, 40, 50)


def test_sliding_window_equals_whole_image_where_the_window_covers_it(loaded, image):
    model, ckpt = loaded
    assert train_crop(ckpt) == (64, 64)
    whole = predict_logits(model, image, ckpt)
    # A training crop at least the image's size: one window, the whole image.
    covering = {**ckpt, "data": {**ckpt["data"], "crop": list(SYNTH["size"])}}
    assert torch.equal(predict_logits(model, image, covering, sliding_window=True), whole)
    # Directly: a window of exactly the image's size is the whole image.
    x = torch.randn(1, 3, *SYNTH["size"])
    with torch.inference_mode():
        assert torch.allclose(sliding_window_logits(model, x, SYNTH["size"], 4), model(x), atol=1e-6)
    # A 64x64 window on the 64x96 image: two overlapping windows, the logits at the image's size.
    tiled = predict_logits(model, image, ckpt, sliding_window=True)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all() and not torch.equal(tiled, whole)


class _PerPixel(nn.Module):
    """A model without spatial context (a 1x1 convolution): its logits do not depend on the window."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("size,crop,stride", [((50, 70), (32, 32), None), ((64, 96), (64, 64), None),
                                              ((40, 41), (16, 24), (5, 7)), ((20, 30), (32, 32), None)])
def test_sliding_window_averages_overlaps_exactly(size, crop, stride):
    """Every pixel is covered; overlapping windows are averaged: a per-pixel model gives its whole-image logits."""
    model = _PerPixel()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        tiled = sliding_window_logits(model, x, crop, 5, stride=stride)
        assert tiled.shape == (1, 5, *size)
        assert torch.allclose(tiled, model(x), atol=1e-5)


def test_checkpoint_palette(loaded):
    _, ckpt = loaded
    palette = checkpoint_palette(ckpt)
    assert palette.shape == (len(ckpt["classes"]), 3) and palette.dtype == np.uint8
    assert np.array_equal(palette, default_palette(len(ckpt["classes"])))
    assert len({tuple(c) for c in palette}) == len(palette)  # one colour per class
    assert checkpoint_palette({"classes": ["a"] * 30}).shape == (30, 3)

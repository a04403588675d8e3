"""The decoders of the literature (linear, fpn, eseg, frm, exfuse): contract and paper-specific parts."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion_seg.decoders import DECODERS, build_decoder
from fusion_seg.decoders.eseg import BiFPNLayer, FastNormalizedFusion
from fusion_seg.decoders.exfuse import ExFuse, densely_adjacent_prediction
from fusion_seg.decoders.linear import LinearProbe
from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec, shapes_from_feature_info

from test_reverse_hrnet import FEATURE_INFO, NUM_CLASSES  # a backbone that is not ResNet-50

NAMES = ["linear", "fpn", "eseg", "frm", "exfuse"]
# A smaller input, not a multiple of 32 either (maps 18x22, 9x11, 5x6, 3x3), for the slower tests.
SMALL = (72, 88)


def sizes_for(h: int, w: int) -> dict[int, tuple[int, int]]:
    return {s: (math.ceil(h / s), math.ceil(w / s)) for s in (2, 4, 8, 16, 32)}


def make_features(shapes: dict[str, ShapeSpec], size=(100, 140), batch: int = 2):
    torch.manual_seed(0)
    sizes = sizes_for(*size)
    return {n: torch.randn(batch, s.channels, *sizes[s.stride]) for n, s in shapes.items()}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def shapes() -> dict[str, ShapeSpec]:
    return shapes_from_feature_info(FEATURE_INFO)


def test_registered():
    assert set(NAMES) <= set(DECODERS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(100, 140), (64, 64)])
def test_output_shape(shapes, name, size):
    dec = build_decoder(name, shapes, NUM_CLASSES)
    assert dec.output_stride == 4
    assert dec.required_strides == (4, 8, 16, 32)
    out = dec(make_features(shapes, size))
    assert out.shape == (2, NUM_CLASSES, *sizes_for(*size)[4])
    dec.eval()
    with torch.no_grad():
        assert dec(make_features(shapes, size, batch=1)).shape == (1, NUM_CLASSES,
                                                                    *sizes_for(*size)[4])


@pytest.mark.parametrize("name,kwargs", [
    ("linear", {}), ("linear", {"strides": [2, 8, 32]}),
    ("fpn", {}), ("fpn", {"preset": "paper", "norm": "bn"}),
    ("eseg", {}), ("eseg", {"preset": "d3", "max_level": 7, "norm": "gn"}),
    ("frm", {}), ("frm", {"preset": "base", "depth": 2}),
    ("exfuse", {}), ("exfuse", {"preset": "large", "dap_kernel": 5}),
])
def test_config_round_trips(shapes, name, kwargs):
    dec = build_decoder(name, shapes, NUM_CLASSES, **kwargs)
    config = json.loads(json.dumps(dec.config))
    assert config == dec.config
    rebuilt = build_decoder(name, shapes, NUM_CLASSES, **config)
    assert rebuilt.config == config
    a, b = dec.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(shapes, name):
    dec = build_decoder(name, shapes, NUM_CLASSES).train()
    out = dec(make_features(shapes, SMALL))
    labels = torch.randint(0, NUM_CLASSES, (2, *SMALL))
    loss = F.cross_entropy(F.interpolate(out, size=SMALL, mode="bilinear"), labels)
    if name == "exfuse":
        assert len(dec.aux_logits) == 3
        loss = loss + dec.aux_loss(labels, F.cross_entropy)
    loss.backward()
    dead = [n for n, p in dec.named_parameters() if p.grad is None]
    assert not dead


@pytest.mark.parametrize("name", NAMES)
def test_missing_stride_raises_user_error(shapes, name):
    no_s16 = {n: s for n, s in shapes.items() if s.stride != 16}
    with pytest.raises(UserError, match=r"stride-16 map.*available: s2 \(stride 2\).*--strides"):
        build_decoder(name, no_s16, NUM_CLASSES)


def test_options_of_another_decoder_raise_user_error(shapes):
    with pytest.raises(UserError, match=r"'fpn' has no option\(s\) streams; its options: preset"):
        build_decoder("fpn", shapes, NUM_CLASSES, streams=4, preset="small")
    with pytest.raises(UserError, match="its options: strides"):
        build_decoder("linear", shapes, NUM_CLASSES, preset="small")


def test_maps_are_selected_by_stride_not_name():
    shapes = {"layer1": ShapeSpec(24, 4), "layer2": ShapeSpec(40, 8),
              "layer3": ShapeSpec(80, 16), "layer4": ShapeSpec(160, 32)}
    for name in NAMES:
        dec = build_decoder(name, shapes, NUM_CLASSES)
        assert dec.in_features == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("name,kwargs", [
    ("fpn", {"preset": "huge"}), ("fpn", {"norm": "ln"}), ("fpn", {"fpn_width": 0}),
    ("fpn", {"head_width": 48}), ("eseg", {"norm": "gn", "width": 88}),
    ("eseg", {"max_level": 10}), ("eseg", {"repeats": 0}),
    ("frm", {"width": 60, "heads": 8}), ("frm", {"preset": "paper"}),
    ("exfuse", {"dap_kernel": 2}), ("exfuse", {"gcn_kernel": 0}),
    ("linear", {"strides": []}),
])
def test_bad_settings_raise_user_error(shapes, name, kwargs):
    with pytest.raises(UserError):
        build_decoder(name, shapes, NUM_CLASSES, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_and_autocast(shapes, name):
    dec = build_decoder(name, shapes, NUM_CLASSES).to(memory_format=torch.channels_last)
    feats = {k: v.contiguous(memory_format=torch.channels_last)
             for k, v in make_features(shapes, SMALL).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(feats)
    assert out.shape == (2, NUM_CLASSES, 18, 22)
    assert torch.isfinite(out.float()).all()
    dec.eval()
    with torch.no_grad():
        torch.testing.assert_close(dec(feats), dec(make_features(shapes, SMALL)),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_classifier_init(shapes, name):
    dec = build_decoder(name, shapes, NUM_CLASSES)
    heads = [dec.classifier] + list(getattr(dec, "aux_classifiers", []))
    for head in heads:
        assert head.weight.std() < 0.01
        assert torch.all(head.bias == 0)


# --- linear -------------------------------------------------------------------

def test_linear_equals_concatenated_probe(shapes):
    dec = LinearProbe(shapes, NUM_CLASSES, strides=[2, 4, 8, 16, 32]).eval()
    with torch.no_grad():
        for norm in dec.norms:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2)
        nn.init.normal_(dec.classifier.weight)
        nn.init.normal_(dec.classifier.bias)
        feats = make_features(shapes)
        xs = [norm(feats[n]) for norm, n in zip(dec.norms, dec.in_features)]
        size = xs[0].shape[-2:]
        cat = torch.cat([F.interpolate(x, size=size, mode="bilinear") for x in xs], dim=1)
        torch.testing.assert_close(dec(feats), dec.classifier(cat), rtol=1e-4, atol=1e-4)
    assert dec.output_stride == 2 and dec.required_strides == (2, 4, 8, 16, 32)


# --- eseg ---------------------------------------------------------------------

def test_fast_normalized_fusion_weights_are_non_negative_and_normalized():
    fuse = FastNormalizedFusion(3)
    with torch.no_grad():
        fuse.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
    w = fuse.normalized_weights()
    assert torch.all(w >= 0) and w[1] == 0
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 0.5]) / (2.5 + fuse.eps))
    assert w.sum() <= 1
    xs = [torch.randn(1, 4, 3, 5) for _ in range(3)]
    torch.testing.assert_close(fuse(xs), w[0] * xs[0] + w[2] * xs[2])


def test_eseg_extends_the_pyramid_to_p9_at_360x480():
    shapes = {"a": ShapeSpec(24, 4), "b": ShapeSpec(40, 8), "c": ShapeSpec(80, 16),
              "d": ShapeSpec(160, 32)}
    dec = build_decoder("eseg", shapes, NUM_CLASSES, width=8, repeats=1).eval()
    feats = {n: torch.randn(1, s.channels, *sizes_for(360, 480)[s.stride])
             for n, s in shapes.items()}
    with torch.no_grad():
        levels = dec.pyramid(feats)
        assert [tuple(x.shape[-2:]) for x in levels] == \
            [(90, 120), (45, 60), (23, 30), (12, 15), (6, 8), (3, 4), (2, 2), (1, 1)]
        out = dec.bifpn[0](levels)
        assert [x.shape for x in out] == [x.shape for x in levels]
    layer = dec.bifpn[0]
    assert isinstance(layer, BiFPNLayer)
    # 7 top-down nodes with 2 inputs; bottom-up: 6 with 3 inputs, the top with 2.
    assert [n.fuse.weight.numel() for n in layer.top_down] == [2] * 7
    assert [n.fuse.weight.numel() for n in layer.bottom_up] == [3] * 6 + [2]


# --- exfuse -------------------------------------------------------------------

def test_dap_equals_hand_computed_shifted_sum():
    k, c, h, w = 3, 2, 4, 5
    x = torch.randn(1, k * k * c, h, w)
    expected = torch.zeros(1, c, h, w)
    for cls in range(c):
        for i in range(h):
            for j in range(w):
                total = 0.0
                for l in range(k):
                    for m in range(k):
                        ii, jj = i + l - 1, j + m - 1
                        if 0 <= ii < h and 0 <= jj < w:
                            total += x[0, (l * k + m) * c + cls, ii, jj]
                expected[0, cls, i, j] = total / (k * k)
    torch.testing.assert_close(densely_adjacent_prediction(x, k), expected)
    assert densely_adjacent_prediction(x, 1) is x


def test_exfuse_aux_logits_only_in_train_mode(shapes):
    dec = build_decoder("exfuse", shapes, NUM_CLASSES).train()
    feats = make_features(shapes)
    dec(feats)
    assert [tuple(a.shape) for a in dec.aux_logits] == [(2, NUM_CLASSES, 7, 9),
                                                        (2, NUM_CLASSES, 13, 18),
                                                        (2, NUM_CLASSES, 25, 35)]
    labels = torch.randint(0, NUM_CLASSES, (2, 100, 140))
    seen = []
    loss = dec.aux_loss(labels, lambda lg, lb: seen.append(lg.shape) or lg.mean())
    assert seen == [torch.Size([2, NUM_CLASSES, 100, 140])] * 3
    assert ExFuse.aux_weight == dec.aux_weight and loss.ndim == 0
    dec.eval()
    with torch.no_grad():
        dec(feats)
    assert dec.aux_logits == []
    with pytest.raises(RuntimeError, match="train mode"):
        dec.aux_loss(labels, F.cross_entropy)


def test_exfuse_seb_multiplies_by_every_higher_level(shapes):
    dec = build_decoder("exfuse", shapes, NUM_CLASSES)
    assert [len(seb.convs) for seb in dec.seb] == [3, 2, 1]
    assert all(isinstance(up.shuffle, nn.PixelShuffle) for up in dec.up)
    assert dec.classifier.out_channels == 9 * NUM_CLASSES

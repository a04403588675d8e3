"""Reverse HRNet decoder and its HRNet blocks: shapes, config, gradients, structure."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fusion_seg.decoders import DECODERS, build_decoder
from fusion_seg.decoders.hrnet_blocks import HighResolutionModule
from fusion_seg.decoders.reverse_hrnet import ReverseHRNet
from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec, shapes_from_feature_info

# A backbone that is not ResNet-50, at a 100x140 input: ceil-divided sizes.
FEATURE_INFO = [
    {"num_chs": 12, "reduction": 2},
    {"num_chs": 24, "reduction": 4},
    {"num_chs": 40, "reduction": 8},
    {"num_chs": 80, "reduction": 16},
    {"num_chs": 160, "reduction": 32},
]
SIZES = {2: (50, 70), 4: (25, 35), 8: (13, 18), 16: (7, 9), 32: (4, 5)}
NUM_CLASSES = 7


def make_features(shapes: dict[str, ShapeSpec], batch: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {name: torch.randn(batch, s.channels, *SIZES[s.stride]) for name, s in shapes.items()}


@pytest.fixture
def shapes() -> dict[str, ShapeSpec]:
    return shapes_from_feature_info(FEATURE_INFO)


@pytest.mark.parametrize("streams,stride", [(4, 4), (5, 2)])
def test_output_shape_at_finest_stream(shapes, streams, stride):
    dec = build_decoder("reverse-hrnet", shapes, NUM_CLASSES, streams=streams)
    assert dec.output_stride == stride
    assert dec.required_strides == ((2,) if streams == 5 else ()) + (4, 8, 16, 32)
    out = dec(make_features(shapes))
    assert out.shape == (2, NUM_CLASSES, *SIZES[stride])


def test_streams_are_selected_by_stride_not_name():
    shapes = {"layer1": ShapeSpec(24, 4), "layer2": ShapeSpec(40, 8),
              "layer3": ShapeSpec(80, 16), "layer4": ShapeSpec(160, 32)}
    dec = build_decoder("reverse-hrnet", shapes, NUM_CLASSES)
    assert dec.in_features == ["layer1", "layer2", "layer3", "layer4"]
    assert dec(make_features(shapes, batch=1)).shape == (1, NUM_CLASSES, 25, 35)


def test_missing_stride_raises_user_error(shapes):
    four = {n: s for n, s in shapes.items() if s.stride != 2}
    with pytest.raises(UserError, match="stride-2 map.*--strides"):
        build_decoder("reverse-hrnet", four, NUM_CLASSES, streams=5)
    no_s16 = {n: s for n, s in shapes.items() if s.stride != 16}
    with pytest.raises(UserError, match="stride-16"):
        build_decoder("reverse-hrnet", no_s16, NUM_CLASSES)


def test_unknown_decoder_lists_known_names(shapes):
    with pytest.raises(UserError, match="reverse-hrnet"):
        build_decoder("unet", shapes, NUM_CLASSES)
    assert DECODERS["reverse-hrnet"] is ReverseHRNet


@pytest.mark.parametrize("kwargs", [
    {},
    {"streams": 5},
    {"streams": 5, "widths": [8, 8, 16, 24, 32], "modules": [2, 1, 1, 2], "blocks": 2},
    {"preset": "w18", "streams": 5},
])
def test_config_round_trips(shapes, kwargs):
    dec = build_decoder("reverse-hrnet", shapes, NUM_CLASSES, **kwargs)
    config = json.loads(json.dumps(dec.config))
    assert config == dec.config
    rebuilt = build_decoder("reverse-hrnet", shapes, NUM_CLASSES, **config)
    assert rebuilt.config == config
    a, b = dec.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize("preset,streams,widths,modules,blocks", [
    ("small", 4, [16, 32, 64, 128], [1, 1, 1], 1),
    ("small", 5, [8, 16, 32, 64, 128], [1, 1, 1, 1], 1),
    ("w18", 4, [18, 36, 72, 144], [3, 4, 1], 4),
    ("w18", 5, [16, 18, 36, 72, 144], [1, 1, 2, 1], 2),
    ("w48", 5, [24, 48, 96, 192, 384], [1, 1, 1, 1], 4),
])
def test_presets(shapes, preset, streams, widths, modules, blocks):
    dec = ReverseHRNet(shapes, NUM_CLASSES, streams=streams, preset=preset)
    assert dec.config == {"streams": streams, "preset": preset, "widths": widths,
                          "modules": modules, "blocks": blocks}


def test_bad_settings_raise_user_error(shapes):
    for kwargs in ({"streams": 3}, {"preset": "w32"}, {"modules": [1, 1]},
                   {"widths": [8, 16]}, {"blocks": 0}):
        with pytest.raises(UserError):
            ReverseHRNet(shapes, NUM_CLASSES, **kwargs)


@pytest.mark.parametrize("streams", [4, 5])
def test_gradient_reaches_align_convs(shapes, streams):
    dec = ReverseHRNet(shapes, NUM_CLASSES, streams=streams)
    dec(make_features(shapes)).square().sum().backward()
    for align in dec.align:
        assert align[0].weight.grad is not None
        assert align[0].weight.grad.abs().sum() > 0


def test_last_module_of_each_stage_drops_lowest_stream(shapes):
    dec = ReverseHRNet(shapes, NUM_CLASSES, streams=5, modules=[2, 1, 2, 1])
    seen = []
    for k, stage in enumerate(dec.stages):
        for m, module in enumerate(stage):
            module.register_forward_hook(
                lambda mod, inp, out, k=k, m=m: seen.append((k, m, len(inp[0]), len(out))))
    dec(make_features(shapes, batch=1))
    assert seen == [(0, 0, 5, 5), (0, 1, 5, 4), (1, 0, 4, 3),
                    (2, 0, 3, 3), (2, 1, 3, 2), (3, 0, 2, 1)]


def test_init(shapes):
    dec = ReverseHRNet(shapes, NUM_CLASSES)
    assert dec.classifier.weight.std() < 0.01
    assert torch.all(dec.classifier.bias == 0)
    bns = [m for m in dec.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)


def test_channels_last_and_autocast(shapes):
    dec = ReverseHRNet(shapes, NUM_CLASSES, streams=5).to(memory_format=torch.channels_last)
    feats = {k: v.contiguous(memory_format=torch.channels_last)
             for k, v in make_features(shapes).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(feats)
    assert out.shape == (2, NUM_CLASSES, 50, 70)
    assert torch.isfinite(out.float()).all()
    dec.eval()
    with torch.no_grad():
        torch.testing.assert_close(dec(feats), dec(make_features(shapes)), rtol=1e-4, atol=1e-5)


# --- HighResolutionModule ---------------------------------------------------

def test_module_fuses_arbitrary_sizes_without_mutating_input():
    channels = [4, 8, 16]
    xs = [torch.randn(1, 4, 25, 35), torch.randn(1, 8, 13, 18), torch.randn(1, 16, 7, 9)]
    # A stride-2 chain of a 25x35 map gives 13x18 then 7x9; make one disagree.
    xs[2] = torch.randn(1, 16, 6, 9)
    original = list(xs)
    module = HighResolutionModule(channels, channels, num_blocks=1)
    out = module(xs)
    assert len(xs) == 3 and all(a is b for a, b in zip(xs, original))
    assert [tuple(o.shape) for o in out] == [tuple(x.shape) for x in xs]
    assert all((o >= 0).all() for o in out)


def test_module_num_outputs_folds_dropped_streams():
    channels = [4, 8, 16]
    module = HighResolutionModule(channels, channels, num_blocks=1, num_outputs=2)
    assert module.out_channels == (4, 8)
    assert len(module.fuse_layers) == 2 and len(module.fuse_layers[0]) == 3
    xs = [torch.randn(1, 4, 25, 35), torch.randn(1, 8, 13, 18), torch.randn(1, 16, 7, 9)]
    out = module(xs)
    assert [o.shape[1] for o in out] == [4, 8]
    out[0].sum().backward()
    assert module.branches[2][0].conv1.weight.grad.abs().sum() > 0


def test_module_fuse_paths_follow_hrnet():
    channels = [4, 8, 16, 32]
    module = HighResolutionModule([3, 8, 16, 32], channels, num_blocks=2)
    # Branch: BasicBlocks, a 1x1 projection only where the channel count changes.
    assert len(module.branches[0]) == 2
    assert module.branches[0][0].downsample is not None
    assert module.branches[1][0].downsample is None
    # Lower -> higher: 1x1 conv (no bias) + BN.
    up = module.fuse_layers[0][3]
    assert isinstance(up[0], nn.Conv2d) and up[0].kernel_size == (1, 1) and up[0].bias is None
    assert (up[0].in_channels, up[0].out_channels) == (32, 4)
    # Higher -> lower: (i - j) stride-2 3x3 convs, ReLU on all but the last.
    down = module.fuse_layers[3][0]
    convs = [m for m in down if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == \
        [(4, 4, (2, 2)), (4, 4, (2, 2)), (4, 32, (2, 2))]
    assert sum(isinstance(m, nn.ReLU) for m in down) == 2
    assert isinstance(down[-1], nn.BatchNorm2d)
    assert isinstance(module.fuse_layers[2][2], nn.Identity)

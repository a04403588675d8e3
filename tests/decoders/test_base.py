"""The decoders' base class and the registries: what every decoder shares (issue #13)."""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion_seg.data.datasets import DATASETS, SegDataset, build_dataset, register_dataset
from fusion_seg.decoders import DECODERS, build_decoder, decoder_from_record, decoder_record, register_decoder
from fusion_seg.decoders.base import Decoder, FeatureTaps, resize_to, upsample_logits
from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec, shapes_from_feature_info
from fusion_seg.training.losses import build_loss, decoder_loss

from test_reverse_hrnet import FEATURE_INFO, NUM_CLASSES  # a backbone that is not ResNet-50

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SIZE = (72, 88)  # not a multiple of 32: maps 36x44, 18x22, 9x11, 5x6, 3x3
IMAGE = {"image": ShapeSpec(3, 1)}  # what the identity encoder gives the end-to-end hrnet baseline
CASES = [("reverse-hrnet", {}), ("reverse-hrnet", {"streams": 5}), ("linear", {}), ("linear", {"strides": [2, 8, 32]}),
         ("fpn", {}), ("eseg", {}), ("frm", {}), ("exfuse", {}), ("exfuse", {"dap_kernel": 1}), ("hrnet", {})]


def case_id(name: str, kwargs: dict) -> str:
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


IDS = [case_id(n, kw) for n, kw in CASES]


def shapes_for(name: str) -> dict[str, ShapeSpec]:
    return IMAGE if name == "hrnet" else shapes_from_feature_info(FEATURE_INFO)


def features_for(shapes: dict[str, ShapeSpec], batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(batch, s.channels, math.ceil(SIZE[0] / s.stride), math.ceil(SIZE[1] / s.stride),
                           generator=g) for n, s in shapes.items()}


def labels_for(batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, NUM_CLASSES, (batch, *SIZE), generator=g)
    labels[:, :4] = 255  # some ignored pixels
    return labels


# --- the registries ---------------------------------------------------------------------------------------------

def test_decoder_registry_lists_every_decoder_in_order():
    assert tuple(DECODERS) == ("reverse-hrnet", "linear", "fpn", "eseg", "frm", "exfuse", "hrnet")
    modules = {"reverse-hrnet": "reverse_hrnet", "linear": "linear", "fpn": "fpn", "eseg": "eseg", "frm": "frm",
               "exfuse": "exfuse", "hrnet": "hrnet_baseline"}
    for name, cls in DECODERS.items():
        assert issubclass(cls, Decoder)
        assert cls.__module__ == f"fusion_seg.decoders.{modules[name]}"  # registered where it is defined
    assert [n for n, c in DECODERS.items() if c.end_to_end] == ["hrnet"]


def test_dataset_registry_lists_every_dataset_in_order():
    assert tuple(DATASETS) == ("synthetic", "camvid", "folder", "cityscapes", "mapillary", "voc", "coco")
    for name, cls in DATASETS.items():
        assert issubclass(cls, SegDataset)
        assert cls.name == name
        assert cls.__module__ == f"fusion_seg.data.datasets.{name}"
    assert build_dataset("synthetic", split="val", num_images=1, size=(32, 32)).describe()["name"] == "synthetic"


def test_register_decoder_adds_a_buildable_decoder_and_refuses_clashes():
    @register_decoder("test-probe")
    class Probe(Decoder):
        def __init__(self, input_shapes, num_classes, *, stride: int = 8):
            super().__init__()
            self.select_inputs(input_shapes, (stride,), "test-probe")
            self._config = {"stride": stride}
            name = self.in_features[0]
            self.classifier = nn.Conv2d(input_shapes[name].channels, num_classes, 1)
            self.init_weights()

        def forward(self, features):
            return self.classifier(features[self.in_features[0]])

    try:
        assert DECODERS["test-probe"] is Probe
        dec = build_decoder("test-probe", shapes_for("linear"), NUM_CLASSES, stride=16)
        assert (dec.in_features, dec.required_strides, dec.output_stride, dec.config) == (["s16"], (16,), 16,
                                                                                          {"stride": 16})
        assert dec.feature_taps().rule == "size-match" and dec.feature_taps().modules == [dec.classifier]
        with pytest.raises(ValueError, match="taken by"):
            register_decoder("linear")(Probe)
        with pytest.raises(TypeError, match="Decoder subclass"):
            register_decoder("test-module")(nn.Conv2d)
    finally:
        DECODERS.pop("test-probe", None)
    assert "test-module" not in DECODERS


def test_register_dataset_refuses_clashes():
    class Other(SegDataset):
        pass

    with pytest.raises(ValueError, match="taken by"):
        register_dataset("camvid")(Other)
    with pytest.raises(TypeError, match="SegDataset subclass"):
        register_dataset("test-list")(list)

    class Named(SegDataset):
        name = "something-else"

    with pytest.raises(ValueError, match="registered as"):
        register_dataset("test-named")(Named)
    assert "test-list" not in DATASETS and "test-named" not in DATASETS


def test_the_clis_preset_help_names_every_decoders_presets():
    """The --preset help is a torch-free copy (the CLI imports no decoder): it must list each decoder's presets."""
    from fusion_seg import cli

    (preset,) = [p for p in cli.main.commands["train-decoder"].params if p.name == "preset"]
    for name, cls in DECODERS.items():
        if "preset" in inspect.signature(cls).parameters:
            presets = sys.modules[cls.__module__].PRESETS
            assert f"{name}: {', '.join(presets)}" in preset.help, name


# --- what every decoder shares ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_in_features_are_the_maps_the_decoder_reads(name, kwargs):
    expected = {"reverse-hrnet-streams=5": ["s2", "s4", "s8", "s16", "s32"],
                "linear-strides=[2, 8, 32]": ["s2", "s8", "s32"], "hrnet": ["image"]}
    shapes = shapes_for(name)
    dec = build_decoder(name, shapes, NUM_CLASSES, **kwargs)
    assert dec.in_features == expected.get(case_id(name, kwargs), ["s4", "s8", "s16", "s32"])
    assert [shapes[n].stride for n in dec.in_features] == list(dec.required_strides)
    # In the order the decoder reads them, whatever the order of input_shapes.
    backwards = dict(reversed(shapes.items()))
    assert build_decoder(name, backwards, NUM_CLASSES, **kwargs).in_features == dec.in_features
    # Those maps are all it needs.
    only = {n: f for n, f in features_for(shapes).items() if n in dec.in_features}
    size = [math.ceil(d / dec.output_stride) for d in SIZE]
    assert dec(only).shape == (2, NUM_CLASSES, *size)


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_config_round_trips_through_a_checkpoint_record(name, kwargs):
    shapes = shapes_for(name)
    torch.manual_seed(0)
    dec = build_decoder(name, shapes, NUM_CLASSES, **kwargs)
    record = json.loads(json.dumps(decoder_record(name, dec, shapes, NUM_CLASSES)))
    assert record["config"] == dec.config
    torch.manual_seed(0)
    rebuilt = decoder_from_record(record)
    assert type(rebuilt) is type(dec) and rebuilt.config == dec.config
    a, b = dec.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights: construction is deterministic
    rebuilt.load_state_dict(a)
    config = dec.config
    config.clear()  # a copy: changing it changes nothing
    assert dec.config == record["config"]


# The configs and state-dict keys of the defaults as they were before the base class (#13): checkpoints store
# the config and the state dict, so a change here means that old checkpoints no longer load.
STORED = {
    "reverse-hrnet": ({"streams": 4, "preset": "small", "widths": [16, 32, 64, 128], "modules": [1, 1, 1],
                       "blocks": 1}, 230, "ae12bc52500d7bfb"),
    "linear": ({"strides": [4, 8, 16, 32]}, 22, "a8e6cfd53bb30807"),
    "fpn": ({"preset": "small", "fpn_width": 128, "head_width": 64, "norm": "gn"}, 47, "221cf404c35977c3"),
    "eseg": ({"preset": "small", "width": 64, "repeats": 2, "max_level": 9, "norm": "bn"}, 257, "1589b5a4ec3143d6"),
    "frm": ({"preset": "small", "width": 64, "depth": 1, "heads": 2, "mlp_ratio": 4.0}, 78, "e43050d6b4549b66"),
    "exfuse": ({"preset": "small", "width": 64, "gcn_kernel": 7, "dap_kernel": 3}, 190, "1a454a7b7611a7ea"),
    # The body's keys are timm's; the decoder's own are the head's and the classifier's.
    "hrnet": ({"variant": "hrnet_w18_small_v2", "pretrained": False}, 8, "a6d8a2e954ad150c"),
}


@pytest.mark.parametrize("name", list(STORED))
def test_stored_config_and_state_dict_keys_are_unchanged(name):
    config, count, digest = STORED[name]
    dec = build_decoder(name, shapes_for(name), NUM_CLASSES)
    assert dec.config == config
    keys = [k for k in dec.state_dict() if not (name == "hrnet" and k.startswith("body."))]
    assert (len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]) == (count, digest)


@pytest.mark.parametrize("criterion", ["ce", "ohem"])
@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_losses_are_the_previous_formula(name, kwargs, criterion):
    """loss_seg = criterion(bilinear upsample(logits).float(), labels); ExFuse adds aux_weight * mean aux loss."""
    shapes = shapes_for(name)
    crit = build_loss(criterion, 255, min_kept=500)
    torch.manual_seed(0)
    dec = build_decoder(name, shapes, NUM_CLASSES, **kwargs).train()
    features, labels = features_for(shapes), labels_for()
    logits = dec(features)
    losses = dec.losses(logits, labels, crit)
    up = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=False)
    seg = crit(up.float(), labels)
    assert torch.equal(losses["loss_seg"], seg)
    if name == "exfuse":
        assert list(losses) == ["loss_seg", "loss_aux"]
        aux = [crit(F.interpolate(a, size=SIZE, mode="bilinear", align_corners=False).float(), labels)
               for a in dec.aux_logits]
        assert len(aux) == 3
        assert torch.equal(losses["loss_aux"], dec.aux_weight * torch.stack(aux).mean())
        assert torch.equal(losses["loss_aux"], dec.aux_loss(labels, crit))
        expected = seg + dec.aux_weight * torch.stack(aux).mean()
    else:
        assert list(losses) == ["loss_seg"]
        expected = seg
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in losses.values())
    # decoder_loss (the trainer's, the bench's and compare's) is their sum: the same number as before.
    torch.manual_seed(0)
    again = build_decoder(name, shapes, NUM_CLASSES, **kwargs).train()
    loss = decoder_loss(again, again, features, labels, crit, torch.device("cpu"))
    assert torch.equal(loss, expected)
    loss.backward()
    assert all(p.grad is not None for n, p in again.named_parameters() if not n.startswith("body."))


def test_exfuse_has_no_aux_loss_after_an_eval_forward():
    shapes = shapes_for("exfuse")
    dec = build_decoder("exfuse", shapes, NUM_CLASSES).eval()
    crit = build_loss("ce", 255)
    with torch.no_grad():
        logits = dec(features_for(shapes))
        assert list(dec.losses(logits, labels_for(), crit)) == ["loss_seg"]
    dec.train()
    with pytest.raises(RuntimeError, match="train mode"):  # train mode, but the last forward was not
        dec.losses(logits, labels_for(), crit)


@pytest.mark.parametrize("name", list(DECODERS))
def test_feature_taps_are_submodules(name):
    dec = build_decoder(name, shapes_for(name), NUM_CLASSES)
    taps = dec.feature_taps()
    assert isinstance(taps, FeatureTaps) and taps.modules
    assert taps.rule == {"reverse-hrnet": "first-stage", "fpn": "fpn-levels", "hrnet": "body-streams"}.get(
        name, "size-match")
    own = {id(m) for m in dec.modules()}
    assert all(isinstance(m, nn.Module) and id(m) in own and m is not dec for m in taps.modules)
    assert Decoder.feature_taps(dec).rule == "size-match"
    assert len(Decoder.feature_taps(dec).modules) == len(list(dec.modules())) - 1


@pytest.mark.parametrize("name", list(DECODERS))
def test_classifiers_get_the_tiny_init(name):
    dec = build_decoder(name, shapes_for(name), NUM_CLASSES)
    heads = dec.classifiers()
    assert heads[0] is dec.classifier
    assert len(heads) == (4 if name == "exfuse" else 1)
    for head in heads:
        assert head.weight.std() < 0.01 and torch.all(head.bias == 0)


# --- resizing -----------------------------------------------------------------------------------------------------

def test_resize_to_is_one_function_for_every_mode():
    x = torch.randn(2, 3, 5, 7)
    assert resize_to(x, (5, 7)) is x and resize_to(x, (5, 7), "nearest") is x and upsample_logits(x, (5, 7)) is x
    torch.testing.assert_close(resize_to(x, (9, 13)),
                               F.interpolate(x, size=(9, 13), mode="bilinear", align_corners=False), rtol=0, atol=0)
    torch.testing.assert_close(resize_to(x, [10, 14], "nearest"),
                               F.interpolate(x, size=(10, 14), mode="nearest"), rtol=0, atol=0)
    torch.testing.assert_close(resize_to(x, (3, 4), "area"), F.adaptive_avg_pool2d(x, (3, 4)))
    torch.testing.assert_close(upsample_logits(x, (9, 13)), resize_to(x, (9, 13)), rtol=0, atol=0)


# --- build_decoder checks its arguments (issue 20) ----------------------------------------------------------

def test_shapespec_is_exported():
    import fusion_seg

    assert fusion_seg.ShapeSpec is ShapeSpec and "ShapeSpec" in fusion_seg.__all__


def _refused(call, *fragments) -> None:
    with pytest.raises(UserError) as info:
        call()
    assert "\n" not in str(info.value) and all(f in str(info.value) for f in fragments), str(info.value)


@pytest.mark.parametrize("shapes,fragments", [
    ({"s4": (256, 4)}, ["'s4'", "(256, 4)", "ShapeSpec(channels, stride)", "fusion_seg.ShapeSpec(256, 4)"]),
    ({"s4": {"channels": 256, "stride": 4}}, ["'s4'", "ShapeSpec(channels, stride)"]),
    ([(256, 4)], ["input_shapes", "dict"]),
])
def test_build_decoder_asks_for_shapespecs(shapes, fragments):
    _refused(lambda: build_decoder("linear", shapes, 3), *fragments)


def test_build_decoder_refuses_a_bad_class_count():
    shapes = {"s4": ShapeSpec(16, 4)}
    for n in (0, "3", 2.0):
        _refused(lambda: build_decoder("linear", shapes, n, strides=[4]), "num_classes", ">= 1")
    assert build_decoder("linear", shapes, 3, strides=[4]).classifier.out_channels == 3

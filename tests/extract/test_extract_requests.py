"""Issue 13: extract() takes typed requests, checks them whole before any work, and a store's spec (and a
checkpoint) hand back the encoder identity typed while their JSON stays as it was."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fusion_seg.cache.store import FeatureStore
from fusion_seg.requests import Augment, DatasetRef, EncoderSpec, ExtractRun, Resize, StoreFormat
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import UserError
from fusion_seg.extract.local import check_extract_arguments, extract
from pipeline_helpers import ENCODER, SYNTH

DATASET = DatasetRef("synthetic", "train", options={"num_images": 2, "size": list(SYNTH["size"])})
ENCODER_SPEC = EncoderSpec(ENCODER, random_init=True, strides=(4, 8, 16, 32))
GOOD = dict(encoder=ENCODER_SPEC, views=1, augment=Augment(crop=(64, 64)), resize=Resize(),
            storage=StoreFormat(), run=ExtractRun(device="cpu", loader_workers=0))


@pytest.mark.parametrize("bad, option", [
    (dict(views=0), "--views"),
    (dict(views=2, augment=Augment(enabled=False)), "--no-augment"),
    (dict(augment=Augment(crop=(0, 64))), "--crop"),
    (dict(augment=Augment(crop=(64,))), "--crop"),
    (dict(augment=Augment(scale_range=(2.0, 0.5))), "--scale-range"),
    (dict(resize=Resize(short_side=0)), "--short-side"),
    (dict(resize=Resize(size=(64, 0))), "--size"),
    (dict(resize=Resize(short_side=64, size=(64, 64))), "--short-side and --size are mutually exclusive"),
    (dict(encoder=replace(ENCODER_SPEC, seed=-1)), "--seed"),
    (dict(augment=Augment(seed=-1)), "--seed"),
    (dict(encoder=replace(ENCODER_SPEC, strides=(8, 4))), "--strides"),
    (dict(run=ExtractRun(batch_size=0)), "--batch-size"),
    (dict(run=ExtractRun(loader_workers=-1)), "--loader-workers"),
    (dict(run=ExtractRun(writers=0)), "writers"),
    (dict(run=ExtractRun(dask_workers=0)), "--dask-workers"),
    (dict(run=ExtractRun(scheduler="tcp://127.0.0.1:1", dask_workers=2)), "mutually exclusive"),
    (dict(storage=StoreFormat(dtype="int4")), "int4"),
    (dict(storage=StoreFormat(codec="nope")), "nope"),
])
def test_a_bad_request_is_refused_before_the_store_is_made(bad, option, tmp_path):
    out = tmp_path / "out" / "x.zarr"
    with pytest.raises(UserError, match=option):
        check_extract_arguments(**{**GOOD, **bad})
    with pytest.raises(UserError, match=option):
        extract(out, DATASET, **{**GOOD, **bad}, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_defaults_pass_the_check():
    check_extract_arguments()
    check_extract_arguments(**GOOD)


def test_the_store_records_the_requests_and_hands_back_the_encoder_typed(tmp_path):
    out = tmp_path / "x.zarr"
    r = extract(out, DATASET, **GOOD, progress=False)
    assert r.views_written == r.views_total == 2
    spec = FeatureStore.open(out).spec
    identity = spec.encoder_identity
    assert isinstance(identity, EncoderIdentity) and identity.tag == ENCODER
    assert identity.init == {"random_init": True, "seed": 0, "zero_init_last": False}
    assert spec.input_shapes() == identity.output_shape()
    # On disk the spec is the JSON it always was: the encoder a plain table, the requests as before.
    stored = json.loads((out / "zarr.json").read_text())["attributes"]["fusion_seg"]
    assert stored["encoder"] == identity.to_dict() == spec.encoder
    assert stored["augment"] == {"enabled": True, "crop": [64, 64], "scale_range": [0.5, 2.0], "flip": True, "seed": 0}
    assert stored["resize"] == {"short_side": None, "size": None}
    assert stored["dtype"] == "float16" and stored["codec"] == spec.codec
    # The same request again resumes (a no-op); another one is refused, not mixed in.
    assert extract(out, DATASET, **GOOD, progress=False).views_written == 0
    with pytest.raises(UserError, match="seed"):
        extract(out, DATASET, **{**GOOD, "augment": Augment(crop=(64, 64), seed=1)}, progress=False)


def test_a_checkpoint_hands_back_its_encoder_typed():
    identity = EncoderIdentity(tag="resnet18", weights="random-init:0", weights_sha256="ab" * 32,
                               mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2),
                               features=({"name": "s4", "channels": 64, "stride": 4},), init={"random_init": True})
    assert EncoderIdentity.from_checkpoint({"encoder": identity.to_dict(), "model": {}}) == identity

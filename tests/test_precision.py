"""Issue 23: ``--precision fp32|bf16`` (and auto) for extract, train-decoder, evaluate and predict: what runs in
bf16, what records it, and that bf16 and fp32 features are never mixed silently."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from fusion_seg.cli import main
from fusion_seg.device import autocast, resolve_precision
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import CacheError, CheckpointError, UserError
from pipeline_helpers import ENCODER, SYNTH, extract_synthetic, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CPU = torch.device("cpu")


def test_auto_is_fp32_on_the_cpu_and_bf16_on_cuda():
    assert resolve_precision(CPU) == resolve_precision(CPU, "auto") == "fp32"
    assert resolve_precision(torch.device("cuda"), "auto") == "bf16"
    assert resolve_precision(CPU, "bf16") == "bf16" and resolve_precision(torch.device("cuda"), "fp32") == "fp32"
    with pytest.raises(UserError, match="--precision 'fp16': choose one of auto, fp32, bf16"):
        resolve_precision(CPU, "fp16")
    x = torch.randn(4, 8)
    with autocast(CPU, "bf16"):
        assert (x @ x.T).dtype == torch.bfloat16
    with autocast(CPU, "fp32"), autocast(CPU):
        assert (x @ x.T).dtype == torch.float32


def test_the_encoder_runs_in_its_identitys_precision_and_fp32_records_read_as_before():
    from fusion_seg.encoder.build import build_encoder

    encoder = build_encoder(ENCODER, random_init=True, seed=0, strides=(4, 8))
    before = encoder.identity.to_dict()
    assert "precision" not in before  # an fp32 identity is the record every earlier store and checkpoint holds
    assert EncoderIdentity.from_dict(before).precision == "fp32"
    images = torch.randn(1, 3, 64, 64)
    fp32 = encoder(images)
    with autocast(CPU, "bf16"):  # a caller's autocast does not change an fp32 encoder's features
        assert all(torch.equal(fp32[k], v) for k, v in encoder(images).items())
    bf16 = encoder.with_precision("bf16")(images)
    assert encoder.identity.to_dict()["precision"] == "bf16"
    assert EncoderIdentity.from_dict(encoder.identity.to_dict()).precision == "bf16"
    for k, v in bf16.items():
        assert v.dtype == torch.bfloat16 and not torch.equal(v.float(), fp32[k])
        # bf16 keeps 8 bits of mantissa: a relative error of a few 0.1 % a layer, some 1 % over the network.
        assert (v.float() - fp32[k]).norm() / fp32[k].norm() < 0.05, k
    assert EncoderIdentity.from_dict(before).differences(encoder.identity) == [
        "forward precision fp32 vs bf16 (--precision)"]


def test_a_bf16_store_records_it_and_is_never_mixed_with_fp32(tmp_path):
    from fusion_seg.cache.store import FeatureStore
    from fusion_seg.training.train import train_decoder

    extract_synthetic(tmp_path / "bf16.zarr", views=1, num_images=2, precision="bf16")
    extract_synthetic(tmp_path / "fp32.zarr", views=1, num_images=2, split="val", augment=False)
    assert FeatureStore.open(tmp_path / "bf16.zarr").spec.encoder_identity.precision == "bf16"
    assert "precision" not in FeatureStore.open(tmp_path / "fp32.zarr").spec.encoder  # as before the option
    with pytest.raises(CacheError, match="encoder.precision: stored 'bf16'"):  # resumed with other settings
        extract_synthetic(tmp_path / "bf16.zarr", views=1, num_images=2)
    with pytest.raises(UserError, match="forward precision"):  # validation features of another precision
        train_decoder(str(tmp_path / "bf16.zarr"), tmp_path / "run", tiny_config(epochs=1),
                      val_cache=str(tmp_path / "fp32.zarr"), progress=False)


def test_training_evaluating_and_predicting_in_bf16(tmp_path):
    from fusion_seg.checkpoint import load_checkpoint
    from fusion_seg.evaluation.evaluate import evaluate
    from fusion_seg.inference.predict import predict
    from fusion_seg.training.train import train_decoder

    extract_synthetic(tmp_path / "s.zarr", views=1, num_images=2)
    runs = {p: train_decoder(str(tmp_path / "s.zarr"), tmp_path / p, tiny_config(epochs=1, precision=p),
                             progress=False) for p in ("fp32", "bf16")}
    assert all(torch.isfinite(torch.tensor(r.losses)).all() for r in runs.values())
    assert runs["fp32"].losses != runs["bf16"].losses  # the step ran in bf16
    assert load_checkpoint(tmp_path / "bf16" / "best.pt")["train"]["precision"] == "bf16"
    data = dict(dataset="synthetic", split="val", dataset_options={"num_images": 1, "size": list(SYNTH["size"])},
                device="cpu", progress=False)
    best = tmp_path / "fp32" / "best.pt"
    plain, bf16 = evaluate(best, **data), evaluate(best, precision="bf16", **data)
    assert (plain.precision, bf16.precision) == ("fp32", "bf16") and plain.out != bf16.out
    assert json.loads((tmp_path / bf16.out / "metrics.json").read_text())["precision"] == "bf16"
    written = predict(best, _image(tmp_path), tmp_path / "pred", device="cpu", precision="bf16", progress=False)
    assert written.images == 1
    with pytest.raises(UserError, match=r"precision='fp16': choose one of 'auto', 'fp32', 'bf16'"):
        evaluate(best, precision="fp16", **data)


def _image(folder):
    import numpy as np
    from PIL import Image

    path = folder / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path)
    return path


def test_a_checkpoint_from_before_precision_resumes(tmp_path):
    """Its train record has no precision: read as the default, the same schedule."""
    from fusion_seg.checkpoint import load_checkpoint, save_checkpoint
    from fusion_seg.training.train import train_decoder

    extract_synthetic(tmp_path / "s.zarr", views=1, num_images=2)
    cfg = tiny_config(epochs=1)
    train_decoder(str(tmp_path / "s.zarr"), tmp_path / "run", cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    del ckpt["train"]["precision"]
    save_checkpoint(tmp_path / "run" / "last.pt", ckpt)
    train_decoder(str(tmp_path / "s.zarr"), tmp_path / "run", cfg, resume=True, progress=False)  # no error
    with pytest.raises(CheckpointError, match="precision"):
        train_decoder(str(tmp_path / "s.zarr"), tmp_path / "run", tiny_config(epochs=1, precision="bf16"),
                      resume=True, progress=False)


@pytest.mark.parametrize("command", [["extract"], ["train-decoder"], ["evaluate"], ["predict"], ["compare"]])
def test_every_command_that_runs_a_forward_takes_precision(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert "--precision [auto|fp32|bf16]" in result.output, result.output
    bad = CliRunner().invoke(main, [*command, "--precision", "fp16"])
    assert bad.exit_code == 2 and "'fp16' is not one of 'auto', 'fp32', 'bf16'" in bad.output

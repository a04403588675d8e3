"""Issue 12: progress and logs in batch jobs, TensorBoard, and training errors that say what to do."""
import io
import json
import re

import pytest
import torch
from click.testing import CliRunner

import fusion_seg.checkpoint
import fusion_seg.training.step
from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.cli import main
from fusion_seg.requests import Augment, DatasetRef, EncoderSpec, ExtractRun
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import CheckpointError, UserError
from fusion_seg.extract.local import extract
from fusion_seg.progress import Progress
from fusion_seg.training.train import train_decoder
from pipeline_helpers import ENCODER, SYNTH, FullDisk, extract_synthetic, raise_after_checkpoint, tiny_config


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    extract_synthetic(d / "train.zarr", views=2, crop=(64, 64))  # 12 views: 6 steps an epoch at batch 2
    extract_synthetic(d / "val.zarr", split="val", views=1, augment=False, num_images=2)
    return d


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class Stop(Exception):
    pass


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


# --------------------------------------------------------------------------- progress
def test_progress_prints_plain_lines_off_a_terminal(monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv("FUSION_SEG_PROGRESS_SECONDS", "0")
    with Progress(4, "train run", "step", initial=1, stream=out) as bar:
        assert not bar.is_bar
        bar.write("settings block")
        for i in range(3):
            bar.update(1, epoch="1/2", loss=f"{0.5 - i / 10:.4f}", lr="0.01")
    lines = out.getvalue().splitlines()
    assert lines[0] == "settings block" and len(lines) == 4  # one line per update at interval 0, none extra on close
    assert lines[1].startswith("train run: step 2/4 (50%), epoch 1/2, loss 0.5000, lr 0.01, ")
    assert "steps/s" in lines[1] or "s/step" in lines[1]
    assert "ETA" in lines[1] and lines[-1].split(", ")[-1].startswith("done in")

    out = io.StringIO()  # the default interval: a short job prints no progress lines at all
    monkeypatch.delenv("FUSION_SEG_PROGRESS_SECONDS")
    with Progress(10, "extract s.zarr", "view", stream=out) as bar:
        bar.update(10)
    assert out.getvalue() == ""

    with Progress(10, "x", "view", stream=io.StringIO(), enabled=False) as bar:  # progress=False: nothing
        bar.update(10)
        bar.write("hidden")
    monkeypatch.setenv("FUSION_SEG_PROGRESS_SECONDS", "soon")
    with pytest.raises(UserError, match="FUSION_SEG_PROGRESS_SECONDS"):
        Progress(1, "x", "view", stream=io.StringIO())


def test_progress_is_a_bar_on_a_terminal(monkeypatch):
    monkeypatch.setenv("FUSION_SEG_PROGRESS_SECONDS", "0")
    tty = FakeTTY()
    with Progress(3, "train run", "step", stream=tty) as bar:
        assert bar.is_bar
        bar.update(1, loss="0.5")
        bar.write("epoch 1/1: mean loss 0.5000")
    text = tty.getvalue()
    assert "\r" in text and "epoch 1/1: mean loss 0.5000\n" in text  # tqdm's bar, the line written above it
    assert "ETA" not in text  # no plain lines on a terminal


def test_extract_prints_progress_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUSION_SEG_PROGRESS_SECONDS", "0")
    extract(tmp_path / "s.zarr", DatasetRef("synthetic", "train", options={"num_images": 4, "size": SYNTH["size"]}),
            EncoderSpec(ENCODER, random_init=True, strides=(4, 8, 16, 32)), views=1, augment=Augment(crop=(64, 64)),
            run=ExtractRun(loader_workers=0, batch_size=2), progress=True)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("extract s.zarr:")]
    assert lines and lines[-1].startswith("extract s.zarr: 4/4 views (100%), ")
    assert re.search(r"[\d.]+ (views/s|s/view)", lines[0]) and "ETA" in lines[0]


def test_training_prints_settings_progress_and_epoch_lines(stores, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUSION_SEG_PROGRESS_SECONDS", "0")
    run = tmp_path / "run"
    train_decoder(str(stores / "train.zarr"), run, tiny_config(epochs=2), val_cache=str(stores / "val.zarr"))
    err = capsys.readouterr().err
    head = next(l for l in err.splitlines() if l.startswith(f"train {run}:"))
    assert f"cache {stores / 'train.zarr'}" in head and f"val cache {stores / 'val.zarr'}" in head
    assert "device cpu" in head and "12 views" in head and "6 steps/epoch x 2 epochs = 12 steps" in head
    assert "lr=0.01" in err and 'decoder_config={"streams":4,"preset":"small"}' in err and "batch_size=2" in err
    steps = [l for l in err.splitlines() if l.startswith("train run: step ")]
    assert len(steps) == 12 and steps[6].startswith("train run: step 7/12 (58%), epoch 2/2, loss ")
    assert ", lr " in steps[0] and "ETA" in steps[0]
    epochs = [l for l in err.splitlines() if l.startswith("epoch ")]
    assert [l.split(":")[0] for l in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all(re.search(r"mean loss [\d.]+, val mIoU [\d.]+, pixel acc [\d.]+", l) for l in epochs)

    train_decoder(str(stores / "train.zarr"), tmp_path / "quiet", tiny_config(epochs=1), progress=False)
    assert capsys.readouterr().err == ""  # progress=False prints nothing, the settings neither


# --------------------------------------------------------------------------- metrics.jsonl
def test_step_and_epoch_records_number_epochs_alike(stores, tmp_path):
    cache = str(stores / "train.zarr")
    run = tmp_path / "run"
    train_decoder(cache, run, tiny_config(epochs=2), progress=False)
    logged = records(run)
    steps = [r for r in logged if r["type"] == "step"]
    assert [r["epoch"] for r in steps] == [1] * 6 + [2] * 6  # 1..E, like the epoch records
    assert [(r["epoch"], r["step"]) for r in logged if r["type"] == "epoch"] == [(1, 6), (2, 12)]


def test_resume_truncates_logs_of_either_numbering(stores, tmp_path, monkeypatch):
    """A log written before epochs were numbered alike (step records 0-based) is still cut at the checkpoint."""
    cache, run, cfg = str(stores / "train.zarr"), tmp_path / "run", tiny_config(epochs=2)
    raise_after_checkpoint(monkeypatch, 1, Stop)
    with pytest.raises(Stop):
        train_decoder(cache, run, cfg, progress=False)
    monkeypatch.undo()
    old = [{**r, "epoch": r["epoch"] - 1} if r["type"] == "step" else r for r in records(run)]
    partial = [{"type": "step", "epoch": 1, "step": 7, "loss": 9.0, "lr": 0.01}]  # epoch 2, 0-based, cut off
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old + partial) + '{"type": "st')
    train_decoder(cache, run, cfg, resume=True, progress=False)
    logged = records(run)
    assert [r["step"] for r in logged if r["type"] == "step"] == list(range(1, 13))
    assert 9.0 not in [r["loss"] for r in logged if r["type"] == "step"]


# --------------------------------------------------------------------------- TensorBoard
def test_tensorboard_event_file_holds_the_scalars(stores, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cache, run = str(stores / "train.zarr"), tmp_path / "run"
    raise_after_checkpoint(monkeypatch, 1, Stop)
    with pytest.raises(Stop):
        train_decoder(cache, run, tiny_config(epochs=2, log_every=2), val_cache=str(stores / "val.zarr"),
                      progress=False)
    monkeypatch.undo()
    # Operational: a resume may switch TensorBoard on (the schedule is unchanged).
    train_decoder(cache, run, tiny_config(epochs=2, log_every=2, tensorboard=True), val_cache=str(stores / "val.zarr"),
                  resume=True, progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    logged = records(run)
    assert [s for s, _ in scalars["train/loss"]] == [8, 10, 12]  # the steps logged in this run
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(
        [r["loss"] for r in logged if r["type"] == "step" and r["step"] > 6])
    assert [v for _, v in scalars["train/lr"]] == pytest.approx(
        [r["lr"] for r in logged if r["type"] == "step" and r["step"] > 6])
    last_epoch = [r for r in logged if r["type"] == "epoch"][-1]
    assert scalars["epoch/loss"] == [(12, pytest.approx(last_epoch["loss"]))]
    assert scalars["val/miou"] == [(12, pytest.approx(last_epoch["val"]["miou"]))]
    assert scalars["val/pixel_acc"] == [(12, pytest.approx(last_epoch["val"]["pixel_acc"]))]


def test_tensorboard_missing_is_refused_before_training(stores, tmp_path, monkeypatch):
    from fusion_seg import progress

    def not_installed():
        raise ModuleNotFoundError("No module named 'tensorboard'")

    monkeypatch.setattr(progress, "_import_summary_writer", not_installed)  # as if tensorboard were not installed
    with pytest.raises(UserError, match=re.escape("pip install 'fusion-seg[tensorboard]'")):
        train_decoder(str(stores / "train.zarr"), tmp_path / "run", tiny_config(tensorboard=True), progress=False)
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(main, ["train-decoder", "--cache", str(stores / "train.zarr"), "--tensorboard",
                                       "--device", "cpu", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "pip install 'fusion-seg[tensorboard]'" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "cli").exists()


# --------------------------------------------------------------------------- NaN, and an lr change on resume
def test_nan_advice_is_a_resume_the_tool_accepts(stores, tmp_path, monkeypatch):
    cache, run = str(stores / "train.zarr"), tmp_path / "run"
    real_loss, calls = fusion_seg.training.step.decoder_loss, []

    def diverge_in_epoch_2(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 9 else loss

    monkeypatch.setattr(fusion_seg.training.step, "decoder_loss", diverge_in_epoch_2)
    with pytest.raises(UserError) as err:
        train_decoder(cache, run, tiny_config(epochs=2), progress=False)
    monkeypatch.undo()
    message = str(err.value)
    assert "at step 9 (epoch 2/2)" in message and f"{run / 'last.pt'}" in message
    assert f"--out {run} --resume --lr 0.001" in message

    # The advice, followed: the same settings, --resume and a lower --lr.
    rest = train_decoder(cache, run, tiny_config(epochs=2, lr=0.001), resume=True, progress=False)
    assert rest.steps == 12 and len(rest.losses) == 6
    change = {"epoch": 2, "step": 6, "from": 0.01, "to": 0.001}
    logged = records(run)
    assert [r for r in logged if r["type"] == "lr_change"] == [{"type": "lr_change", **change}]
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["lr_changes"] == [change] and ckpt["train"]["lr"] == 0.001
    assert ckpt["scheduler"]["base_lrs"] == [0.001] and ckpt["optimizer"]["param_groups"][0]["initial_lr"] == 0.001
    # The poly decay goes on from the new base: lr(s) = 0.001 * (1 - s/12)^0.9 after step s.
    lrs = {r["step"]: r["lr"] for r in logged if r["type"] == "step"}
    assert lrs[3] == pytest.approx(0.01 * (1 - 3 / 12) ** 0.9)
    assert [lrs[s] for s in range(7, 13)] == pytest.approx([0.001 * (1 - s / 12) ** 0.9 for s in range(7, 13)])

    # Another setting changed beside lr: still refused, and both are named with both values.
    with pytest.raises(CheckpointError) as refused:
        train_decoder(cache, run, tiny_config(epochs=3, lr=0.0005), resume=True, progress=False)
    message = str(refused.value)
    assert "epochs 2 vs 3" in message and "lr 0.001 vs 0.0005" in message and "--lr alone may change" in message


def test_nan_before_any_checkpoint_says_start_again(stores, tmp_path):
    with pytest.raises(UserError, match="lower --lr") as err:
        train_decoder(str(stores / "train.zarr"), tmp_path / "nan", tiny_config(epochs=1, lr=1e30), progress=False)
    assert "without --resume" in str(err.value) and "--lr 1e+29" in str(err.value)


def test_cli_resume_without_lr_keeps_the_runs_lr(stores, tmp_path):
    args = ["train-decoder", "--cache", str(stores / "train.zarr"), "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--loss", "ce", "--out", str(tmp_path / "run")]
    assert CliRunner().invoke(main, [*args, "--lr", "0.02"]).exit_code == 0
    result = CliRunner().invoke(main, [*args, "--resume"])  # not a silent change to the default 0.01
    assert result.exit_code == 0, result.output
    assert not [r for r in records(tmp_path / "run") if r["type"] == "lr_change"]


# --------------------------------------------------------------------------- mismatch messages, --resume
def test_encoder_mismatch_names_the_weights_not_only_hashes():
    def identity(seed, sha, channels=64):
        return EncoderIdentity.from_dict({
            "tag": "resnet18", "weights": f"random-init:{seed}", "weights_sha256": sha, "mean": [0.5] * 3,
            "std": [0.2] * 3, "features": [{"name": "s4", "channels": channels, "stride": 4}]})

    a, b = identity(1, "a" * 64), identity(0, "b" * 64, channels=128)
    diffs = a.differences(b)
    assert diffs[0].startswith("weights random-init:1 vs random-init:0 (weights_sha256 aaaaaaaaaaaa")
    assert "a" * 64 not in " ".join(diffs)
    assert diffs[1] == "feature s4 channels 64 vs 128"
    assert a.differences(identity(1, "a" * 64)) == []


def test_resume_mismatch_lists_only_the_differing_keys(stores, tmp_path):
    cache, run = str(stores / "train.zarr"), tmp_path / "run"
    train_decoder(cache, run, tiny_config(epochs=1), progress=False)
    other = tiny_config(epochs=1, decoder_config={"streams": 4, "preset": "small", "blocks": 2})
    with pytest.raises(CheckpointError) as err:
        train_decoder(cache, run, other, resume=True, progress=False)
    message = str(err.value)
    assert "cannot resume" in message and "decoder config.blocks 1 vs 2" in message
    assert "preset" not in message and "widths" not in message  # not the whole configs


def test_resume_without_last_pt_is_refused(stores, tmp_path):
    with pytest.raises(CheckpointError, match="no last.pt") as err:
        train_decoder(str(stores / "train.zarr"), tmp_path / "new", tiny_config(epochs=1), resume=True,
                      progress=False)
    assert "Drop --resume" in str(err.value) and str(tmp_path / "new") in str(err.value)
    assert not (tmp_path / "new").exists()


def test_train_stage_resumes_only_a_run_with_last_pt(stores, tmp_path):
    from fusion_seg.pipeline.stages import run_stage

    stage = {"kind": "train", "cache": str(stores / "train.zarr"), "out": str(tmp_path / "run"), "epochs": 1,
             "batch_size": 4, "workers": 0, "device": "cpu", "loss": "ce",
             "decoder_options": {"streams": 4, "preset": "small"}}
    first = run_stage(dict(stage), progress=False)
    again = run_stage(dict(stage), progress=False)  # last.pt exists now: resumed, nothing left to do
    assert first["steps"] == again["steps"] == 3


# --------------------------------------------------------------------------- a full disk


def test_disk_full_while_saving_is_a_clean_error_and_last_pt_stays(stores, tmp_path, monkeypatch):
    real_open, opened = fusion_seg.checkpoint._open_temp, []

    def fill_up_after_first(tmp):
        opened.append(tmp)
        return real_open(tmp) if len(opened) == 1 else FullDisk(tmp, room=2048)

    monkeypatch.setattr(fusion_seg.checkpoint, "_open_temp", fill_up_after_first)
    run = tmp_path / "run"
    args = ["train-decoder", "--cache", str(stores / "train.zarr"), "--epochs", "2", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--loss", "ce", "--out", str(run)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = next(l for l in result.output.splitlines() if l.startswith("Error: "))
    assert f"cannot write checkpoint {run / 'last.pt'}" in error and "MiB free" in error
    assert "previous last.pt is unchanged" in error and "--resume" in error
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # the last good checkpoint still loads
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]  # no temporary file left behind

    monkeypatch.undo()  # space freed: the advice works
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def test_checkpoint_write_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    fusion_seg.checkpoint.save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(3)}})
    monkeypatch.setattr(fusion_seg.checkpoint, "_open_temp", lambda tmp: FullDisk(tmp, room=100))
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        fusion_seg.checkpoint.save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(3)}})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]

"""Issue 6: training with DistributedDataParallel under torchrun. Real processes, gloo on CPU.

Why the weights of N processes can be compared with those of one: the decoder is FPN with
GroupNorm (no statistics over the batch), the loss plain cross-entropy, and the views whole
synthetic images (no pixel is ignored, so every process averages over as many pixels). Each
process's mean loss then averages (DDP's gradient all-reduce) to the mean over the global
batch, and only the floating-point summation order differs: per-process sums then an
all-reduce, instead of one sum over the batch: fp32 rounding, ~1e-7 relative in the
gradients, times lr 0.01. Measured here: the weights differ by 2e-9 after one step and 6e-8
after six. TOL (1e-6) leaves a wide margin for that and is still far below what the step
itself moves (1e-2), what one step on another choice of views changes (7e-4 to 2e-3), or
twice the gradient (1e-2): all checked below, so the comparison cannot pass by accident.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion_seg.cache.reader import CachedViews, collate_views
from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.training.ddp import DistEnv, check_sync_bn
from fusion_seg.errors import UserError
from fusion_seg.training.losses import build_loss
from fusion_seg.cache.resident import resident_bytes
from fusion_seg.decoders.base import upsample_logits
from fusion_seg.requests import DatasetRef
from fusion_seg.training.config import TrainConfig
from fusion_seg.training.sources import _loader
from fusion_seg.training.train import _make_decoder, train_decoder, train_online
from pipeline_helpers import extract_synthetic, raise_after_checkpoint, tiny_config

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
DECODER = {"fpn_width": 32, "head_width": 32}  # GroupNorm (FPN's default norm), 32 groups
# The stream tier: its processes draw from one global permutation, so DDP steps like one process at the
# global batch. The resident tiers shard the views instead (test_resident_tier_holds_one_shard_per_process).
ARGS = ["--decoder", "fpn", "--decoder-opt", "fpn_width=32", "--decoder-opt", "head_width=32", "--loss", "ce",
        "--workers", "0", "--device", "cpu", "--log-every", "1", "--seed", "0", "--cache-mode", "stream"]

# torchrun runs this instead of `-m fusion_seg` to stop rank 0 dead right after it wrote last.pt of epoch 1.
DIE_AFTER_EPOCH_1 = """
import os
import fusion_seg.training.run_dir as run_dir
from fusion_seg.cli import main

real_save = run_dir.save_checkpoint

def save_then_die(path, payload):
    real_save(path, payload)
    if path.name == "last.pt" and payload["epoch"] == 1:
        os._exit(3)

run_dir.save_checkpoint = save_then_die
main(prog_name="fusion-seg")
"""


class Stop(Exception):
    pass


def config(**kw) -> TrainConfig:
    """The in-process twin of ARGS."""
    return tiny_config(decoder="fpn", decoder_config=dict(DECODER), **kw)


def torchrun(nproc: int, *args, script: str | None = None) -> subprocess.CompletedProcess:
    target = [script] if script else ["-m", "fusion_seg"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *target, "train-decoder", *ARGS, *map(str, args)]  # a test's own options come last and win
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    extract_synthetic(d / "whole.zarr", views=1, augment=False, num_images=6)  # 64x96, every pixel labelled
    extract_synthetic(d / "val.zarr", split="val", views=1, augment=False, num_images=2)
    return d


@pytest.fixture(scope="module")
def two_procs_one_step(cache):
    """2 processes x 2 views = global batch 4 of 6 views: one step (2 views are dropped)."""
    run = cache / "ddp-step"
    done = torchrun(2, "--cache", cache / "whole.zarr", "--val-cache", cache / "val.zarr", "--out", run,
                    "--batch-size", 4, "--epochs", 1)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done


def one_sgd_step(cache_path: str, cfg: TrainConfig, views: list[int]) -> dict[str, torch.Tensor]:
    """The decoder after one SGD step on exactly ``views``, by hand: the reference for "which samples"."""
    store = CachedViews(cache_path, [])
    decoder, names = _make_decoder(cfg, store.spec.input_shapes(), len(store.spec.classes))
    features, labels = collate_views([CachedViews(cache_path, names)[v] for v in views])
    logits = decoder({k: v.float() for k, v in features.items()})
    loss = build_loss("ce", store.spec.ignore_index)(upsample_logits(logits, labels.shape[-2:]), labels)
    optimizer = torch.optim.SGD(decoder.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    loss.backward()
    optimizer.step()
    return decoder.state_dict()


# --------------------------------------------------------------------------- real processes
def test_resident_tier_holds_one_shard_per_process(cache, tmp_path):
    """--cache-mode device under torchrun: each process loads only floor(n/world) views of the store."""
    run = tmp_path / "sharded"
    done = torchrun(2, "--cache", cache / "whole.zarr", "--out", run, "--batch-size", 4, "--epochs", 2,
                    "--cache-mode", "device")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    spec = CachedViews(str(cache / "whole.zarr"), []).spec
    _, names = _make_decoder(config(), spec.input_shapes(), len(spec.classes))
    assert summary["cache"]["mode"] == "device" and summary["world_size"] == 2
    # 6 views over 2 processes: rank 0 holds 3 of them (the maps the decoder reads, and labels).
    assert summary["cache"]["resident_bytes"] == resident_bytes(spec, names, 3)
    assert load_checkpoint(run / "last.pt")["step"] == 2  # floor(6 / 4) steps an epoch, as the stream tier


def test_two_processes_step_like_one_process_at_the_global_batch(cache, two_procs_one_step, tmp_path, one_thread):
    run, _ = two_procs_one_step
    cfg = config(epochs=1, batch_size=4)
    single = train_decoder(str(cache / "whole.zarr"), tmp_path / "single", cfg, progress=False)
    assert single.steps == 1 and load_checkpoint(run / "last.pt")["step"] == 1
    ddp, ref = weights(run / "last.pt"), weights(tmp_path / "single" / "last.pt")
    assert max_diff(ddp, ref) < TOL

    # The comparison is sharp: the step itself, and one on any other choice of 4 (or 2) views,
    # move the weights far more than TOL.
    shapes = CachedViews(str(cache / "whole.zarr"), []).spec.input_shapes()
    initial = _make_decoder(cfg, shapes, 4)[0].state_dict()
    assert max_diff(initial, ref) > 1000 * TOL
    order = [int(i) for i in _loader(list(range(6)), cfg, 0, list, torch.device("cpu")).sampler]
    assert max_diff(one_sgd_step(str(cache / "whole.zarr"), cfg, order[:4]), ref) < TOL  # the same samples
    for wrong in (order[:2],  # every process takes the same first half (no sharding)
                  order[0:2] + order[3:5],  # contiguous shards of the permutation
                  order[2:6]):
        assert max_diff(one_sgd_step(str(cache / "whole.zarr"), cfg, wrong), ref) > 100 * TOL, wrong
    # The logged loss is the mean over both processes, i.e. the single process's loss.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged if r["type"] == "step"] == pytest.approx(single.losses, rel=1e-5)


def test_only_rank_0_writes_and_checkpoints_load_unchanged(two_procs_one_step):
    from fusion_seg.inference.segmenter import load_segmenter

    run, done = two_procs_one_step
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "curves.png", "last.pt",
                                                     "metrics.jsonl"]  # no second log, no temporary files
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["step", "epoch", "summary"]  # one of each, not one per process
    assert "val" in records[1] and 0 <= records[1]["val"]["miou"] <= 1  # rank 0 validated
    summary = records[-1]
    assert summary["world_size"] == 2 and summary["peak_memory_MiB"] > 0
    assert summary["peak_memory_scope"] == "rank 0, per process"
    assert done.stdout.count("steps in") == 1  # the command's result line, printed once
    assert json.loads((run / "config.json").read_text())["world_size"] == 2

    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["train"]["batch_size"] == 4  # the global batch
    assert not any(k.startswith("module.") for k in ckpt["model"])
    model, _ = load_segmenter(run / "best.pt", device="cpu")
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 64, 96)).shape == (1, 4, 64, 96)


def test_resume_across_process_counts(cache, tmp_path, monkeypatch, one_thread):
    """2 processes stop dead after epoch 1 and 1 process finishes; then the other way round.
    Both end where an uninterrupted single-process run ends. Crops (feature space) are on: they
    are drawn per (seed, epoch, view), whatever the rank."""
    store = cache / "whole.zarr"
    cfg = config(epochs=2, batch_size=2, crop=[64, 64])
    full = train_decoder(str(store), tmp_path / "full", cfg, progress=False)
    assert full.steps == 6
    args = ["--cache", store, "--batch-size", 2, "--epochs", 2, "--crop", "64x64"]

    # 2 -> 1: rank 0 dies right after writing last.pt of epoch 1; torchrun stops rank 1.
    script = tmp_path / "die_after_epoch_1.py"
    script.write_text(DIE_AFTER_EPOCH_1)
    died = torchrun(2, *args, "--out", tmp_path / "a", script=str(script))
    assert died.returncode != 0 and load_checkpoint(tmp_path / "a" / "last.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "a" / "last.pt")["world_size"] == 2
    train_decoder(str(store), tmp_path / "a", cfg, resume=True, progress=False)  # one process, no torchrun

    # 1 -> 2: a single process stops after epoch 1, two processes finish.
    raise_after_checkpoint(monkeypatch, 1, Stop)
    with pytest.raises(Stop):
        train_decoder(str(store), tmp_path / "b", cfg, progress=False)
    monkeypatch.undo()
    two = torchrun(2, *args, "--out", tmp_path / "b", "--resume")
    assert two.returncode == 0, two.stderr[-3000:]

    reference = weights(tmp_path / "full" / "last.pt")
    for name, world in (("a", 1), ("b", 2)):
        ckpt = load_checkpoint(tmp_path / name / "last.pt")
        assert (ckpt["epoch"], ckpt["step"], ckpt["world_size"]) == (2, 6, world)
        assert max_diff(ckpt["model"], reference) < TOL, name
        assert ckpt["scheduler"]["last_epoch"] == 6 and ckpt["optimizer"]["param_groups"][0]["lr"] == 0.0
        logged = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in logged if r["type"] == "step"]
        assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
        assert [r["loss"] for r in steps] == pytest.approx(full.losses, rel=1e-5)
        assert [r["world_size"] for r in logged if r["type"] == "summary"] == [world]


# --------------------------------------------------------------------------- the rules, in process
@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_global_step_is_the_same_samples_for_any_process_count(world):
    cfg = TrainConfig(batch_size=6, seed=3, workers=0)
    items = list(range(20))  # 20 // 6 = 3 global steps; 2 items are left out each epoch
    for epoch in (0, 1):
        single = [sorted(b) for b in _loader(items, cfg, epoch, list, torch.device("cpu"))]
        shares = [list(_loader(items, cfg, epoch, list, torch.device("cpu"), DistEnv(rank=r, world=world)))
                  for r in range(world)]
        assert len(single) == 3 and all(len(s) == 3 for s in shares)
        assert all(len(batch) == 6 // world for s in shares for batch in s)
        assert [sorted(sum((s[k] for s in shares), [])) for k in range(3)] == single
    assert single != [sorted(b) for b in _loader(items, cfg, 0, list, torch.device("cpu"))]  # epochs differ


def test_global_batch_must_divide_among_processes():
    assert DistEnv(world=4).local_batch(8) == 2
    with pytest.raises(UserError, match="multiple of 4"):
        DistEnv(world=4).local_batch(6)


def test_sync_bn_on_cpu_is_a_clear_error_and_no_schedule_setting():
    check_sync_bn(True, DistEnv(world=1))  # one process: nothing to synchronise
    check_sync_bn(False, DistEnv(world=2))
    with pytest.raises(UserError, match="needs CUDA"):
        check_sync_bn(True, DistEnv(world=2))
    assert TrainConfig(sync_bn=True).schedule() == TrainConfig().schedule()  # a resume may change it


def test_online_under_torchrun_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="single process"):
        train_online(tmp_path / "r", tiny_config(), dataset=DatasetRef("synthetic", "train"))

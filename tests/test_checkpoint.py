"""fusion_seg.checkpoint: the decoder checkpoint format, written atomically and read safely."""
from __future__ import annotations


import pytest

from pipeline_helpers import FullDisk
import torch

import fusion_seg.checkpoint as ckpt_mod
from fusion_seg.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint
from fusion_seg.errors import CheckpointError, UserError


def _payload(epoch=1, value=1.0):
    return {"epoch": epoch, "model": {"w": torch.full((2, 3), value), "b": torch.arange(3)},
            "config": {"decoder": "fpn", "crop": [64, 64], "lr": 0.01, "note": None}, "classes": ["a", "b"]}


def _names(folder):
    return sorted(p.name for p in folder.iterdir())




def test_round_trip_keeps_tensors_and_values_and_adds_format_and_version(tmp_path):
    path = tmp_path / "runs" / "new" / "best.pt"  # missing folders are created
    save_checkpoint(path, _payload())
    got = load_checkpoint(path)
    assert got["format"] == FORMAT and got["version"] == VERSION
    assert got["epoch"] == 1 and got["classes"] == ["a", "b"]
    assert got["config"] == {"decoder": "fpn", "crop": [64, 64], "lr": 0.01, "note": None}
    assert torch.equal(got["model"]["w"], torch.full((2, 3), 1.0)) and torch.equal(got["model"]["b"], torch.arange(3))
    assert _names(path.parent) == ["best.pt"]


def test_saving_again_replaces_the_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(epoch=1))
    save_checkpoint(path, _payload(epoch=2, value=5.0))
    got = load_checkpoint(path)
    assert got["epoch"] == 2 and torch.equal(got["model"]["w"], torch.full((2, 3), 5.0))
    assert _names(tmp_path) == ["last.pt"]


def test_tensors_saved_from_another_device_load_on_cpu(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"model": {"w": torch.ones(2)}})
    assert load_checkpoint(tmp_path / "a.pt")["model"]["w"].device.type == "cpu"


def test_a_full_disk_mid_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(epoch=1))
    before = path.read_bytes()
    monkeypatch.setattr(ckpt_mod, "_open_temp", lambda tmp: FullDisk(tmp, room=100))
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(path, _payload(epoch=2))
    message = str(err.value)
    assert f"cannot write checkpoint {path}" in message and "MiB free" in message
    assert "the previous last.pt is unchanged" in message and "--resume" in message
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1
    assert _names(tmp_path) == ["last.pt"]


def test_a_full_disk_on_the_first_save_says_there_was_no_earlier_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "_open_temp", lambda tmp: FullDisk(tmp, room=0))
    with pytest.raises(CheckpointError, match="no earlier best.pt was there"):
        save_checkpoint(tmp_path / "best.pt", _payload())
    assert _names(tmp_path) == []


def test_a_failure_in_torch_save_is_a_checkpoint_error_and_leaves_no_file(tmp_path, monkeypatch):
    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="the write stopped part-way, as when the disk is full"):
        save_checkpoint(tmp_path / "best.pt", _payload())
    assert _names(tmp_path) == []


def test_an_interrupt_while_saving_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(epoch=1))

    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):  # not turned into a CheckpointError
        save_checkpoint(path, _payload(epoch=2))
    assert load_checkpoint(path)["epoch"] == 1 and _names(tmp_path) == ["last.pt"]


def test_a_newer_version_is_refused_with_upgrade_advice(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "version": VERSION + 1, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=f"version {VERSION + 1}, newer than this fusion-seg reads") as err:
        load_checkpoint(path)
    assert "upgrade fusion-seg" in str(err.value)


def test_an_older_version_still_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "epoch": 3}, path)  # no version field: before versions were written
    assert load_checkpoint(path)["epoch"] == 3


@pytest.mark.parametrize("content", [{"epoch": 1}, {"format": "something-else", "version": 1}, [1, 2, 3]])
def test_a_file_of_another_format_is_refused(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="is not a fusion-seg decoder checkpoint"):
        load_checkpoint(path)


def test_a_missing_file_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found") as err:
        load_checkpoint(tmp_path / "nope.pt")
    assert str(tmp_path / "nope.pt") in str(err.value)


def test_a_truncated_file_is_refused_as_corrupt(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, _payload())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


class _Gadget:
    """A class a weights-only load must not construct."""

    ran = False

    def __reduce__(self):
        return (_Gadget._run, ())

    @staticmethod
    def _run():
        _Gadget.ran = True
        return "ran"


def test_no_code_in_a_checkpoint_runs_on_load(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "payload": _Gadget()}, path)
    _Gadget.ran = False
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    assert not _Gadget.ran

"""fusion_seg.files: the one atomic writer behind checkpoints, PNGs, figures, JSON and markdown."""
from __future__ import annotations

import errno
import json
import os

import pytest

from fusion_seg import files
from fusion_seg.files import atomic_write, write_json_atomic, write_text_atomic


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_the_bytes_and_returns_the_path(tmp_path):
    target = tmp_path / "out.bin"
    assert atomic_write(str(target), lambda fh: fh.write(b"abc")) == target
    assert target.read_bytes() == b"abc"
    assert _names(tmp_path) == ["out.bin"]  # no temporary file left


def test_replaces_an_existing_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert _names(tmp_path) == ["out.txt"]


def test_the_new_file_has_the_mode_a_plain_write_gives(tmp_path):
    plain, atomic = tmp_path / "plain", tmp_path / "atomic"
    plain.write_bytes(b"x")
    atomic_write(atomic, lambda fh: fh.write(b"x"))
    assert os.stat(atomic).st_mode == os.stat(plain).st_mode  # not mkstemp's 0600


@pytest.mark.parametrize("durable", [True, False])
def test_a_failing_writer_leaves_the_target_untouched_and_no_temporary_file(tmp_path, durable):
    target = tmp_path / "result.json"
    target.write_text("old")

    def half_then_fail(fh):
        fh.write(b"{\"half\": ")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):  # the writer's own exception, not reworded
        atomic_write(target, half_then_fail, durable=durable)
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["result.json"]


def test_a_failure_without_an_earlier_file_leaves_nothing(tmp_path):
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "new.png", lambda fh: 1 / 0)
    assert _names(tmp_path) == []


def test_interrupt_while_writing_removes_the_temporary_file(tmp_path):
    target = tmp_path / "out.md"
    target.write_text("old")

    def interrupted(fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_text() == "old" and _names(tmp_path) == ["out.md"]


def test_a_failing_rename_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", no_space)
    with pytest.raises(OSError) as err:
        write_text_atomic(target, "new")
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and _names(tmp_path) == ["out.txt"]


def test_the_temporary_file_is_hidden_beside_the_target(tmp_path):
    seen = []

    def opener(tmp):
        seen.append(tmp)
        return open(tmp, "xb")

    atomic_write(tmp_path / "x.pt", lambda fh: fh.write(b"1"), opener=opener)
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".x.pt.") and tmp.name.endswith(".tmp")
    assert files.temp_path(tmp_path / "x.pt") != files.temp_path(tmp_path / "x.pt")  # unique per call


def test_a_missing_folder_is_created(tmp_path):
    target = tmp_path / "a" / "b" / "metrics.json"
    write_json_atomic(target, {"miou": 0.5})
    assert json.loads(target.read_text()) == {"miou": 0.5}


def test_a_parent_that_is_a_file_fails_before_anything_is_written(tmp_path):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(OSError):  # FileExistsError or NotADirectoryError, naming the path
        write_text_atomic(tmp_path / "file" / "out.txt", "x")
    assert _names(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "keep"


def test_json_is_written_as_json_dumps_writes_it(tmp_path):
    obj = {"b": [1, 2.5, None], "a": "é"}
    write_json_atomic(tmp_path / "indented.json", obj)
    write_json_atomic(tmp_path / "compact.json", obj, indent=None)
    assert (tmp_path / "indented.json").read_text() == json.dumps(obj, indent=2)
    assert (tmp_path / "compact.json").read_text() == json.dumps(obj)


def test_an_unserialisable_object_leaves_the_old_json(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1} and _names(tmp_path) == ["metrics.json"]


def test_text_is_utf8(tmp_path):
    write_text_atomic(tmp_path / "table.md", "K·B + E·D\n")
    assert (tmp_path / "table.md").read_bytes() == "K·B + E·D\n".encode("utf-8")


def test_durable_writes_fsync_the_file_and_the_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    write_text_atomic(tmp_path / "a.txt", "x")
    assert len(synced) == 2  # the temporary file, then the folder (the rename)
    synced.clear()
    write_text_atomic(tmp_path / "b.txt", "x", durable=False)
    assert synced == []


def test_a_folder_that_cannot_be_fsynced_is_not_an_error(tmp_path, monkeypatch):
    real_open = os.open

    def no_folder_open(path, flags, *args):
        if os.path.isdir(path):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, "open", no_folder_open)
    write_text_atomic(tmp_path / "a.txt", "x")  # the file is in place: the folder's fsync is best effort
    assert (tmp_path / "a.txt").read_text() == "x"


def test_files_sits_below_every_other_module():
    """Everything that writes a file imports fusion_seg.files, so it may import no more than the errors."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(files))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("fusion_seg") and m != "fusion_seg.errors"]


def test_a_failed_cleanup_does_not_hide_the_error_that_stopped_the_write(tmp_path, monkeypatch):
    """Issue 20: on a file system gone read-only the temporary file may not be removable either; the user must
    see why the write failed (a full disk here), not the failed cleanup."""
    def full(fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    def unremovable(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.Path, "unlink", unremovable)
    with pytest.raises(OSError) as err:
        atomic_write(tmp_path / "out.json", full)
    assert err.value.errno == errno.ENOSPC

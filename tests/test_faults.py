"""The kill tests' pause point (fusion_seg/faults.py), in-process: what it does set and unset."""
import ast
import importlib
import os
from pathlib import Path

import pytest

from fusion_seg import faults


def test_unset_returns_at_once_and_counts_nothing(monkeypatch):
    monkeypatch.setattr(faults, "_PAUSE", None)
    monkeypatch.setattr(faults, "_counts", {})
    for _ in range(3):
        faults.checkpoint_reached("view")
    assert faults._counts == {}


def test_pauses_at_the_nth_point_of_its_kind_after_writing_the_marker(tmp_path, monkeypatch):
    marker = tmp_path / "paused"
    monkeypatch.setattr(faults, "_PAUSE", ("view", 2))
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setattr(faults, "PAUSE_SECONDS", 0.0)
    monkeypatch.setenv(faults.PAUSE_MARKER, str(marker))
    faults.checkpoint_reached("step")  # another kind does not count
    faults.checkpoint_reached("view")
    assert not marker.exists()
    faults.checkpoint_reached("view")
    assert marker.read_text().split() == [str(os.getpid()), "view", "2"]
    assert [p.name for p in tmp_path.iterdir()] == ["paused"]  # written whole, no temporary left
    marker.unlink()
    faults.checkpoint_reached("view")  # once only
    assert not marker.exists()


def test_the_variable_is_parsed_strictly():
    assert faults._pause_point(None) is None and faults._pause_point("") is None
    assert faults._pause_point("view:3") == ("view", 3) and faults._pause_point("step:12") == ("step", 12)
    for bad in ("views:3", "step", "step:0", "step:x", "view:-1"):
        with pytest.raises(ValueError, match=faults.PAUSE_AFTER):
            faults._pause_point(bad)


def test_read_from_the_environment_at_import(monkeypatch):
    monkeypatch.setenv(faults.PAUSE_AFTER, "step:4")
    try:
        assert importlib.reload(faults)._PAUSE == ("step", 4)
    finally:
        monkeypatch.delenv(faults.PAUSE_AFTER)
        importlib.reload(faults)
    assert faults._PAUSE is None


def test_imports_only_the_standard_library():
    """Imported by extraction and training: it must add no import of its own."""
    tree = ast.parse(Path(faults.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "os", "time", "fusion_seg.files"}, imported  # files.py: standard library only

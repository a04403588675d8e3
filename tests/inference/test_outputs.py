"""Issue 20: predict, evaluate and visualize on a read-only or full disk: one line naming the file and the fix,
never a traceback; an --out that cannot be written is refused before the model loads.

The read-only folders and full disks are real (tests/mounts.py: bind mounts and a tiny tmpfs in a private
mount namespace), so the errors are the kernel's own.
"""
from __future__ import annotations

import errno

import numpy as np
import pytest
from PIL import Image

from fusion_seg.errors import UserError
from fusion_seg.inference import predict as infer
from mounts import cli, run_with_mounts
from pipeline_helpers import SYNTH, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

NO_CHECKPOINT = "no-such-checkpoint.pt"  # a refusal before the model loads never gets to read it
DATA = ["--dataset", "synthetic", "--split", "val", "--dataset-opt", "num_images=1",
        "--dataset-opt", f"size={list(SYNTH['size'])}", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("outputs"))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in" / "a.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*SYNTH["size"], 3), dtype=np.uint8)).save(path)
    return path


def one_line_error(done, *names) -> str:
    """The command failed with exit status 2 and one line on stderr that names each of ``names``."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


# ----- a read-only --out: refused before the model loads -----------------------------------------

def test_predict_refuses_a_read_only_out_before_loading(tmp_path, image):
    ro = tmp_path / "ro"
    (ro / "out").mkdir(parents=True)
    for out in (ro / "out", ro / "new" / "out"):  # an existing folder, and one to be made
        done = run_with_mounts(cli("predict", "--checkpoint", NO_CHECKPOINT, "--input", image, "--out", out),
                               read_only=[ro])
        assert "read-only" in one_line_error(done, out, "--out")


def test_evaluate_refuses_a_read_only_out_before_loading(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    done = run_with_mounts(cli("evaluate", "--checkpoint", ro / "best.pt", *DATA, "--out", ro / "eval"),
                           read_only=[ro])
    assert "read-only" in one_line_error(done, ro / "eval", "--out")
    # the default folder, beside a checkpoint on a read-only disk: says to pass --out
    done = run_with_mounts(cli("evaluate", "--checkpoint", ro / "best.pt", *DATA), read_only=[ro])
    assert "read-only" in one_line_error(done, ro, "--out")


def test_visualize_refuses_a_read_only_out_before_loading(tmp_path, image):
    ro = tmp_path / "ro"
    ro.mkdir()
    done = run_with_mounts(cli("visualize", "--checkpoint", NO_CHECKPOINT, "--input", image,
                               "--out", ro / "fig.png"), read_only=[ro])
    assert "read-only" in one_line_error(done, ro / "fig.png", "--out")


def test_visualize_refuses_an_out_that_is_a_folder_or_under_a_file(tmp_path, image, monkeypatch):
    from fusion_seg.reports import visualize as vis

    monkeypatch.setattr(vis, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "fig.png").mkdir()
    with pytest.raises(UserError, match="is a folder") as info:
        vis.visualize([NO_CHECKPOINT], image, tmp_path / "fig.png")
    assert "--out" in str(info.value)
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="notes.txt, which is a file") as info:
        vis.visualize([NO_CHECKPOINT], image, tmp_path / "notes.txt" / "fig.png")
    assert (tmp_path / "notes.txt").read_text() == "keep"


# ----- a full disk while writing: one line naming the file -----------------------------------------

def test_predict_on_a_full_disk_names_the_file(tmp_path, checkpoint, image):
    out = tmp_path / "full"
    out.mkdir()
    done = run_with_mounts(cli("predict", "--checkpoint", checkpoint, "--input", image, "--out", out,
                               "--device", "cpu"), full=[out])
    assert "disk is full" in one_line_error(done, out, "--out")


def test_predict_names_the_mask_or_overlay_it_could_not_write(tmp_path, checkpoint, image, monkeypatch):
    """Past the legend, each image's label map and overlay: the write that fails is named."""
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for writer, name in (("write_mask_png", "a.png"), ("write_rgb_png", "a_overlay.png")):
        with monkeypatch.context() as patch:
            patch.setattr(infer, writer, full)
            with pytest.raises(UserError, match="disk is full") as info:
                infer.predict(checkpoint, image, tmp_path / "out", device="cpu", progress=False)
        assert str(tmp_path / "out" / name) in str(info.value)


def test_evaluate_on_a_full_disk_names_the_file(tmp_path, checkpoint):
    out = tmp_path / "full"
    out.mkdir()
    done = run_with_mounts(cli("evaluate", "--checkpoint", checkpoint, *DATA, "--out", out), full=[out])
    assert "disk is full" in one_line_error(done, out / "metrics.json")


def test_visualize_on_a_full_disk_names_the_file(tmp_path, checkpoint, image):
    out = tmp_path / "full"
    out.mkdir()
    done = run_with_mounts(cli("visualize", "--checkpoint", checkpoint, "--input", image,
                               "--out", out / "fig.pdf"), full=[out])
    assert "disk is full" in one_line_error(done, out / "fig.pdf", "--out")

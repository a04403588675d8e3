"""The README's Python API example runs as written (issue #13; every stage once since issue #22: extract, train,
evaluate, predict), and the package imports lazily."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one example"
    return blocks[0]


@pytest.mark.usefixtures("one_thread")
def test_the_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the example writes cache/ and runs/ relative to where it runs
    exec(compile(api_example(), str(README), "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "runs" / "api" / "best.pt").is_file()
    assert (tmp_path / "cache" / "api-train.zarr").is_dir()
    out = capsys.readouterr().out
    assert "steps; most pixels:" in out and "val mIoU" in out and "1 image(s) ->" in out
    assert (tmp_path / "runs" / "api" / "eval" / "metrics.json").is_file()
    assert (tmp_path / "runs" / "api" / "predictions" / "api-image.png").is_file()


def test_every_api_name_resolves_and_importing_the_package_loads_no_torch():
    import fusion_seg

    for name in fusion_seg.__all__:
        assert getattr(fusion_seg, name) is not None, name
    code = "import sys, fusion_seg; assert 'torch' not in sys.modules, 'torch imported'; print(len(fusion_seg.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_model_takes_numpy_or_pil_and_refuses_anything_else_with_the_fix(tmp_path):
    import numpy as np
    from PIL import Image

    from fusion_seg.errors import UserError
    from fusion_seg.inference.segmenter import as_rgb_array

    rgb = np.zeros((4, 5, 3), np.uint8)
    assert as_rgb_array(rgb) is rgb
    assert as_rgb_array(Image.fromarray(rgb).convert("L")).shape == (4, 5, 3)  # converted to RGB
    for bad in (np.zeros((4, 5), np.uint8), np.zeros((4, 5, 3), np.float32), "image.png"):
        with pytest.raises(UserError, match="RGB image"):
            as_rgb_array(bad)

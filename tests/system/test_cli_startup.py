"""The installed program in a process of its own: `python -m fusion_seg` is the CLI, and the light commands
(help, info, verify) start without importing torch. Each check is a real child interpreter."""
import subprocess
import sys

from pipeline_helpers import extract_synthetic


def test_python_dash_m_is_the_same_program():
    out = subprocess.run([sys.executable, "-m", "fusion_seg", "--help"], capture_output=True, text=True, check=True)
    for command in ("extract", "info", "train-decoder", "evaluate", "predict", "run"):
        assert command in out.stdout


DRIVER = """
import sys
from fusion_seg.cli import main
try:
    main(sys.argv[1:], prog_name="fusion-seg", standalone_mode=False)
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
heavy = sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def test_help_info_and_verify_do_not_import_torch(tmp_path):
    store = tmp_path / "s.zarr"
    extract_synthetic(store, views=1, crop=(64, 64), num_images=4)
    for args in (["--help"], ["train-decoder", "--help"], ["extract", "--help"], ["info", store],
                 ["info", "--json", store], ["verify", store]):
        out = subprocess.run([sys.executable, "-c", DRIVER, *map(str, args)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == "HEAVY:", (args, out.stdout[-300:])


REFUSED = """
import sys
from fusion_seg.cli import main
try:
    main(sys.argv[1:], prog_name="fusion-seg")
except SystemExit as exc:
    print("EXIT:" + str(exc.code))
print("HEAVY:" + ",".join(sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)))
"""


def test_requests_are_refused_before_the_library_is_imported(tmp_path):
    """Issue 22: the command line builds and checks its requests in the torch-free fusion_seg.requests, so a
    request that cannot be made (a crop with --no-augment, a feature crop off the coarsest stride, --online
    without a dataset) is one line, exit 2, and torch was never imported."""
    for args, says in ((["extract", "--dataset", "synthetic", "--split", "train", "--no-augment", "--crop", "64x64",
                         "--out", tmp_path / "x.zarr"], "--crop"),
                       (["train-decoder", "--cache", "s.zarr", "--crop", "40x64", "--out", tmp_path / "r"], "--crop 40x64"),
                       (["train-decoder", "--online", "--out", tmp_path / "r"], "--online needs --dataset")):
        out = subprocess.run([sys.executable, "-c", REFUSED, *map(str, args)], capture_output=True, text=True)
        assert out.stdout.strip().splitlines()[-2:] == ["EXIT:2", "HEAVY:"], (args, out.stdout, out.stderr)
        assert says in out.stderr and out.stderr.count("\n") == 1, (args, out.stderr)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "r").exists()

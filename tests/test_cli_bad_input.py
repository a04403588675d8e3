"""Issue 12: every numeric option of every command is range-checked before any work is done.

Each case is one out-of-range value of one option, given on an otherwise valid command line
(train-decoder and compare get a real, tiny cache, so a value that slipped through would start
training). The command must exit 2 with a one-line error that names the option, print no
traceback, and (extract, train-decoder, compare) leave no store, lock or run directory behind.
The library entry points that recipes call without the CLI (``extract()``, ``TrainConfig``)
refuse the same values.

predict, visualize, info and verify take no numeric option; evaluate takes --scales.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from fusion_seg.cli import main
from fusion_seg.errors import UserError

DATA = ["--dataset", "synthetic", "--dataset-opt", "num_images=2", "--dataset-opt", "size=[64,64]"]
ENC = ["--encoder", "resnet18", "--random-init", "--strides", "4,8,16,32", "--device", "cpu"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "train.zarr"
    result = CliRunner().invoke(main, ["extract", *DATA, "--split", "train", "--crop", "64x64", *ENC,
                                       "--loader-workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


# (command, the option under test, its bad value(s) as separate arguments)
EXTRACT = [
    ("--views", "0"), ("--crop", "0x64"), ("--crop", "64x-1"),
    ("--scale-range", "2", "0.5"), ("--scale-range", "0", "1"), ("--scale-range", "-1", "2"),
    ("--short-side", "0"), ("--size", "0x64"), ("--seed", "-1"), ("--seed", "99999999999999999999"),
    ("--strides", "3,8"), ("--strides", "1,4"), ("--strides", "4,64"), ("--strides", "8,4"), ("--strides", "4,4"),
    ("--strides", ""),
    ("--batch-size", "0"), ("--loader-workers", "-1"), ("--workers", "-1"), ("--dask-workers", "0"),
]
TRAIN = [
    ("--crop", "0x64"), ("--crop", "48x64"), ("--scale-range", "2", "0.5"), ("--scale-range", "0", "1"),
    ("--short-side", "0"), ("--size", "64x0"), ("--seed", "-1"), ("--seed", "99999999999999999999"),
    ("--strides", "4,5"),
    ("--workers", "-1"), ("--streams", "3"), ("--modules", "0,1"), ("--blocks", "0"), ("--views", "0"),
    ("--epochs", "0"), ("--batch-size", "0"), ("--lr", "0"), ("--lr", "-0.1"),
    ("--ohem-thresh", "0"), ("--ohem-thresh", "1.5"), ("--ohem-min-kept", "0"),
    ("--val-every", "0"), ("--log-every", "0"), ("--decoder", "nope"), ("--class-weights", "median"),
    ("--patience", "0"),
]
EVALUATE = [("--scales", "0"), ("--scales", "0.5,-1"), ("--scales", "a,b"), ("--scales", "40"), ("--scales", ",")]
COMPARE = [
    ("--epochs", "0"), ("--batch-size", "0"), ("--lr", "0"), ("--crop", "48x48"), ("--crop", "0x32"),
    ("--seed", "-1"), ("--workers", "-1"), ("--repeats", "0"), ("--decoders", "linear,nope"), ("--decoders", ","),
]
PLAN = [("--size", "0x64"), ("--views", "0"), ("--epochs", "0"), ("--batch-size", "0"), ("--repeats", "0"),
        ("--decoder", "nope"), ("--dataset", "nope")]
RUN = [("--epoch-scale", "0"), ("--epoch-scale", "-1")]
BENCH = [("--batch-size", "0"), ("--size", "0x480"), ("--scaling-sizes", "360x480,0x1"),
         ("--forward-sizes", "abc"), ("--views", "0"), ("--repeats", "0"), ("--loader-workers", "-1"),
         ("--workers", "-1"), ("--decoder", "nope")]

CASES = ([("extract", *c) for c in EXTRACT] + [("train-decoder", *c) for c in TRAIN]
         + [("compare", *c) for c in COMPARE] + [("plan", *c) for c in PLAN] + [("run", *c) for c in RUN]
         + [("bench", *c) for c in BENCH] + [("evaluate", *c) for c in EVALUATE])


def command_line(command: str, option: str, values: tuple[str, ...], tmp_path, cache) -> list[str]:
    bad = [option, *values]
    if command == "extract":
        return ["extract", *DATA, "--split", "train", *ENC, "--loader-workers", "0", *bad,
                "--out", str(tmp_path / "out" / "x.zarr")]
    if command == "train-decoder":
        return ["train-decoder", "--cache", str(cache), "--epochs", "1", "--batch-size", "2", "--workers", "0",
                "--device", "cpu", "--loss", "ce", *bad, "--out", str(tmp_path / "runs" / "r")]
    if command == "compare":
        return ["compare", "--cache", str(cache), "--decoders", "linear", "--epochs", "1", "--batch-size", "2",
                "--workers", "0", "--device", "cpu", "--repeats", "1", *bad, "--out", str(tmp_path / "runs" / "c")]
    if command == "plan":
        return ["plan", str(cache), "--device", "cpu", "--encoder", "resnet18", *bad]
    if command == "run":
        recipe = tmp_path / "recipe.toml"
        recipe.write_text('[[stage]]\nkind = "extract"\n')
        return ["run", str(recipe), "--dry-run", *bad]
    if command == "evaluate":
        return ["evaluate", "--checkpoint", str(tmp_path / "runs" / "missing.pt"), "--dataset", "synthetic",
                "--split", "val", "--device", "cpu", *bad, "--out", str(tmp_path / "out" / "e")]
    if command == "bench":
        return ["bench", "--device", "cpu", "--sections", "format", "--workdir", str(tmp_path / "runs" / "b"), *bad]
    raise AssertionError(command)


@pytest.mark.parametrize("case", CASES, ids=[" ".join(c) for c in CASES])
def test_out_of_range_values_are_refused_before_any_work(case, tmp_path, cache):
    command, option, *values = case
    result = CliRunner().invoke(main, command_line(command, option, tuple(values), tmp_path, cache))
    assert result.exit_code == 2, result.output
    assert option in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists(), "work was started"


def test_an_online_crop_need_not_be_a_multiple_of_32():
    # From a cache --crop is a feature-space crop (a multiple of 32); with --online it is the augmentation
    # crop: 48x48 passes the command line (here to the next error, the missing --dataset).
    result = CliRunner().invoke(main, ["train-decoder", "--online", "--crop", "48x48", "--out", "unused"])
    assert result.exit_code == 2 and "--online needs --dataset" in result.output, result.output


# --- the library entry points refuse the same values, before any work ----------------------------------------------

EXTRACT_KW = dict(dataset="synthetic", split="train", encoder="resnet18", random_init=True, strides=(4, 8, 16, 32),
                  device="cpu", loader_workers=0, dataset_options={"num_images": 2, "size": [64, 64]})


@pytest.mark.parametrize("bad, option", [
    (dict(views=0), "--views"), (dict(crop=(0, 64)), "--crop"), (dict(crop=(64,)), "--crop"),
    (dict(scale_range=(2.0, 0.5)), "--scale-range"), (dict(scale_range=(0.0, 1.0)), "--scale-range"),
    (dict(short_side=0), "--short-side"), (dict(size=(64, 0)), "--size"), (dict(seed=-1), "--seed"),
    (dict(strides=(3, 8)), "--strides"), (dict(strides=(8, 4)), "--strides"), (dict(strides=()), "--strides"),
    (dict(batch_size=0), "--batch-size"), (dict(loader_workers=-1), "--loader-workers"),
    (dict(writers=0), "writers"), (dict(workers=0), "--dask-workers"),
])
def test_extract_refuses_bad_values_before_creating_the_store(bad, option, tmp_path):
    """A recipe's values (built into extract()'s requests as a recipe stage's are) are refused by extract() itself."""
    from fusion_seg.extract.local import extract
    from fusion_seg.requests import extract_arguments

    out = tmp_path / "out" / "x.zarr"
    with pytest.raises(UserError, match=option):
        extract(**extract_arguments({"out": out, **EXTRACT_KW, **bad}), progress=False)
    assert not (tmp_path / "out").exists()


def test_extract_with_a_corrected_scale_range_after_a_bad_one(tmp_path):
    """`--scale-range 2 0.5` used to leave a store whose recorded settings refused the corrected command."""
    out = tmp_path / "x.zarr"
    args = ["extract", *DATA, "--split", "train", "--crop", "64x64", *ENC, "--loader-workers", "0", "--out", str(out)]
    assert CliRunner().invoke(main, [*args, "--scale-range", "2", "0.5"]).exit_code == 2
    result = CliRunner().invoke(main, [*args, "--scale-range", "0.5", "2"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("bad, name", [
    (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch-size"), (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(momentum=-0.1), "momentum"), (dict(momentum=1.0), "momentum"), (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(poly_power=-1.0), "poly_power"), (dict(crop=[48, 64]), "crop"), (dict(crop=[0, 32]), "crop"),
    (dict(crop=[32]), "crop"), (dict(views=0), "views"), (dict(loss="dice"), "loss"),
    (dict(ohem_thresh=0.0), "ohem-thresh"), (dict(ohem_thresh=1.01), "ohem-thresh"),
    (dict(ohem_min_kept=0), "ohem-min-kept"), (dict(seed=-1), "seed"), (dict(seed=2**63), "seed"),
    (dict(workers=-1), "workers"),
    (dict(val_every=0), "val-every"), (dict(log_every=0), "log-every"), (dict(cache_mode="disk"), "cache-mode"),
    (dict(patience=0), "patience"),
])
def test_train_config_refuses_bad_values(bad, name):
    from fusion_seg.training.config import TrainConfig

    with pytest.raises(UserError, match=name):
        TrainConfig(**bad)


def test_train_config_accepts_its_defaults_and_edge_values():
    from fusion_seg.training.config import TrainConfig

    TrainConfig()
    TrainConfig(lr=0.0)  # a script may train with lr 0 (tests carry weights over unchanged); the CLI refuses --lr 0
    TrainConfig(epochs=1, batch_size=1, lr=1e-6, momentum=0.0, weight_decay=0.0, crop=[32, 64], views=1,
                ohem_thresh=1.0, ohem_min_kept=1, seed=0, workers=0, val_every=1, log_every=1, loss="ce")


# --- issue 20: options the mode ignores, values of the wrong type, and what an interruption says ------------------

def train_line(tmp_path, cache, *bad):
    return ["train-decoder", "--cache", str(cache), "--epochs", "1", "--batch-size", "2", "--workers", "0",
            "--device", "cpu", "--loss", "ce", *bad, "--out", str(tmp_path / "runs" / "r")]


# (the options as given, the one the message must name); each would be ignored in the mode the command runs in
UNUSED = [
    (("--scale-range", "1", "1"), "--scale-range"), (("--no-flip",), "--no-flip"), (("--no-augment",), "--no-augment"),
    (("--short-side", "64"), "--short-side"), (("--size", "64x64"), "--size"), (("--encoder", "resnet50"), "--encoder"),
    (("--random-init",), "--random-init"), (("--strides", "8,16"), "--strides"), (("--dataset", "synthetic"), "--dataset"),
    (("--root", "data"), "--root"), (("--split", "val"), "--split"), (("--dataset-opt", "num_images=2"), "--dataset-opt"),
    (("--weights", "w.pth"), "--weights"),
]


@pytest.mark.parametrize("given, option", UNUSED, ids=[u[1] for u in UNUSED])
def test_online_only_options_are_refused_when_training_from_a_cache(given, option, tmp_path, cache):
    result = CliRunner().invoke(main, train_line(tmp_path, cache, *given))
    assert result.exit_code == 2, result.output
    assert f"only --online training uses {option}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("given, option", [(("--cache", "s.zarr"), "--cache"), (("--views", "1"), "--views")])
def test_cache_only_options_are_refused_online(given, option, tmp_path):
    result = CliRunner().invoke(main, ["train-decoder", "--online", *DATA, *ENC, *given, "--out",
                                       str(tmp_path / "runs" / "r")])
    assert result.exit_code == 2 and f"--online training does not use {option}" in result.output, result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["extract", "train-decoder"])
def test_a_crop_with_no_augment_is_refused(command, tmp_path):
    line = ["extract", *DATA, "--split", "val", *ENC, "--loader-workers", "0", "--out", str(tmp_path / "out" / "x.zarr")]
    if command == "train-decoder":
        line = ["train-decoder", "--online", *DATA, *ENC, "--workers", "0", "--out", str(tmp_path / "out" / "r")]
    result = CliRunner().invoke(main, [*line, "--no-augment", "--crop", "64x64"])
    assert result.exit_code == 2 and "--crop 64x64 has no effect with --no-augment" in result.output, result.output
    assert not (tmp_path / "out").exists()


WRONG_TYPES = [
    ("extract", ("--dataset-opt", "num_images=abc"), 'num_images = "abc" should be an integer'),
    ("extract", ("--dataset-opt", "num_images=1.5"), "num_images = 1.5 should be an integer"),
    ("extract", ("--dataset-opt", "size=64"), "size = 64 should be a list of 2 integers"),
    ("train-decoder", ("--decoder-opt", "widths=abc"), 'widths = "abc" should be a list of integers'),
    ("train-decoder", ("--decoder-opt", "streams=4.5"), "streams = 4.5 should be an integer"),
    ("train-decoder", ("--decoder-opt", "width=128"), "has no option(s) width (did you mean widths?)"),
    ("online", ("--dataset-opt", "num_images=two"), 'num_images = "two" should be an integer'),
    ("plan", ("--decoder-opt", "widths=abc"), 'options (widths="abc"): widths = "abc" should be a list of integers'),
]


@pytest.mark.parametrize("command, given, message", WRONG_TYPES, ids=[" ".join(w[1]) for w in WRONG_TYPES])
def test_option_values_of_the_wrong_type_are_refused_before_any_work(command, given, message, tmp_path, cache):
    out = tmp_path / "out"
    if command == "extract":
        line = ["extract", "--dataset", "synthetic", "--split", "train", *given, *ENC, "--loader-workers", "0",
                "--out", str(out / "x.zarr")]
    elif command == "online":
        line = ["train-decoder", "--online", "--dataset", "synthetic", *given, *ENC, "--out", str(out / "r")]
    elif command == "plan":
        line = ["plan", str(cache), "--device", "cpu", "--encoder", "resnet18", *given, "--json", str(out / "p.json")]
    else:
        line = ["train-decoder", "--cache", str(cache), *given, "--device", "cpu", "--out", str(out / "r")]
    result = CliRunner().invoke(main, line)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output and result.output.count("\n") == 1
    assert not out.exists()


def test_the_decoder_opt_example_in_the_help_is_accepted(tmp_path, cache):
    from fusion_seg.cli import DECODER_OPT_EXAMPLE

    assert DECODER_OPT_EXAMPLE in " ".join(CliRunner().invoke(main, ["train-decoder", "--help"]).output.split())
    result = CliRunner().invoke(main, train_line(tmp_path, cache, "--decoder-opt", DECODER_OPT_EXAMPLE))
    assert result.exit_code == 0, result.output
    from fusion_seg.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "runs" / "r" / "last.pt")["decoder"]["config"]["widths"] == [32, 64, 128, 256]


@pytest.mark.parametrize("command, says, never", [
    ("extract", "Re-run the same command to resume", "--resume"),
    ("train-decoder", "with --resume", "Re-run the same command to resume"),
    ("predict", "predict does not resume", "Re-run the same command to resume"),
    ("evaluate", "Nothing to resume", "Re-run the same command to resume"),
])
def test_an_interruption_says_only_what_is_true_of_the_command(command, says, never, monkeypatch, tmp_path, cache):
    """Ctrl-C used to print "Re-run the same command to resume" for every command, predict (which does not
    resume) and train-decoder (which needs --resume) included."""
    import fusion_seg.evaluation.evaluate
    import fusion_seg.extract.local
    import fusion_seg.inference.predict
    import fusion_seg.training.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    target = {"extract": (fusion_seg.extract.local, "extract"), "train-decoder": (fusion_seg.training.train,
                                                                                  "train_decoder"),
              "predict": (fusion_seg.inference.predict, "predict"),
              "evaluate": (fusion_seg.evaluation.evaluate, "evaluate")}[command]
    monkeypatch.setattr(*target, interrupted)
    line = {"extract": ["extract", *DATA, "--split", "train", *ENC, "--out", str(tmp_path / "x.zarr")],
            "train-decoder": train_line(tmp_path, cache),
            "predict": ["predict", "--checkpoint", "c.pt", "--input", "in", "--out", str(tmp_path / "p")],
            "evaluate": ["evaluate", "--checkpoint", "c.pt", *DATA, "--split", "val"]}[command]
    result = CliRunner().invoke(main, line)
    assert result.exit_code == 130 and says in result.output and never not in result.output, result.output


def test_a_file_system_error_no_check_caught_is_one_line(monkeypatch, tmp_path, cache):
    """The last line of defence: an OSError that no library check turned into a UserError is one line, exit 2."""
    import errno

    import fusion_seg.training.train

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "runs" / "r" / "x"))

    monkeypatch.setattr(fusion_seg.training.train, "train_decoder", read_only)
    result = CliRunner().invoke(main, train_line(tmp_path, cache))
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "cannot write" in result.output and "read-only" in result.output and "Traceback" not in result.output


TOO_BIG = [  # values the range checks pass, which would allocate (or build) without end
    (("--crop", "64000x64000"), "is larger than the store's views (64x64)"),
    (("--decoder-opt", "widths=[100000,100000,100000,100000]"), "G parameters: training it needs"),
    (("--modules", "100000,1,1"), "modules[0] must be in 1..64"),
    (("--blocks", "100000"), "blocks must be in 1..64"),
]


@pytest.mark.parametrize("given, message", TOO_BIG, ids=[t[0][0] for t in TOO_BIG])
def test_sizes_that_cannot_fit_are_refused_before_anything_is_allocated(given, message, tmp_path, cache):
    result = CliRunner().invoke(main, train_line(tmp_path, cache, *given))
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bad, message", [
    (dict(dataset="synthetic"), "extract's dataset must be a DatasetRef, not str"),
    (dict(encoder="resnet18"), "extract's encoder must be an EncoderSpec, not str"),
    (dict(augment={"crop": (64, 64)}), r"fusion_seg\.Augment\(\*\*that_dict\)"),
])
def test_extract_refuses_a_str_or_dict_where_a_request_goes(bad, message, tmp_path):
    import fusion_seg as fs

    arguments = {"dataset": fs.DatasetRef("synthetic", "train"), **bad}
    with pytest.raises(fs.UserError, match=message):
        fs.extract_features(tmp_path / "out" / "x.zarr", **arguments, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_failed_allocation_that_no_check_caught_is_one_line(monkeypatch, tmp_path, cache):
    """torch's CPU allocator raises a RuntimeError ("can't allocate memory"), not a MemoryError."""
    import fusion_seg.training.train

    def huge(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 360000000000 bytes.")

    monkeypatch.setattr(fusion_seg.training.train, "train_decoder", huge)
    result = CliRunner().invoke(main, train_line(tmp_path, cache))
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "ran out of memory" in result.output and "--batch-size" in result.output


@pytest.mark.parametrize("command, out, message", [
    ("extract", "feats.h5", "names a .h5 file"), ("predict", "preds.png", "names a .png file"),
    ("evaluate", "metrics.json", "names a .json file"), ("compare", "table.md", "names a .md file"),
])
def test_an_output_folder_named_as_a_file_is_refused(command, out, message, tmp_path, cache):
    target = str(tmp_path / out)
    line = {"extract": ["extract", *DATA, "--split", "train", *ENC, "--out", target],
            "predict": ["predict", "--checkpoint", str(tmp_path / "c.pt"), "--input", str(tmp_path), "--out", target],
            "evaluate": ["evaluate", "--checkpoint", str(tmp_path / "c.pt"), *DATA, "--split", "val", "--out", target],
            "compare": ["compare", "--cache", str(cache), "--decoders", "linear", "--out", target]}[command]
    if command == "predict":
        from PIL import Image
        Image.new("RGB", (32, 32)).save(tmp_path / "a.jpg")
    result = CliRunner().invoke(main, line)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / out).exists()


def test_load_model_refuses_what_is_not_a_path():
    import fusion_seg as fs

    with pytest.raises(fs.UserError, match="checkpoint=123: pass the checkpoint's path"):
        fs.load_model(123)


def test_a_synthetic_seed_out_of_range_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["extract", "--dataset", "synthetic", "--split", "train", "--dataset-opt",
                                       "seed=-1", *ENC, "--out", str(tmp_path / "out" / "x.zarr")])
    assert result.exit_code == 2 and "synthetic seed -1 must be an integer >= 0" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_an_unreadable_checkpoint_or_weights_file_is_one_line(tmp_path):
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    for line in (["evaluate", "--checkpoint", str(tmp_path / "bad.pt"), *DATA, "--split", "val", "--device", "cpu"],
                 ["extract", *DATA, "--split", "train", "--encoder", "resnet18", "--weights", str(tmp_path / "bad.pt"),
                  "--out", str(tmp_path / "x.zarr")]):
        result = CliRunner().invoke(main, line)
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert str(tmp_path / "bad.pt") in result.output and "Traceback" not in result.output


API_TYPES = [  # (call, message): a Python caller's value of the wrong type gets a UserError saying what to pass
    (lambda fs: fs.TrainConfig(epochs="10"), 'TrainConfig: epochs="10" should be an integer'),
    (lambda fs: fs.TrainConfig(class_weights=3), "class_weights=3 should be a string"),
    (lambda fs: fs.DatasetRef("synthetic", options=[1]), "DatasetRef: options=[1] should be a table"),
    (lambda fs: fs.DatasetRef(3), "DatasetRef: name=3 should be a string"),
    (lambda fs: fs.EncoderSpec(3), "EncoderSpec: tag=3 should be a string"),
    (lambda fs: fs.Augment(crop="64x64"), 'Augment: crop="64x64" should be a list of integers'),
    (lambda fs: fs.Resize(size=64), "Resize: size=64 should be a list of integers"),
    (lambda fs: fs.ExtractRun(batch_size="4"), 'ExtractRun: batch_size="4" should be an integer'),
    (lambda fs: fs.StoreFormat(dtype=16), "StoreFormat: dtype=16 should be a string"),
    (lambda fs: fs.train_decoder("s.zarr", None, fs.TrainConfig()), "out=None: pass the run folder"),
    (lambda fs: fs.extract_features(None, fs.DatasetRef("synthetic")), "out=None: pass the feature store's folder"),
]


@pytest.mark.parametrize("call, message", API_TYPES, ids=[m for _, m in API_TYPES])
def test_the_python_api_refuses_values_of_the_wrong_type(call, message):
    import fusion_seg as fs

    with pytest.raises(fs.UserError) as err:
        call(fs)
    assert message in str(err.value)


def test_optional_values_and_numpy_integers_are_accepted():
    import numpy as np

    import fusion_seg as fs

    crop = fs.Augment(crop=(np.int64(64), np.int64(96))).crop
    assert crop == (64, 96) and all(type(c) is int for c in crop)  # plain ints: they go into a store's JSON spec
    config = fs.TrainConfig(lr=np.float32(0.5), crop=[np.int64(32), np.int64(64)], seed=np.int64(3))
    assert type(config.lr) is float and type(config.seed) is int and all(type(c) is int for c in config.crop)
    assert fs.DatasetRef("folder", root=None).root is None and fs.TrainConfig(init=None, crop=None).init is None

"""Issue 6: feature stores anywhere fsspec reaches. S3 is a moto server on loopback,
configured the way a user configures a real one: credentials and endpoint in the environment."""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from fusion_seg.cache import locations as store_url
from fusion_seg.cache.store import FeatureStore
from fusion_seg.cli import main
from fusion_seg.errors import CacheError, UserError
from fusion_seg.pipeline.recipes import run_recipe
from fusion_seg.training.config import TrainConfig
from fusion_seg.training.train import train_decoder
from pipeline_helpers import extract_synthetic, tiny_config

s3fs = pytest.importorskip("s3fs")
ThreadedMotoServer = pytest.importorskip("moto.server").ThreadedMotoServer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ARRAYS = ("s4", "s8", "s16", "s32", "labels", "views")
BUCKET = "stores"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1, fake credentials and its endpoint in the environment, one bucket."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            env.delenv(key, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")  # nothing from this machine's ~/.aws
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
    server.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The local store every remote one must equal, extracted through a file:// URL."""
    url = f"file://{tmp_path_factory.mktemp('local')}/ref.zarr"
    extract(url)
    return url


@pytest.fixture(scope="module")
def remote(s3, tmp_path_factory):
    url = f"s3://{BUCKET}/train.zarr"
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        result = extract(url)
    assert (result.views_total, result.views_written) == (12, 12)
    assert not list(cwd.iterdir())  # the URL was never taken for a local path: no lock file, no "s3:" folder
    return url


def extract(out, **kw):
    """Batches of one view: a view's features then do not depend on which views share its batch, so a
    resumed or repaired store is bit-identical to one extracted in one go."""
    return extract_synthetic(out, batch_size=1, **kw)


def arrays(path) -> dict[str, np.ndarray]:
    group = FeatureStore.open(path).group
    return {name: group[name][:] for name in ARRAYS}


def assert_same_store(a, b) -> None:
    left, right = arrays(a), arrays(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


def copy_store(s3, url: str) -> str:
    """A server-side copy of a store, for a test that damages it."""
    dst = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}.zarr"
    s3.copy(url.removeprefix("s3://"), dst.removeprefix("s3://"), recursive=True)
    s3.invalidate_cache()
    return dst


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [d["loss"] for d in lines if d["type"] == "step"]


def test_extract_into_s3_equals_local_extraction(s3, remote, reference, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_same_store(remote, reference)
    assert s3.exists(f"{BUCKET}/train.zarr/zarr.json") and s3.exists(f"{BUCKET}/train.zarr/s16/c/3/0/0/0")
    store = FeatureStore.create_or_resume(remote, FeatureStore.open(remote).spec)
    assert store.completed().all() and not list(tmp_path.iterdir())
    assert store.chunk_path("s16", 3) == f"{remote}/s16/c/3/0/0/0"


def test_info_and_verify_of_an_s3_store(s3, remote):
    result = CliRunner().invoke(main, ["info", "--json", remote])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["path"] == remote and info["views_complete"] == 12
    assert info["bytes_on_disk"] == s3.du(f"{BUCKET}/train.zarr") > 0 and info["compression_ratio"] > 1
    result = CliRunner().invoke(main, ["info", remote])
    assert result.exit_code == 0 and f"{info['bytes_on_disk'] / 2**20:.1f} MiB" in result.output
    result = CliRunner().invoke(main, ["verify", remote])
    assert result.exit_code == 0 and "0 corrupt, 0 incomplete" in result.output


def test_corrupt_object_is_named_and_repaired(s3, remote, reference):
    url = copy_store(s3, remote)
    key = f"{url.removeprefix('s3://')}/s16/c/3/0/0/0"
    data = bytearray(s3.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    s3.pipe_file(key, bytes(data))
    result = CliRunner().invoke(main, ["verify", url])
    assert result.exit_code == 1
    assert f"BAD view 3: {url}/s16/c/3/0/0/0" in result.output and "1 corrupt" in result.output
    assert "--repair" in result.output
    with pytest.raises(CacheError, match=f"view 3 of {url}: chunk {url}/s16/c/3/0/0/0 is corrupt"):
        FeatureStore.open(url).read_view(3)
    assert extract(url, repair=True).views_written == 1
    assert_same_store(url, reference)


def test_corrupt_array_metadata_is_named_and_rewritten_by_repair(s3, remote, reference):
    url = copy_store(s3, remote)
    s3.pipe_file(f"{url.removeprefix('s3://')}/s16/zarr.json", b'{"shape": [')
    result = CliRunner().invoke(main, ["info", url])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{url}/s16/zarr.json" in result.output and "--repair" in result.output
    result = CliRunner().invoke(main, ["verify", url])
    assert result.exit_code == 1 and f"BAD array s16: {url}/s16/zarr.json" in result.output
    assert extract(url, repair=True).views_written == 0
    assert FeatureStore.open(url).verify()["ok"]
    assert_same_store(url, reference)


def test_interrupted_extraction_resumes_bit_identical(s3, reference):
    url = f"s3://{BUCKET}/interrupted.zarr"
    original_set = zarr.storage.FsspecStore.set
    puts = []

    async def set_then_fail(self, key, value, byte_range=None):
        puts.append(key)
        if len(puts) > 40:  # the connection drops partway through the extraction
            raise OSError(errno.ECONNRESET, "Connection reset by peer")
        return await original_set(self, key, value, byte_range)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zarr.storage.FsspecStore, "set", set_then_fail)
        with pytest.raises(UserError, match="re-run the same command"):
            extract(url)
    done = FeatureStore.open(url).completed()
    assert 0 < done.sum() < 12 and done[:2].all()
    # Objects lost besides: view 0's completion record (its row) and a chunk, and view 1 invalidated.
    prefix = url.removeprefix("s3://")
    s3.rm([f"{prefix}/views/c/0/0", f"{prefix}/s8/c/0/0/0/0"])
    FeatureStore.open(url, mode="r+").invalidate([1])
    assert extract(url).views_written == 12 - done.sum() + 2
    assert_same_store(url, reference)


def test_train_from_s3_with_and_without_loader_workers(s3, remote, reference, tmp_path):
    local = train_decoder(reference, tmp_path / "local", tiny_config(workers=0, epochs=1)).losses
    assert len(local) == 6 and local[0] != local[-1]
    # The remote store held in memory (auto picks the device tier here) trains the same.
    assert train_decoder(remote, tmp_path / "resident", tiny_config(workers=0, epochs=1, cache_mode="device")
                         ).losses == local
    # workers=0, as a recipe stage: extraction into the complete store is a no-op, training reads it.
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""
[[stage]]
kind = "extract"
dataset = "synthetic"
split = "train"
out = "{remote}"
views = 2
crop = [64, 64]
encoder = "resnet18"
random_init = true
strides = [4, 8, 16, 32]
loader_workers = 0
dataset_options = {{num_images = 6, size = [64, 96]}}

[[stage]]
kind = "train"
cache = "{remote}"
out = "{tmp_path / 'recipe-run'}"
streams = 4
preset = "small"
epochs = 1
batch_size = 2
workers = 0
log_every = 1
loss = "ce"
device = "cpu"
""")
    results = run_recipe(recipe, echo=lambda _: None, progress=False)
    assert results[0]["summary"]["written"] == 0
    assert losses(tmp_path / "recipe-run") == local
    # workers=2 from the command line, in a fresh process that forks DataLoader workers after opening
    # the store; the validation store is remote too. The checkpoints stay local.
    run = tmp_path / "cli-run"
    # The training store validates too (--allow-val-on-train): this checks the remote reads, not the scores.
    cmd = [sys.executable, "-m", "fusion_seg", "train-decoder", "--cache", remote, "--val-cache", remote,
           "--allow-val-on-train", "--workers", "2", "--streams", "4", "--preset", "small", "--epochs", "1",
           "--batch-size", "2", "--log-every", "1", "--loss", "ce", "--device", "cpu", "--cache-mode", "stream",
           "--out", str(run)]
    # One intra-op thread there too, as here (see conftest.py): the losses must match to the bit.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run) == local
    assert TrainConfig(**json.loads((run / "config.json").read_text())["train"]).workers == 2
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()
    assert all(key.startswith(f"{BUCKET}/") and ".zarr/" in key for key in s3.find(BUCKET))


def test_file_url_is_a_local_store(reference, tmp_path):
    folder = store_url.local_path(reference)
    assert (folder / "zarr.json").is_file() and not folder.with_name("ref.zarr.lock").exists()  # removed on release
    assert_same_store(reference, folder)
    info = FeatureStore.open(reference).info()
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert FeatureStore.open(reference).chunk_path("labels", 5) == f"{reference}/labels/c/5/0/0"
    result = CliRunner().invoke(main, ["verify", reference])
    assert result.exit_code == 0, result.output


def test_missing_bucket_and_missing_store_are_explained(s3, remote):
    result = CliRunner().invoke(main, ["info", "s3://no-such-bucket/x.zarr"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "bucket 'no-such-bucket' does not exist" in result.output and "AWS_ENDPOINT_URL" in result.output
    with pytest.raises(CacheError, match="bucket 'no-such-bucket' does not exist"):
        FeatureStore.create_or_resume("s3://no-such-bucket/x.zarr", FeatureStore.open(remote).spec)
    result = CliRunner().invoke(main, ["verify", f"s3://{BUCKET}/nothing-here.zarr"])
    assert result.exit_code == 2 and "is not a fusion-seg feature store (no zarr.json)" in result.output


def test_creation_race_is_lost_cleanly(s3, remote, monkeypatch):
    spec = FeatureStore.open(remote).spec
    url = f"s3://{BUCKET}/race.zarr"
    store_url.create_group(url, {"first": True})
    with pytest.raises(FileExistsError):  # a conditional PUT: exactly one creator wins
        store_url.create_group(url, {"second": True})
    assert zarr.open_group(store_url.zarr_store(url), mode="r").attrs.asdict() == {"first": True}
    # Another process created the store between our existence check and our create: its settings decide.
    real_exists, checks = store_url.exists, []

    def first_check_misses(path):
        checks.append(path)
        return len(checks) > 1 and real_exists(path)

    monkeypatch.setattr(store_url, "exists", first_check_misses)
    with pytest.raises(CacheError, match="different settings"):
        FeatureStore.create_or_resume(remote, dataclasses.replace(spec, views_per_image=3))
    checks.clear()
    assert FeatureStore.create_or_resume(remote, spec).completed().all()  # resumed, nothing overwritten
    assert len(checks) > 1  # the first check missed the store, a later one found it


def test_missing_s3fs_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed: import s3fs raises ImportError
    with pytest.raises(CacheError, match=r"s3fs package, which is not installed.*pip install fusion-seg\[s3\]"):
        FeatureStore.open("s3://bucket/x.zarr")
    result = CliRunner().invoke(main, ["info", "s3://bucket/x.zarr"])
    assert result.exit_code == 2 and "pip install fusion-seg[s3]" in result.output


# --------------------------------------------------------------------------- an endpoint that never answers
def test_default_remote_timeouts_bound_the_worst_case(monkeypatch):
    """Every request to an S3 store is bounded: s3fs's tries x botocore's attempts x (connect + read timeouts)
    stays within about a minute, for the filesystem fusion-seg lists with and for the zarr store it reads."""
    monkeypatch.delenv(store_url.TIMEOUT_ENV, raising=False)
    for fs in (store_url.filesystem("s3://bucket/x.zarr")[0], store_url.zarr_store("s3://bucket/x.zarr").fs):
        config = fs.config_kwargs
        attempts = fs.retries * config["retries"]["total_max_attempts"]
        assert 2 <= attempts and attempts * (config["connect_timeout"] + config["read_timeout"]) <= 75
        assert config["read_timeout"] >= 5  # the time a server may stay silent; an upload's own time is not counted
    monkeypatch.setenv(store_url.TIMEOUT_ENV, "0.5")
    config = store_url.filesystem("s3://bucket/x.zarr")[0].config_kwargs
    assert config["connect_timeout"] == config["read_timeout"] == 0.5
    monkeypatch.setenv(store_url.TIMEOUT_ENV, "soon")
    with pytest.raises(CacheError, match=store_url.TIMEOUT_ENV):
        store_url.filesystem("s3://bucket/x.zarr")


@pytest.fixture
def silent_endpoint():
    """An HTTP endpoint on loopback that accepts every connection and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()
    assert held, "nothing connected to the endpoint"


# info (verify opens the store the same way) and extract, which creates it
@pytest.mark.parametrize("command", [["info"], ["extract", "--dataset", "synthetic", "--split", "train",
                                                           "--dataset-opt", "num_images=1", "--encoder", "resnet18",
                                                           "--random-init", "--out"]])
def test_an_endpoint_that_never_answers_fails_clearly(silent_endpoint, command):
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE="/nonexistent/aws-config", AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials",
               AWS_ENDPOINT_URL_S3=silent_endpoint, **{store_url.TIMEOUT_ENV: "0.5"})
    cmd = [sys.executable, "-m", "fusion_seg", *command, f"s3://{BUCKET}/x.zarr"]
    try:  # a guard: a hang fails the test instead of hanging the suite
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(command)}` on an endpoint that never answers still ran after 120 s")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"s3://{BUCKET}/x.zarr" in proc.stderr and "timed out" in proc.stderr.lower()
    assert "AWS_ENDPOINT_URL" in proc.stderr  # the hint: check the endpoint

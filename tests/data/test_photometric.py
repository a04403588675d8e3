"""Issue 24: photometric augmentation (mmseg's PhotoMetricDistortion and an optional blur) at extraction and
online: each cached view a different photometric draw, the same draw for the same seed and view, nothing
changed when it is off, and recorded in the store's settings (a resume with other settings is refused)."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from fusion_seg.cli import main
from fusion_seg.data.datasets import build_dataset
from fusion_seg.data.transforms import photometric_distortion, photometric_rng
from fusion_seg.data.views import ViewSource
from fusion_seg.errors import CacheError, UserError
from fusion_seg.requests import Augment, Photometric, Resize, augment
from pipeline_helpers import extract_synthetic

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def views(photometric: Photometric | None, seed: int = 0, count: int = 4) -> list[dict]:
    ds = build_dataset("synthetic", split="train", num_images=2, size=(48, 64))
    source = ViewSource(ds, 2, Augment(crop=(32, 32), seed=seed, photometric=photometric), Resize(), MEAN, STD)
    return [source[v] for v in range(count)]


def test_each_view_is_its_own_draw_the_same_for_the_same_seed_and_view():
    first, again = views(Photometric()), views(Photometric())
    for a, b in zip(first, again):
        assert np.array_equal(a["image"].numpy(), b["image"].numpy())
    plain = views(None)
    changed = [not np.array_equal(p["image"].numpy(), v["image"].numpy()) for p, v in zip(plain, first)]
    assert sum(changed) >= 3  # each step has probability 1/2: with four views, nearly all are changed
    other_seed = views(Photometric(), seed=1)
    assert any(not np.array_equal(a["image"].numpy(), b["image"].numpy()) for a, b in zip(first, other_seed))


def test_turning_it_on_leaves_every_views_scale_crop_flip_and_labels_as_they_were():
    for plain, photometric in zip(views(None), views(Photometric(blur=1.0))):
        assert plain["meta"] == photometric["meta"]
        assert np.array_equal(plain["labels"].numpy(), photometric["labels"].numpy())


def test_each_step_does_what_it_says():
    image = np.random.default_rng(0).integers(40, 200, (16, 16, 3), dtype=np.uint8)
    none = dict(brightness=0.0, contrast=(1.0, 1.0), saturation=(1.0, 1.0), hue=0.0, blur=0.0)
    unchanged = photometric_distortion(image, photometric_rng(0, 0, 0), **none)
    # At most the rounding of the uint8 HSV round trip (PIL's, as mmseg's is OpenCV's): a few levels of 255.
    assert np.abs(unchanged.astype(int) - image).max() <= 4
    brighter = [photometric_distortion(image, photometric_rng(0, 0, k), **{**none, "brightness": 32.0})
                for k in range(8)]
    shifts = {int(np.round((b.astype(int) - image).mean())) for b in brighter}
    assert len(shifts) > 2 and all(-33 <= s <= 33 for s in shifts)  # a delta in [-32, 32], or none
    grey = np.full((8, 8, 3), 128, np.uint8)
    for k in range(8):  # saturation and hue leave a grey image grey
        out = photometric_distortion(grey, photometric_rng(0, 0, k), **{**none, "saturation": (0.5, 1.5), "hue": 36.0})
        assert np.abs(out.astype(int) - 128).max() <= 1
    edges = np.zeros((16, 16, 3), np.uint8)
    edges[:, 8:] = 255
    blurred = photometric_distortion(edges, photometric_rng(0, 0, 0), **{**none, "blur": 1.0})
    assert 0 < blurred[0, 7, 0] < 255  # blur probability 1: the edge is softened


def test_the_store_records_it_and_a_resume_with_other_settings_is_refused(tmp_path):
    from fusion_seg.cache.store import FeatureStore

    extract_synthetic(tmp_path / "p.zarr", views=2, num_images=2, photometric=True, hue=18.0)
    recorded = FeatureStore.open(tmp_path / "p.zarr").spec.augment["photometric"]
    assert recorded == {"brightness": 32.0, "contrast": [0.5, 1.5], "saturation": [0.5, 1.5], "hue": 18.0,
                        "blur": 0.0}
    extract_synthetic(tmp_path / "p.zarr", views=2, num_images=2, photometric=True, hue=18.0)  # the same: done
    with pytest.raises(CacheError, match="augment.photometric"):
        extract_synthetic(tmp_path / "p.zarr", views=2, num_images=2, photometric=True)
    extract_synthetic(tmp_path / "plain.zarr", views=2, num_images=2)
    assert "photometric" not in FeatureStore.open(tmp_path / "plain.zarr").spec.augment  # off: as before


def test_online_training_draws_it_too(tmp_path):
    from fusion_seg.requests import DatasetRef, EncoderSpec
    from fusion_seg.training.train import train_online
    from pipeline_helpers import ENCODER, tiny_config

    dataset = DatasetRef("synthetic", "train", options={"num_images": 2, "size": (64, 96)})
    result = train_online(tmp_path / "run", tiny_config(epochs=1), dataset=dataset,
                          encoder=EncoderSpec(ENCODER, random_init=True, strides=(4, 8, 16, 32)),
                          augment=Augment(crop=(64, 64), photometric=Photometric(blur=0.5)), progress=False)
    assert result.steps == 1
    import json

    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["augment"]["photometric"]["blur"] == 0.5


@pytest.mark.parametrize("argv,message", [
    (["--hue", "10"], "--hue sets the photometric augmentation, which is off: add --photometric"),
    (["--photometric", "--no-augment"], "--photometric with --no-augment"),
    (["--photometric", "--contrast", "1.5", "0.5"], "0 < LOW <= HIGH"),
    (["--photometric", "--blur", "2"], "2"),
    (["--photometric", "--brightness", "300"], "300"),
])
def test_bad_photometric_options_are_refused_before_any_work(tmp_path, argv, message):
    r = CliRunner().invoke(main, ["extract", "--dataset", "synthetic", "--split", "train", "--random-init",
                                  "--encoder", "resnet18", "--out", str(tmp_path / "s.zarr"), *argv])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(UserError, match="--brightness, --hue set the photometric augmentation"):
        augment(brightness=10.0, hue=5.0)

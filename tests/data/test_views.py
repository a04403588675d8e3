"""Views (fusion_seg/data/views.py): K views per image, each made from its index alone."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from fusion_seg.data.datasets import build_dataset
from fusion_seg.data.views import ViewSource, collate_list, stack_groups
from fusion_seg.requests import Augment, Resize
from fusion_seg.errors import Failed

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = (48, 80)


def source(views=3, augment=Augment(crop=(32, 32)), resize=Resize(), view_offset=0, num_images=4):
    ds = build_dataset("synthetic", split="train", num_images=num_images, size=SIZE)
    return ViewSource(ds, views, augment, resize, MEAN, STD, view_offset=view_offset)


def digest(item) -> str:
    """The view's pixels, labels and metadata, as one hash (to compare views made in other processes)."""
    h = hashlib.sha256(item["image"].numpy().tobytes())
    h.update(item["labels"].numpy().tobytes())
    h.update(json.dumps(item["meta"], sort_keys=True).encode())
    return h.hexdigest()


def _digests_in_a_fresh_process(indices):
    return [digest(source()[v]) for v in indices]


def test_k_views_of_each_image_in_index_order():
    src = source(views=3, num_images=4)
    assert len(src) == 12
    for v in range(len(src)):
        item = src[v]
        assert item["index"] == v
        assert (item["meta"]["image_index"], item["meta"]["view_index"]) == divmod(v, 3)
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert item["labels"].shape == (32, 32) and item["labels"].dtype == torch.uint8
        assert (item["meta"]["valid_h"], item["meta"]["valid_w"]) == (32, 32)
        assert item["meta"]["seed"] == 0
    assert len({digest(src[v]) for v in range(len(src))}) == 12  # every view is a different sample


def test_a_view_is_made_from_its_index_alone_whatever_the_order_or_process():
    order = list(range(12))
    forward = {v: digest(source()[v]) for v in order}
    src = source()
    backward = {v: digest(src[v]) for v in reversed(order)}
    assert forward == backward
    assert digest(src[7]) == digest(src[7])  # made twice in one source: the same
    spawn = multiprocessing.get_context("spawn")  # a new interpreter: no state shared with this one
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        elsewhere = pool.submit(_digests_in_a_fresh_process, [11, 3, 7]).result(timeout=300)
    assert elsewhere == [forward[11], forward[3], forward[7]]


def test_the_augmentation_seed_changes_every_view():
    a, b = source(), source(augment=Augment(crop=(32, 32), seed=1))
    assert all(digest(a[v]) != digest(b[v]) for v in range(len(a)))
    assert b[0]["meta"]["seed"] == 1


def test_view_offset_draws_other_augmentations():
    """Online training sets the offset to the epoch: view k of an epoch is drawn as view k + offset."""
    plain, shifted = source(views=3), source(views=3, view_offset=1)
    for v in range(len(plain)):
        assert not (torch.equal(shifted[v]["image"], plain[v]["image"])
                    and torch.equal(shifted[v]["labels"], plain[v]["labels"]))
        assert shifted[v]["meta"]["view_index"] == plain[v]["meta"]["view_index"]  # the item is still view k
    # Image 0's view 0 with offset 1 is drawn as its view 1 without.
    assert torch.equal(shifted[0]["image"], plain[1]["image"])
    assert torch.equal(shifted[0]["labels"], plain[1]["labels"])


def test_without_augmentation_the_whole_resized_image():
    src = source(views=1, augment=Augment(enabled=False), resize=Resize(size=(24, 40)))
    item = src[2]
    assert item["image"].shape == (3, 24, 40) and item["labels"].shape == (24, 40)
    meta = item["meta"]
    assert (meta["scale"], meta["flip"]) == (1.0, False)
    assert (meta["resized_h"], meta["resized_w"], meta["valid_h"], meta["valid_w"]) == (24, 40, 24, 40)
    assert digest(item) == digest(source(views=1, augment=Augment(enabled=False), resize=Resize(size=(24, 40)))[2])
    assert source(views=1, augment=Augment(enabled=False))[0]["image"].shape == (3, *SIZE)
    short = source(views=1, augment=Augment(enabled=False), resize=Resize(short_side=24))[0]
    assert short["image"].shape == (3, 24, 40)


def test_an_unreadable_image_is_returned_as_failed_not_raised(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("bg\nthing\n")
    for name in ("a", "b"):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / f"{name}.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / "a.png")
    (root / "images" / "b.png").write_bytes(b"not a png")
    ds = build_dataset("folder", root=str(root), split="all")
    src = ViewSource(ds, 2, Augment(crop=(16, 16)), Resize(), MEAN, STD)
    assert isinstance(src[0], dict)
    bad = src[3]
    assert isinstance(bad, Failed) and bad.index == 3
    assert bad.info == {"image_index": 1, "view_index": 1, "image_id": "b"} and "b.png" in str(bad.error)


def test_to_json_is_plain_json():
    aug = Augment(crop=(32, 48), scale_range=(0.75, 1.5), flip=False, seed=3)
    assert aug.to_json() == {"enabled": True, "crop": [32, 48], "scale_range": [0.75, 1.5], "flip": False,
                             "seed": 3}
    assert Augment().to_json() == {"enabled": True, "crop": [512, 512], "scale_range": [0.5, 2.0], "flip": True,
                                   "seed": 0}
    assert Augment(enabled=False).to_json()["enabled"] is False
    assert Augment(crop=None).to_json()["crop"] is None
    assert Resize().to_json() == {"short_side": None, "size": None}
    assert Resize(short_side=512).to_json() == {"short_side": 512, "size": None}
    assert Resize(size=(360, 480)).to_json() == {"short_side": None, "size": [360, 480]}
    for obj in (aug, Augment(enabled=False), Resize(size=(360, 480))):
        assert json.loads(json.dumps(obj.to_json())) == obj.to_json()


def test_collate_keeps_a_list_and_stack_groups_runs_of_equal_size():
    src = source(views=1, augment=Augment(enabled=False), resize=Resize())
    items = [src[0], src[1]]
    assert collate_list(items) is items
    small = source(views=1, augment=Augment(enabled=False), resize=Resize(size=(24, 40)))[0]
    groups = stack_groups([items[0], items[1], small, items[0]])
    assert [len(g) for g in groups] == [2, 1, 1]


@pytest.mark.parametrize("views", [1, 4])
def test_len_is_images_times_views(views):
    assert len(source(views=views, num_images=3)) == 3 * views

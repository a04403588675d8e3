"""CityscapesEvaluator (iIoU, category IoU) against hand-worked values and a loop port of
cityscapesscripts evaluation/evalPixelLevelSemanticLabeling.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_seg.evaluation.cityscapes import (AVG_CLASS_SIZE, CATEGORIES, INSTANCE_CLASSES,
                                           TRAIN_ID_CATEGORY, CityscapesEvaluator)
from fusion_seg.data.datasets.cityscapes import CLASSES, LABEL_TO_TRAIN, label_id_table

I = 255  # noqa: E741 - ignore
ROAD, PERSON, RIDER, CAR, TRUCK = 0, 11, 12, 13, 14
SP, SC = AVG_CLASS_SIZE["person"], AVG_CLASS_SIZE["car"]

# A 4 x 10 frame. Ground truth (train ids), instance ids and prediction:
#   row 0, cols 0-7: person instance A (id 24000, 8 px), predicted P P P P P R road road
#   row 0, cols 8-9: person instance B (id 24001, 2 px), predicted P car
#   row 1, cols 0-3: person crowd (instance map holds labelId 24), predicted P P road road
#   row 1, cols 4-8: car instance (id 26000, 5 px), predicted car car car truck P
#   row 1, col 9:    ignore (labelId 0), predicted P               -> counts nowhere
#   row 2:           road (labelId 7), predicted P P P car road x6
#   row 3:           ignore (labelId 0), predicted P x5, car x5    -> counts nowhere
GT = np.array([[PERSON] * 10,
               [PERSON] * 4 + [CAR] * 5 + [I],
               [ROAD] * 10,
               [I] * 10])
INST = np.array([[24000] * 8 + [24001] * 2,
                 [24] * 4 + [26000] * 5 + [0],
                 [7] * 10,
                 [0] * 10], dtype=np.int32)
PRED = np.array([[PERSON] * 5 + [RIDER, ROAD, ROAD, PERSON, CAR],
                 [PERSON, PERSON, ROAD, ROAD, CAR, CAR, CAR, TRUCK, PERSON, PERSON],
                 [PERSON] * 3 + [CAR] + [ROAD] * 6,
                 [PERSON] * 5 + [CAR] * 5])

# --- class level, instance part (weight = avgClassSize / instance size) ---
# person A: size 8, tp 5 (P), fn 3 (R, road, road), weight SP/8
# person B: size 2, tp 1, fn 1 (car),               weight SP/2
PERSON_TP_W = 5 * SP / 8 + 1 * SP / 2          # = 1.125 SP
PERSON_FN_W = 3 * SP / 8 + 1 * SP / 2          # = 0.875 SP
# FP person: predicted P where GT is another evaluated class: car col 8 (1) + road (3) = 4.
# Not FP: the crowd pixels predicted P (GT is person) and the 6 ignored pixels predicted P.
PERSON_FP = 4
PERSON_IIOU = PERSON_TP_W / (PERSON_TP_W + PERSON_FP + PERSON_FN_W)   # 1.125 SP / (2 SP + 4)
# car instance: size 5, tp 3, fn 2 (truck, P), weight SC/5
CAR_TP_W, CAR_FN_W = 3 * SC / 5, 2 * SC / 5    # 0.6 SC, 0.4 SC
CAR_FP = 2                                     # person B predicted car (1) + road predicted car (1)
CAR_IIOU = CAR_TP_W / (CAR_TP_W + CAR_FP + CAR_FN_W)                  # 0.6 SC / (SC + 2)
# rider and truck have no instance but one FP each -> iIoU 0 / (0 + 1 + 0) = 0, and they count.
# bus, train, motorcycle, bicycle: nothing -> undefined, left out of the mean.
IIOU_CLASS = (PERSON_IIOU + 0.0 + CAR_IIOU + 0.0) / 4

# --- plain class IoU (confusion matrix, crowd pixels included) ---
# road:   GT 10, tp 6, fn 4, fp 4 (A 2 + crowd 2)                    -> 6 / 14 = 3/7
# person: GT 14 (8 + 2 + 4), tp 5 + 1 + 2 = 8, fn 6, fp 4            -> 8 / 18 = 4/9
# rider:  fp 1 -> 0; car: GT 5, tp 3, fn 2, fp 2 -> 3/7; truck: fp 1 -> 0
IOU = {"road": 3 / 7, "person": 4 / 9, "rider": 0.0, "car": 3 / 7, "truck": 0.0}
IOU_CLASS = sum(IOU.values()) / 5

# --- category IoU ---
# flat = road: 3/7.
# human:   GT 14; tp = predicted person|rider on human GT: A 6 + B 1 + crowd 2 = 9; fn 5;
#          fp = predicted human on other evaluated GT: car col 8 (1) + road (3) = 4  -> 9/18
# vehicle: GT 5; tp = car 3 + truck 1 = 4; fn 1; fp = B car (1) + road car (1) = 2  -> 4/7
CAT_IOU = {"flat": 3 / 7, "human": 1 / 2, "vehicle": 4 / 7}
IOU_CATEGORY = (3 / 7 + 1 / 2 + 4 / 7) / 3     # = 0.5

# --- category iIoU (hit = predicted as any class of the category; class weights) ---
# human: A cat-tp 6 (5 P + 1 R), cat-fn 2; B cat-tp 1, cat-fn 1
HUMAN_TP_W = 6 * SP / 8 + 1 * SP / 2           # 1.25 SP
HUMAN_FN_W = 2 * SP / 8 + 1 * SP / 2           # 0.75 SP
HUMAN_IIOU = HUMAN_TP_W / (HUMAN_TP_W + 4 + HUMAN_FN_W)               # 1.25 SP / (2 SP + 4)
# vehicle: car instance cat-tp 4 (3 car + 1 truck), cat-fn 1, weight SC/5
VEHICLE_TP_W, VEHICLE_FN_W = 4 * SC / 5, 1 * SC / 5
VEHICLE_IIOU = VEHICLE_TP_W / (VEHICLE_TP_W + 2 + VEHICLE_FN_W)        # 0.8 SC / (SC + 2)
IIOU_CATEGORY = (HUMAN_IIOU + VEHICLE_IIOU) / 2


def _evaluate(pred=PRED, gt=GT, inst=INST, **kwargs):
    ev = CityscapesEvaluator(**kwargs)
    ev.process(pred, gt, inst)
    return ev.evaluate()


def test_hand_worked_class_iiou():
    r = _evaluate()
    person = r["instance_stats"]["classes"]["person"]
    assert person["tp"] == 6 and person["fn"] == 4
    assert person["tp_weighted"] == pytest.approx(PERSON_TP_W, rel=1e-12)
    assert person["fn_weighted"] == pytest.approx(PERSON_FN_W, rel=1e-12)
    assert person["fp"] == PERSON_FP
    car = r["instance_stats"]["classes"]["car"]
    assert (car["tp"], car["fn"], car["fp"]) == (3, 2, CAR_FP)
    assert car["tp_weighted"] == pytest.approx(CAR_TP_W, rel=1e-12)
    assert car["fn_weighted"] == pytest.approx(CAR_FN_W, rel=1e-12)
    assert r["per_class_iiou"]["person"] == pytest.approx(PERSON_IIOU, rel=1e-12)
    assert r["per_class_iiou"]["car"] == pytest.approx(CAR_IIOU, rel=1e-12)
    assert r["per_class_iiou"]["rider"] == 0.0 and r["per_class_iiou"]["truck"] == 0.0
    for name in ("bus", "train", "motorcycle", "bicycle"):
        assert r["per_class_iiou"][name] is None
    assert set(r["per_class_iiou"]) == set(INSTANCE_CLASSES)
    assert r["iiou_class"] == pytest.approx(IIOU_CLASS, rel=1e-12)
    # Sanity on the numbers themselves: 1.125*3462.48/(2*3462.48+4) ~ 0.5622
    assert PERSON_IIOU == pytest.approx(0.56217, abs=1e-5)


def test_hand_worked_class_iou_and_categories():
    r = _evaluate()
    for name, value in IOU.items():
        assert r["per_class_iou"][name] == pytest.approx(value, rel=1e-12)
    assert r["iou_class"] == pytest.approx(IOU_CLASS, rel=1e-12) and r["iou_class"] == r["miou"]
    for name in CATEGORIES:
        expected = CAT_IOU.get(name)
        assert r["per_category_iou"][name] == (None if expected is None else pytest.approx(expected, rel=1e-12))
    assert r["iou_category"] == pytest.approx(IOU_CATEGORY, rel=1e-12)
    human = r["instance_stats"]["categories"]["human"]
    assert (human["tp"], human["fn"], human["fp"]) == (7, 3, 4)
    assert human["tp_weighted"] == pytest.approx(HUMAN_TP_W, rel=1e-12)
    assert human["fn_weighted"] == pytest.approx(HUMAN_FN_W, rel=1e-12)
    assert r["per_category_iiou"]["human"] == pytest.approx(HUMAN_IIOU, rel=1e-12)
    assert r["per_category_iiou"]["vehicle"] == pytest.approx(VEHICLE_IIOU, rel=1e-12)
    assert set(r["per_category_iiou"]) == {"human", "vehicle"}
    assert r["iiou_category"] == pytest.approx(IIOU_CATEGORY, rel=1e-12)
    assert (r["num_images"], r["num_images_with_instances"]) == (1, 1)


def test_category_mapping_follows_labels_py():
    assert len(TRAIN_ID_CATEGORY) == len(CLASSES) == 19
    by_category = {}
    for name, category in zip(CLASSES, TRAIN_ID_CATEGORY):
        by_category.setdefault(category, []).append(name)
    assert by_category == {
        "flat": ["road", "sidewalk"], "construction": ["building", "wall", "fence"],
        "object": ["pole", "traffic light", "traffic sign"], "nature": ["vegetation", "terrain"],
        "sky": ["sky"], "human": ["person", "rider"],
        "vehicle": ["car", "truck", "bus", "train", "motorcycle", "bicycle"]}
    assert tuple(CATEGORIES) == tuple(by_category)


def test_crowd_and_ignore_pixels_do_not_touch_iiou():
    pred = PRED.copy()
    pred[1, 0:4] = CAR        # person crowd predicted as car: now an FP of car, nothing for person
    pred[3, :] = PERSON       # ignored pixels: nothing at all
    pred[1, 9] = TRUCK
    r = _evaluate(pred=pred)
    person = r["instance_stats"]["classes"]["person"]
    assert person["tp_weighted"] == pytest.approx(PERSON_TP_W, rel=1e-12)
    assert person["fn_weighted"] == pytest.approx(PERSON_FN_W, rel=1e-12)
    assert person["fp"] == PERSON_FP
    assert r["per_class_iiou"]["person"] == pytest.approx(PERSON_IIOU, rel=1e-12)
    assert r["instance_stats"]["classes"]["car"]["fp"] == CAR_FP + 4
    assert r["instance_stats"]["classes"]["truck"]["fp"] == 1
    # plain person IoU does see the crowd: tp 6, fn 8, fp 4 -> 6 / 18
    assert r["per_class_iou"]["person"] == pytest.approx(6 / 18)


def test_equal_instances_of_average_size_give_plain_iou():
    # With every instance exactly avgClassSize pixels (here overridden to 4 and 6) and no crowd,
    # the weight is 1 for every pixel and iIoU == IoU.
    sizes = {name: 100.0 for name in INSTANCE_CLASSES} | {"person": 4.0, "car": 6.0}
    gt = np.full((4, 8), ROAD)
    inst = np.full((4, 8), 7, dtype=np.int32)
    for k, (r0, c0) in enumerate([(0, 0), (0, 2), (2, 0)]):   # three 2x2 persons
        gt[r0:r0 + 2, c0:c0 + 2] = PERSON
        inst[r0:r0 + 2, c0:c0 + 2] = 24000 + k
    gt[2:4, 4:7] = CAR                                        # one 2x3 car
    inst[2:4, 4:7] = 26000
    gt[0, 7] = I
    inst[0, 7] = 0
    pred = gt.copy()
    pred[0, 7] = CAR
    pred[0, 0] = ROAD       # person fn
    pred[2, 1] = CAR        # person fn, car fp
    pred[1, 5] = PERSON     # person fp
    pred[3, 6] = TRUCK      # car fn
    pred[3, 7] = CAR        # car fp
    r = _evaluate(pred=pred, gt=gt, inst=inst, avg_class_size=sizes)
    for name in ("person", "car", "truck"):
        assert r["per_class_iiou"][name] == pytest.approx(r["per_class_iou"][name], rel=1e-12)
    assert r["per_class_iou"]["person"] == pytest.approx(10 / 13)    # tp 10, fn 2, fp 1
    assert r["per_class_iou"]["car"] == pytest.approx(5 / 8)         # tp 5, fn 1, fp 2


def test_batches_merge_and_frames_without_instances():
    one = CityscapesEvaluator()
    one.process(PRED, GT, INST)
    one.process(torch.as_tensor(PRED), torch.as_tensor(GT), torch.as_tensor(INST))
    batched = CityscapesEvaluator()
    batched.process(np.stack([PRED, PRED]), np.stack([GT, GT]), np.stack([INST, INST]))
    a, b = CityscapesEvaluator(), CityscapesEvaluator()
    a.process(PRED, GT, INST)
    b.process(PRED, GT, INST.astype(np.uint16))
    a.merge(b)
    expected = one.evaluate()
    for ev in (batched, a):
        r = ev.evaluate()
        for key in ("iiou_class", "iiou_category", "iou_category", "miou"):
            assert r[key] == pytest.approx(expected[key], rel=1e-12)
    # Doubling every count leaves all scores unchanged.
    assert expected["iiou_class"] == pytest.approx(IIOU_CLASS, rel=1e-12)
    # A frame without an instance map counts for IoU but not for iIoU (FP included).
    ev = CityscapesEvaluator()
    ev.process(PRED, GT, INST)
    ev.process(PRED, GT, None)
    r = ev.evaluate()
    assert r["iiou_class"] == pytest.approx(IIOU_CLASS, rel=1e-12)
    assert r["instance_stats"]["classes"]["person"]["fp"] == PERSON_FP
    assert r["confusion"] == (2 * torch.tensor(_evaluate()["confusion"])).tolist()
    assert (r["num_images"], r["num_images_with_instances"]) == (2, 1)


def test_rejects_instances_of_stuff_classes():
    inst = INST.copy()
    inst[2, :] = 7000  # "road instance": the reference dies on avgClassSize["road"]
    with pytest.raises(ValueError, match="not an instance class"):
        _evaluate(inst=inst)
    inst[2, :] = 34000  # labelId 34 does not exist
    ev = CityscapesEvaluator()
    ev.process(PRED, GT, INST)
    with pytest.raises(ValueError, match="labelId 34"):
        ev.process(np.stack([PRED, PRED]), np.stack([GT, GT]), np.stack([INST, inst]))
    r = ev.evaluate()  # the failed batch left nothing behind
    assert r["confusion"] == _evaluate()["confusion"] and r["num_images"] == 1
    assert r["iiou_class"] == pytest.approx(IIOU_CLASS, rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        _evaluate(inst=INST[:3])


def test_empty_evaluator():
    r = CityscapesEvaluator().evaluate()
    assert r["iiou_class"] is None and r["iou_category"] is None and r["iiou_category"] is None


# ---------------------------------------------------------------------------------------
# A direct loop port of the reference (labelId space) on random frames.
# (labelId, category, hasInstances, ignoreInEval) from cityscapesscripts helpers/labels.py;
# license plate (id -1) is skipped by the reference everywhere it matters.
_CAT = ["void"] * 7 + ["flat"] * 4 + ["construction"] * 6 + ["object"] * 4 + ["nature"] * 2 \
    + ["sky"] + ["human"] * 2 + ["vehicle"] * 8
_NAME = {label_id: CLASSES[t] for label_id, t in LABEL_TO_TRAIN.items()} | {29: "caravan", 30: "trailer"}
_HAS_INST = {i: 24 <= i <= 33 for i in range(34)}
_IGNORED = {i: i not in LABEL_TO_TRAIN for i in range(34)}


def _reference(frames):
    conf = np.zeros((34, 34), dtype=np.int64)
    cls = {_NAME[i]: [0.0, 0.0] for i in range(34) if _HAS_INST[i] and not _IGNORED[i]}
    cat_ids = {c: [i for i in range(34) if _CAT[i] == c] for c in ("human", "vehicle")}
    cat = {c: [0.0, 0.0] for c in cat_ids}
    for pred, gt, inst in frames:
        np.add.at(conf, (gt.ravel(), pred.ravel()), 1)
        cat_masks = {c: np.isin(pred, ids) for c, ids in cat_ids.items()}
        for inst_id in np.unique(inst[inst > 1000]):
            label_id = int(inst_id // 1000)
            if _IGNORED[label_id]:
                continue
            mask = inst == inst_id
            size = np.count_nonzero(mask)
            tp = np.count_nonzero(pred[mask] == label_id)
            w = AVG_CLASS_SIZE[_NAME[label_id]] / float(size)
            cls[_NAME[label_id]][0] += tp * w
            cls[_NAME[label_id]][1] += (size - tp) * w
            c = _CAT[label_id]
            if c in cat:
                ctp = np.count_nonzero(mask & cat_masks[c])
                cat[c][0] += ctp * w
                cat[c][1] += (size - ctp) * w

    def score(tp, fp, fn):
        return tp / (tp + fp + fn) if tp + fp + fn > 0 else None

    class_iou, class_iiou = {}, {}
    for i in range(34):
        if _IGNORED[i]:
            continue
        not_ignored = [j for j in range(34) if not _IGNORED[j] and j != i]
        fp = conf[not_ignored, i].sum()
        class_iou[_NAME[i]] = score(conf[i, i], fp, conf[i].sum() - conf[i, i])
        if _NAME[i] in cls:
            class_iiou[_NAME[i]] = score(cls[_NAME[i]][0], fp, cls[_NAME[i]][1])
    cat_iou, cat_iiou = {}, {}
    for c in CATEGORIES:
        ids = [i for i in range(34) if _CAT[i] == c and not _IGNORED[i]]
        tp = conf[np.ix_(ids, ids)].sum()
        others = [j for j in range(34) if not _IGNORED[j] and _CAT[j] != c]
        fp = conf[np.ix_(others, ids)].sum()
        cat_iou[c] = score(tp, fp, conf[ids].sum() - tp)
        if c in cat:
            fp = conf[np.ix_(others, cat_ids[c])].sum()
            cat_iiou[c] = score(cat[c][0], fp, cat[c][1])
    return class_iou, class_iiou, cat_iou, cat_iiou


def _random_frame(rng, h=48, w=64):
    gt = np.zeros((h, w), dtype=np.int64)
    inst = np.zeros((h, w), dtype=np.int32)
    count = {}
    for _ in range(40):   # random rectangles with random labels, later ones on top
        r0, c0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        r1, c1 = r0 + rng.integers(1, 20), c0 + rng.integers(1, 24)
        label_id = int(rng.integers(0, 34))
        gt[r0:r1, c0:c1] = label_id
        if _HAS_INST[label_id] and rng.random() < 0.8:
            k = count.get(label_id, 0)
            count[label_id] = k + 1
            inst[r0:r1, c0:c1] = label_id * 1000 + k
        else:
            inst[r0:r1, c0:c1] = label_id
    train_gt = label_id_table()[gt]
    pred = np.where(train_gt == 255, rng.integers(0, 19, (h, w)), train_gt)
    flip = rng.random((h, w)) < 0.3
    pred[flip] = rng.integers(0, 19, int(flip.sum()))
    train_to_label = np.array(sorted(LABEL_TO_TRAIN, key=LABEL_TO_TRAIN.get))
    return train_to_label[pred], gt, inst, pred, train_gt


def test_matches_a_loop_port_of_the_reference():
    rng = np.random.default_rng(0)
    frames, ev = [], CityscapesEvaluator()
    for _ in range(4):
        pred_l, gt_l, inst, pred_t, gt_t = _random_frame(rng)
        frames.append((pred_l, gt_l, inst))
        ev.process(pred_t, gt_t, inst)
    class_iou, class_iiou, cat_iou, cat_iiou = _reference(frames)
    r = ev.evaluate()

    def same(ours, ref):
        assert set(ours) == set(ref)
        for k in ref:
            assert (ours[k] is None) == (ref[k] is None), k
            if ref[k] is not None:
                assert ours[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-15), k

    same(r["per_class_iou"], class_iou)
    same(r["per_class_iiou"], class_iiou)
    same(r["per_category_iou"], cat_iou)
    same(r["per_category_iiou"], cat_iiou)
    assert any(v not in (None, 0.0) for v in class_iiou.values())

"""AVA frame-level AP: hand-computed cases, and the vectorised evaluator against a plain loop reference."""

from __future__ import annotations

import csv
import heapq
import math
import random

import numpy as np
import pytest

from engine.eval.ava_map import dense_to_rows, format_ap_table, frame_average_precision, write_detections_csv

FULL = (0.0, 0.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Reference: written from the definition (see engine/eval/ava_map.py's module doc), one row and one box at a time.
# ----------------------------------------------------------------------------------------------------------------

def reference_iou(a, b) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes, in the official operation order."""
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter = h * w
    area_a = (a[3] - a[1]) * (a[2] - a[0])
    area_b = (b[3] - b[1]) * (b[2] - b[0])
    return inter / (area_a + area_b - inter)


def reference_ap(gt_keys, gt_boxes, gt_labels, det_keys, det_boxes, det_labels, det_scores, class_ids,
                 excluded_keys=(), iou_threshold=0.5, match_order="score", max_detections_per_key=None):
    """Per-class AP and mAP the way the ActivityNet / SlowFast scripts get there, with loops."""
    whitelist, excluded = set(class_ids), set(excluded_keys)
    gt: dict = {}
    for key, box, label in zip(gt_keys, gt_boxes, gt_labels):
        if label in whitelist:
            gt.setdefault(key, []).append((label, [float(v) for v in box]))
    dets: dict = {}  # key -> row indices; dict order = each key's first whitelisted row
    for i, (key, label) in enumerate(zip(det_keys, det_labels)):
        if label in whitelist:
            dets.setdefault(key, []).append(i)
    if max_detections_per_key is not None:  # read_csv's bounded heap with strict replacement
        for key, idxs in dets.items():
            heap = []
            for i in idxs:
                x1, y1, x2, y2 = (float(v) for v in det_boxes[i])
                item = (float(det_scores[i]), int(det_labels[i]), y1, x1, y2, x2, i)
                if len(heap) < max_detections_per_key:
                    heapq.heappush(heap, item)
                elif item[0] > heap[0][0]:
                    heapq.heapreplace(heap, item)
            dets[key] = sorted(item[-1] for item in heap)
    num_gt = {c: 0 for c in whitelist}
    for key, items in gt.items():
        if key not in excluded:
            for label, _ in items:
                num_gt[label] += 1
    scores = {c: [] for c in whitelist}
    tps = {c: [] for c in whitelist}
    for key, idxs in dets.items():
        if key in excluded:
            continue
        idxs = [i for i in idxs if det_boxes[i][0] < det_boxes[i][2] and det_boxes[i][1] < det_boxes[i][3]]
        if match_order == "score":
            idxs = sorted(idxs, key=lambda i: -float(det_scores[i]))  # stable: equal scores in row order
        for c in whitelist:
            truth = [box for label, box in gt.get(key, []) if label == c]
            taken = [False] * len(truth)
            for i in idxs:
                if det_labels[i] != c:
                    continue
                is_tp = False
                if truth:
                    ious = [reference_iou([float(v) for v in det_boxes[i]], t) for t in truth]
                    best = 0
                    for j in range(1, len(ious)):
                        if ious[j] > ious[best]:
                            best = j
                    if ious[best] >= iou_threshold and not taken[best]:
                        is_tp = taken[best] = True
                scores[c].append(float(det_scores[i]))
                tps[c].append(is_tp)
    ap = {}
    for c in whitelist:
        if num_gt[c] == 0:
            ap[c] = math.nan
            continue
        s, t = scores[c], tps[c]
        ranked = sorted(range(len(s)), key=lambda j: s[j])[::-1]  # stable ascending, then reversed
        precision, recall, hits = [], [], 0
        for n, j in enumerate(ranked, start=1):
            hits += t[j]
            precision.append(hits / n)
            recall.append(hits / num_gt[c])
        total, best_right, prev_recall = 0.0, 0.0, 0.0
        # envelope: the best precision at this recall or beyond; area over each recall step
        envelope = [0.0] * len(precision)
        for n in range(len(precision) - 1, -1, -1):
            best_right = max(best_right, precision[n])
            envelope[n] = best_right
        for n in range(len(precision)):
            if recall[n] != prev_recall:
                total += (recall[n] - prev_recall) * envelope[n]
                prev_recall = recall[n]
        ap[c] = total
    with_gt = [a for a in ap.values() if not math.isnan(a)]
    return ap, (sum(with_gt) / len(with_gt) if with_gt else math.nan)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def evaluate(gt, det, class_ids, **kw):
    """``gt``: [(key, box, label)], ``det``: [(key, box, label, score)] -> frame_average_precision."""
    gk, gb, gl = (list(col) for col in zip(*gt)) if gt else ([], [], [])
    dk, db, dl, ds = (list(col) for col in zip(*det)) if det else ([], [], [], [])
    return frame_average_precision(gk, gb, gl, dk, db, dl, ds, class_ids, **kw)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=0.0, abs_tol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# hand-built cases
# ----------------------------------------------------------------------------------------------------------------

def test_perfect_detections_give_ap_one():
    gt = [("v,0902", (0.1, 0.1, 0.5, 0.9), 1), ("v,0902", (0.5, 0.1, 0.9, 0.9), 1),
          ("v,0902", (0.5, 0.1, 0.9, 0.9), 2), ("w,0903", (0.2, 0.2, 0.4, 0.4), 2)]
    det = [(k, b, c, 0.9) for k, b, c in gt]
    r = evaluate(gt, det, [1, 2])
    assert r["ap"] == {1: 1.0, 2: 1.0} and r["mAP"] == 1.0
    assert r["num_gt"] == {1: 2, 2: 2} and r["num_tp"] == {1: 2, 2: 2} and r["num_det"] == {1: 2, 2: 2}


def test_known_precision_recall_curve():
    # 4 GT in 4 keyframes; ranked detections: TP, FP, TP, FP, TP (the 4th GT is never found).
    #   precision 1, 1/2, 2/3, 2/4, 3/5    recall 1/4, 1/4, 2/4, 2/4, 3/4
    #   envelope  1, 2/3, 2/3, 3/5, 3/5    recall steps at ranks 1, 3, 5 (each +1/4)
    #   AP = 1/4 * 1 + 1/4 * 2/3 + 1/4 * 3/5 = 0.25 + 0.1667 + 0.15 = 0.5667
    gt = [(f"v,{t:04d}", FULL, 7) for t in range(4)]
    det = [("v,0000", FULL, 7, 0.9), ("v,0010", FULL, 7, 0.8), ("v,0001", FULL, 7, 0.7),
           ("v,0011", FULL, 7, 0.6), ("v,0002", FULL, 7, 0.5)]
    r = evaluate(gt, det, [7])
    assert r["ap"][7] == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.25 * 3 / 5, abs=1e-15)
    assert r["num_tp"][7] == 3 and r["num_det"][7] == 5


def test_duplicate_detection_of_one_gt_is_a_false_positive():
    # ranks: a (TP), a duplicate (FP), b (TP): precision 1, 1/2, 2/3, recall 1/2, 1/2, 1 -> AP = 1/2 + 1/2 * 2/3
    gt = [("a,0001", FULL, 1), ("b,0001", FULL, 1)]
    det = [("a,0001", FULL, 1, 0.9), ("a,0001", (0.0, 0.0, 1.0, 0.95), 1, 0.8), ("b,0001", FULL, 1, 0.7)]
    r = evaluate(gt, det, [1])
    assert r["num_tp"][1] == 2
    assert r["ap"][1] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-15)


def test_detection_whose_best_gt_is_taken_is_fp_even_if_another_gt_overlaps():
    # boxes span the full height; in x: A = [0, .4], B = [.12, .52], d1 = A, d2 = [.05, .45]
    # IoU(d2, A) = .35 / .45 = .78 (its best), IoU(d2, B) = .33 / .47 = .70 >= .5, but A is taken by d1
    a, b = (0.0, 0.0, 0.4, 1.0), (0.12, 0.0, 0.52, 1.0)
    d2 = (0.05, 0.0, 0.45, 1.0)
    assert 0.5 <= (0.45 - 0.12) / (0.52 - 0.05) < (0.4 - 0.05) / 0.45
    r = evaluate([("k", a, 3), ("k", b, 3)], [("k", a, 3, 0.9), ("k", d2, 3, 0.8)], [3])
    assert r["num_tp"][3] == 1  # B stays unmatched
    assert r["ap"][3] == pytest.approx(0.5, abs=1e-15)  # precision 1 at recall 1/2, then nothing


def test_equal_iou_goes_to_the_first_gt_row():
    # on a 1/8 grid, full height: g1 = [0, 6/8], g2 = [2/8, 1], d = [1/8, 7/8] has IoU 5/7 with both (exactly);
    # np.argmax takes the first, so d claims whichever GT row comes first; e = g2 then finds g2 free or taken
    g1, g2 = (0.0, 0.0, 0.75, 1.0), (0.25, 0.0, 1.0, 1.0)
    d = (0.125, 0.0, 0.875, 1.0)
    assert reference_iou(d, g1) == reference_iou(d, g2) == 5 / 7
    det = [("k", d, 1, 0.9), ("k", g2, 1, 0.8)]
    assert evaluate([("k", g1, 1), ("k", g2, 1)], det, [1])["num_tp"][1] == 2
    assert evaluate([("k", g2, 1), ("k", g1, 1)], det, [1])["num_tp"][1] == 1


def test_equal_scores_in_one_keyframe_match_in_row_order():
    # two rows of one keyframe and class share a score: the earlier row claims the GT (TP), the later is an FP
    # and, being later, is ranked first: precision 0 then 1/2 at recall 1 -> AP 1/2
    gt = [("k", FULL, 1)]
    det = [("k", (0.0, 0.0, 1.0, 0.6), 1, 0.5), ("k", FULL, 1, 0.5)]
    for order in ("score", "input"):
        r = evaluate(gt, det, [1], match_order=order)
        assert r["num_tp"][1] == 1 and r["ap"][1] == 0.5


def test_class_without_gt_is_nan_and_left_out_of_the_mean():
    gt = [("k", FULL, 1)]
    det = [("k", FULL, 1, 0.9), ("k", FULL, 2, 0.8)]
    r = evaluate(gt, det, [1, 2, 5])
    assert r["ap"][1] == 1.0 and math.isnan(r["ap"][2]) and math.isnan(r["ap"][5])
    assert r["mAP"] == 1.0 and r["num_classes_with_gt"] == 1
    assert math.isnan(evaluate([], det, [1, 2])["mAP"])


def test_class_with_gt_but_no_detection_scores_zero():
    r = evaluate([("k", FULL, 1), ("k", FULL, 2)], [("k", FULL, 1, 0.9)], [1, 2])
    assert r["ap"] == {1: 1.0, 2: 0.0} and r["mAP"] == 0.5


def test_excluded_timestamps_remove_both_sides():
    gt = [("v,0902", FULL, 1), ("v,0903", FULL, 1)]  # 0903: a GT nobody detects
    det = [("v,0902", FULL, 1, 0.5), ("v,0904", FULL, 1, 0.9)]  # 0904: a confident FP
    assert evaluate(gt, det, [1])["ap"][1] == pytest.approx(0.25)  # FP first, then a TP at recall 1/2
    r = evaluate(gt, det, [1], excluded_keys={"v,0903", "v,0904"})
    assert r["ap"][1] == 1.0 and r["num_gt"][1] == 1 and r["num_det"][1] == 1


def test_labels_outside_the_label_map_are_ignored():
    gt = [("k", FULL, 1), ("k", FULL, 99), ("j", FULL, 99)]
    det = [("k", FULL, 1, 0.5), ("k", FULL, 99, 0.9), ("j", (0.0, 0.0, 0.5, 0.5), 99, 0.9)]
    r = evaluate(gt, det, [1])
    assert set(r["ap"]) == {1} and r["ap"][1] == 1.0
    assert r["num_gt_rows"] == 1 and r["num_det_rows"] == 1


def test_iou_exactly_at_threshold_matches():
    gt = [("k", (0.0, 0.0, 0.5, 1.0), 1)]  # area 1/2 inside a unit detection: IoU = 0.5 exactly
    assert reference_iou(FULL, gt[0][1]) == 0.5
    assert evaluate(gt, [("k", FULL, 1, 0.9)], [1])["num_tp"][1] == 1
    assert evaluate(gt, [("k", (0.0, 0.0, 1.0, 1.0 + 1e-9), 1, 0.9)], [1])["num_tp"][1] == 0
    assert evaluate(gt, [("k", FULL, 1, 0.9)], [1], iou_threshold=0.75)["num_tp"][1] == 0


def test_invalid_detection_boxes_are_dropped():
    det = [("k", (0.5, 0.0, 0.5, 1.0), 1, 0.99), ("k", (0.6, 0.0, 0.4, 1.0), 1, 0.98), ("k", FULL, 1, 0.5)]
    r = evaluate([("k", FULL, 1)], det, [1])
    assert r["num_det"][1] == 1 and r["ap"][1] == 1.0


def test_match_order_score_against_input():
    # one GT; the first row scores low but overlaps well, the second scores high and overlaps enough
    gt = [("k", FULL, 1)]
    det = [("k", (0.0, 0.0, 1.0, 0.9), 1, 0.3), ("k", (0.0, 0.0, 1.0, 0.6), 1, 0.8)]
    assert evaluate(gt, det, [1])["ap"][1] == 1.0  # descending score: the 0.8 row takes the GT
    assert evaluate(gt, det, [1], match_order="input")["ap"][1] == 0.5  # row order: 0.3 takes it, 0.8 is FP
    with pytest.raises(ValueError):
        evaluate(gt, det, [1], match_order="nms")


def test_equal_scores_rank_the_later_row_first():
    # TP in key a and FP in key b share a score: whichever comes later in keyframe order is ranked first
    gt = [("a", FULL, 1)]
    tp, fp = ("a", FULL, 1, 0.5), ("b", FULL, 1, 0.5)
    assert evaluate(gt, [tp, fp], [1])["ap"][1] == 0.5  # FP ranked first: precision 1/2 at recall 1
    assert evaluate(gt, [fp, tp], [1])["ap"][1] == 1.0
    # keyframe order is that of each key's first whitelisted row, not of the row itself
    ignored = ("b", FULL, 42, 0.1)
    early_b = ("b", FULL, 2, 0.1)
    assert evaluate(gt, [ignored, tp, fp], [1, 2])["ap"][1] == 0.5
    assert evaluate(gt, [early_b, tp, fp], [1, 2])["ap"][1] == 1.0


def test_cap_per_key_follows_the_bounded_heap():
    # capacity 2, rows: (0.5, class 1), (0.5, class 2), (0.9, class 1). The heap's minimum among the two 0.5
    # rows is the one with the smaller action id, so the 0.9 row evicts the class-1 row, not the earlier one.
    box = (0.1, 0.1, 0.4, 0.4)
    det = [("k", box, 1, 0.5), ("k", box, 2, 0.5), ("k", FULL, 1, 0.9), ("j", box, 1, 0.1)]
    gt = [("k", box, 1), ("k", box, 2)]
    r = evaluate(gt, det, [1, 2], max_detections_per_key=2)
    assert r["num_det"] == {1: 2, 2: 1} and r["num_tp"] == {1: 0, 2: 1}
    assert evaluate(gt, det, [1, 2])["num_tp"] == {1: 1, 2: 1}
    # a full heap rejects a row whose score only equals its minimum
    det = [("k", box, 2, 0.5), ("k", box, 1, 0.5)]
    assert evaluate(gt, det, [1, 2], max_detections_per_key=1)["num_det"] == {1: 0, 2: 1}
    # the cap counts whitelisted rows only
    det = [("k", box, 99, 0.99), ("k", box, 1, 0.5)]
    assert evaluate(gt, det, [1, 2], max_detections_per_key=1)["num_det"] == {1: 1, 2: 0}


def test_key_types_give_the_same_result():
    rng = np.random.default_rng(3)
    case = random_case(rng)
    gk, gb, gl, dk, db, dl, ds, classes, excluded = case
    ref = frame_average_precision(*case[:8], excluded_keys=excluded)
    as_tuple = {k: tuple(k.split(",")) for k in set(gk) | set(dk) | set(excluded)}
    as_int = {k: i for i, k in enumerate(sorted(as_tuple))}
    for table, as_array in ((as_tuple, False), (as_int, True)):
        det_keys = [table[k] for k in dk]
        r = frame_average_precision([table[k] for k in gk], gb, gl, np.array(det_keys) if as_array else det_keys,
                                    db, dl, ds, classes, excluded_keys=[table[k] for k in excluded])
        assert all(same(r["ap"][c], ref["ap"][c]) for c in classes) and same(r["mAP"], ref["mAP"])


def test_dense_rows_are_box_major():
    boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    keys, rows, labels, scores = dense_to_rows(["a", "b"], boxes, np.array([[0.1, 0.2], [0.3, 0.4]]), [4, 9])
    assert list(keys) == ["a", "a", "b", "b"] and labels.tolist() == [4, 9, 4, 9]
    assert scores.tolist() == [0.1, 0.2, 0.3, 0.4] and rows[2].tolist() == [0.5, 0.5, 1.0, 1.0]


def test_write_detections_csv_official_format(tmp_path):
    path = tmp_path / "det.csv"
    n = write_detections_csv(path, ["vid,0902", ("other", 903.0)], [[0.1, 0.2, 0.30049, 0.4], FULL], [12, 3],
                             [0.123456, 1.0])
    assert n == 2
    assert path.read_text().splitlines() == ["vid,0902,0.100,0.200,0.300,0.400,12,0.1235",
                                             "other,0903,0.000,0.000,1.000,1.000,3,1.0000"]
    rows = list(csv.reader(path.open()))
    assert all(len(row) == 8 for row in rows)


def test_format_ap_table():
    r = evaluate([("k", FULL, 1)], [("k", FULL, 1, 0.9)], [1, 2])
    text = format_ap_table(r, {1: "bend/bow (at the waist)", 2: "crawl"})
    assert "bend/bow (at the waist)" in text and "100.00" in text and "n/a" in text
    assert text.splitlines()[-1].startswith("mAP@0.5 over 1 classes") and "100.00" in text.splitlines()[-1]


def test_input_validation():
    with pytest.raises(ValueError):
        evaluate([("k", FULL, 1)], [("k", FULL, 1, float("nan"))], [1])
    with pytest.raises(ValueError):
        evaluate([("k", FULL, 1)], [("k", FULL, 1, 0.5)], [0, 1])
    with pytest.raises(ValueError):
        evaluate([("k", FULL, 1)], [("k", FULL, 1, 0.5)], [1], max_detections_per_key=0)


# ----------------------------------------------------------------------------------------------------------------
# randomized: the vectorised evaluator against the reference
# ----------------------------------------------------------------------------------------------------------------

def random_box(rng: np.random.Generator, grid: int) -> list[float]:
    """On a 1/grid lattice (exact IoUs of 0.5, equal IoUs, degenerate boxes), or continuous for grid 0."""
    if grid:
        x = np.sort(rng.integers(0, grid + 1, 2)) / grid
        y = np.sort(rng.integers(0, grid + 1, 2)) / grid
    else:
        x, y = np.sort(rng.random(2)), np.sort(rng.random(2))
    return [float(x[0]), float(y[0]), float(x[1]), float(y[1])]


def random_case(rng: np.random.Generator):
    """Keyframes with a few persons, several labels each, jittered and duplicated boxes, tied scores."""
    grid = int(rng.choice([0, 4, 8]))
    n_keys = int(rng.integers(1, 12))
    keys = [f"v{int(rng.integers(0, 3))},{900 + t:04d}" for t in range(n_keys)]
    classes = sorted(int(c) for c in rng.choice(np.arange(1, 7), int(rng.integers(1, 5)), replace=False))
    labels_all = list(range(1, 8))  # 7 and any id missing from `classes` are outside the label map
    gt, det = [], []
    for key in keys:
        persons = [random_box(rng, grid) for _ in range(int(rng.integers(0, 5)))]
        persons += [list(p) for p in persons if rng.random() < 0.15]  # the same box annotated twice
        for p in persons:
            for label in rng.choice(labels_all, int(rng.integers(1, 4)), replace=False):
                gt.append((key, p, int(label)))
        proposals = [list(p) for p in persons if rng.random() < 0.8]
        proposals += [random_box(rng, grid) for _ in range(int(rng.integers(0, 4)))]
        proposals += [list(p) for p in proposals if rng.random() < 0.3]  # duplicates
        for box in proposals:
            if not grid and rng.random() < 0.5:
                box = [min(max(v + float(rng.normal(0, 0.05)), 0.0), 1.0) for v in box]
            for label in rng.choice(labels_all, int(rng.integers(1, 6)), replace=False):
                score = float(rng.integers(0, 5)) / 4 if rng.random() < 0.5 else float(rng.random())
                det.append((key, box, int(label), score))
    if rng.random() < 0.5:  # shuffle rows: keys no longer come in runs
        det = [det[i] for i in rng.permutation(len(det))]
    excluded = [k for k in sorted(set(keys)) if rng.random() < 0.2] + ["never,0000"]
    gk, gb, gl = (list(col) for col in zip(*gt)) if gt else ([], [], [])
    dk, db, dl, ds = (list(col) for col in zip(*det)) if det else ([], [], [], [])
    return gk, gb, gl, dk, db, dl, ds, classes, excluded


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_agree_with_reference(seed):
    rng = np.random.default_rng(seed)
    py = random.Random(seed)
    for _ in range(60):
        case = random_case(rng)
        gk, gb, gl, dk, db, dl, ds, classes, excluded = case
        order = py.choice(["score", "input"])
        cap = py.choice([None, None, 1, 2, 4])
        thr = py.choice([0.5, 0.5, 0.3])
        got = frame_average_precision(gk, gb, gl, dk, db, dl, ds, classes, excluded_keys=excluded,
                                      iou_threshold=thr, match_order=order, max_detections_per_key=cap)
        ap, mean = reference_ap(gk, gb, gl, dk, db, dl, ds, classes, excluded_keys=excluded, iou_threshold=thr,
                                match_order=order, max_detections_per_key=cap)
        assert set(got["ap"]) == set(classes)
        for c in classes:
            assert same(got["ap"][c], ap[c]), (c, got["ap"][c], ap[c], order, cap)
        assert same(got["mAP"], mean)

"""AVA v2.2 action detection: frame-level AP at IoU 0.5 per class, as the official evaluator computes it.

The number published for AVA is the one of the ActivityNet AVA script (``Evaluation/get_ava_performance.py``),
which drives the TF Object Detection API's ``PascalDetectionEvaluator`` (AVA copies under ``Evaluation/ava/``:
``object_detection_evaluation.py``, ``per_image_evaluation.py``, ``metrics.py``, ``np_box_ops.py``). SlowFast
ships its own copy (``ava_evaluation/``) driven by ``slowfast/utils/ava_eval_helper.py``. Reading that code,
these are the details that change the number, and what this module does about each:

* **Rows, keys, whitelist.** ``read_csv`` (both scripts) groups rows by the key ``"%s,%04d" % (video,
  int(timestamp))`` (``make_image_key``) and drops every row, ground truth or detection, whose ``action_id`` is
  not an id of the label map (``read_labelmap`` → ``class_whitelist``; 60 of the 80 AVA ids). Here: rows
  whose label is not in ``class_ids`` are ignored on both sides.
* **Excluded timestamps.** ``run_evaluation`` (both scripts) skips every key of the exclusions file
  (``read_exclusions``) when adding ground truth *and* when adding detections. Here: ``excluded_keys``.
* **Per-keyframe cap.** ActivityNet's ``read_csv(csv_file, class_whitelist, capacity)`` keeps, per key, at most
  ``capacity`` rows in a min-heap of ``(score, action_id, y1, x1, y2, x2)``: once full, a row replaces the
  heap's minimum only if its score is *strictly* greater. ``run_evaluation`` reads the ground truth with
  ``capacity=0`` (no limit) and the detections with ``capacity=50``: at most 50 (box, class) rows per
  keyframe, over all classes. SlowFast's ``read_csv`` has no capacity, and its in-memory path
  (``get_ava_eval_data``) passes every (box, class) score: no cap. With 60 classes × a few boxes per keyframe
  the cap drops most low-score rows and changes the AP. Here: ``max_detections_per_key`` (``None``: SlowFast;
  ``50``: the ActivityNet script), applied after the whitelist, as there, exactly including ties at the cut.
* **Order within a keyframe.** The AVA copies of ``per_image_evaluation.py`` (ActivityNet's and SlowFast's)
  run no NMS: ``_get_overlaps_and_scores_box_mode`` takes the detections as given. (The generic TF OD API
  version ran ``non_max_suppression(max_output_size=10000, iou_threshold=1.0)``, which at 1.0 only sorts by
  score, ``np.argsort`` then ``[::-1]``.) ActivityNet's ``read_csv`` instead sorts each key's rows by
  descending score (``sorted(..., key=lambda tup: -tup[0])``, "Evaluation API assumes boxes with descending
  scores"); equal scores keep their order in the heap's list, an artefact of ``heapq``. SlowFast sorts
  nothing: matching follows row order (box-major, classes ascending from ``get_ava_eval_data``). Here:
  ``match_order="score"`` (descending score, equal scores in row order) or ``"input"`` (row order).
* **Invalid detections.** ``PerImageEvaluation._remove_invalid_boxes`` drops detections unless ``ymin < ymax``
  and ``xmin < xmax`` (strict); ground-truth boxes are not checked. Here: the same.
* **IoU.** ``np_box_ops.iou``: normalized coordinates, no +1; ``intersection = max(0, min(ymax) - max(ymin)) *
  max(0, min(xmax) - max(xmin))``, ``area = (ymax - ymin) * (xmax - xmin)``, ``union = area_det + area_gt -
  intersection``, ``iou = intersection / union``, in float64 (``np.array(..., dtype=float)``). Here: the same
  operations in the same order, so every IoU is bit-identical (products commute, so x-first storage changes
  nothing).
* **Greedy matching.** ``_compute_tp_fp_for_single_class``, per (keyframe, class): ``np.argmax(iou, axis=1)``
  once for all detections against all ground truth of that class (first GT on equal IoU), then in detection
  order: a TP if ``iou[i, gt] >= matching_iou_threshold`` (``>=``: 0.5 exactly matches) and that GT is not yet
  detected, which marks it; otherwise an FP, even if another GT overlaps >= 0.5. So a detection is a TP iff
  it is the first, in matching order, that claims its best GT with IoU >= the threshold: no sequential state,
  which is what lets this module vectorise. No difficult / group-of boxes in AVA (all flags False).
  Detections on a keyframe without ground truth of their class (or without any) are FPs.
* **Across keyframes.** ``ObjectDetectionEvaluation.evaluate`` concatenates each class's per-keyframe arrays in
  the order keyframes were added (dict order: a key's first whitelisted row), then
  ``metrics.compute_precision_recall``: ``np.argsort(scores)`` (default kind, not stable) then ``[::-1]``,
  cumulative TP and FP, ``precision = cumTP / (cumTP + cumFP)``, ``recall = cumTP / num_gt``. The order of
  equal scores is implementation-defined (introsort, or a SIMD sort on some CPUs) and it changes AP when a TP
  and an FP share a score. Our deterministic rule: a *stable* ascending argsort of that concatenation, then
  reversed, i.e. equal scores rank the later row (in concatenation order) first, which is what numpy's
  argsort-then-reverse returns whenever its sort happens to be stable on the input.
* **AP.** ``metrics.compute_average_precision`` (VOC all points): NaN without ground truth; 0.0 with ground
  truth but no detections; else recall ``[0, r..., 1]``, precision ``[0, p..., 0]``, precision made
  non-increasing from the right (running max backwards), and ``sum((r[i] - r[i-1]) * p[i])`` over the indices
  where recall changes. Here: the same arrays and the same ``np.sum``, so per-class AP is bit-identical given
  the same ranking.
* **mAP.** ``evaluate`` leaves NaN for classes with no ground-truth instance and takes ``np.nanmean`` over ids
  ``1..max(label id)``: classes without ground truth are excluded from the mean. Here: the same.
* **Submission files.** SlowFast's ``write_results`` writes ``"%s,%.03f,%.03f,%.03f,%.03f,%d,%.04f"`` (key =
  ``video,%04d``, then x1, y1, x2, y2, action id, score); ``write_detections_csv`` does the same. Rounding
  scores to 4 decimals creates ties, so evaluate a written file from its rounded values for parity.

Speed: the AVA val set gives ~3M detection rows (~50k boxes × 60 classes) against ~60k ground-truth rows; the
work is a few passes over the rows and two stable sorts (by score, then by class), seconds on one core
(``run_scripts/bench_ava_map.py``).
"""

from __future__ import annotations

import heapq
import math
import warnings
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

MATCH_ORDERS = ("score", "input")
ACTIVITYNET_DETECTIONS_PER_KEY = 50  # ``capacity`` of the detections in get_ava_performance.run_evaluation


def frame_average_precision(gt_keys: Sequence[Hashable], gt_boxes: Any, gt_labels: Any,
                            det_keys: Sequence[Hashable], det_boxes: Any, det_labels: Any, det_scores: Any,
                            class_ids: Iterable[int], excluded_keys: Iterable[Hashable] = (),
                            iou_threshold: float = 0.5, *, match_order: str = "score",
                            max_detections_per_key: Optional[int] = None) -> dict[str, Any]:
    """Frame-level AP per class and their mean, the AVA (PASCAL VOC, IoU 0.5) definition; see the module doc.

    One row per (box, class): ``*_keys`` are per-row hashables naming the keyframe (e.g. ``"vid,0902"``; an
    integer array is fastest), ``*_boxes`` (N, 4) ``x1, y1, x2, y2`` normalized, ``*_labels`` integer action
    ids, ``det_scores`` floats (no NaN). ``class_ids``: the label map's ids (>= 1); rows with other labels are
    ignored on both sides, as are rows whose key is in ``excluded_keys``. ``match_order``: ``"score"``
    (ActivityNet script) or ``"input"`` (SlowFast). ``max_detections_per_key``: ``None`` (SlowFast) or the
    ActivityNet script's 50 (``ACTIVITYNET_DETECTIONS_PER_KEY``).

    Returns ``ap`` {class id: AP, NaN without ground truth}, ``mAP`` (mean over classes with ground truth,
    NaN if none), and counts per class (``num_gt``, ``num_det`` evaluated, ``num_tp``) and in total
    (``num_gt_rows``, ``num_det_rows``, ``num_classes_with_gt``).
    """
    if match_order not in MATCH_ORDERS:
        raise ValueError(f"match_order must be one of {MATCH_ORDERS}, not {match_order!r}")
    if max_detections_per_key is not None and int(max_detections_per_key) < 1:
        raise ValueError("max_detections_per_key must be >= 1 or None")
    classes = np.unique(np.asarray(list(class_ids), dtype=np.int64))
    if classes.size == 0 or classes[0] < 1:
        raise ValueError("class_ids must be a non-empty set of ids >= 1 (AVA ids are 1-indexed)")
    n_cls = int(classes.size)

    gt_boxes = _boxes(gt_boxes, "gt_boxes")
    det_boxes = _boxes(det_boxes, "det_boxes")
    gt_labels = _labels(gt_labels, "gt_labels")
    det_labels = _labels(det_labels, "det_labels")
    scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    n_gt, n_det = len(gt_boxes), len(det_boxes)
    if len(gt_labels) != n_gt or len(gt_keys) != n_gt:
        raise ValueError("gt_keys, gt_boxes and gt_labels must have one entry per row")
    if len(det_labels) != n_det or len(scores) != n_det or len(det_keys) != n_det:
        raise ValueError("det_keys, det_boxes, det_labels and det_scores must have one entry per row")
    if np.isnan(scores).any():
        raise ValueError("det_scores contains NaN")

    gt_code, det_code, excluded = _encode_keys(gt_keys, det_keys, excluded_keys)
    gt_cls, gt_known = _class_index(gt_labels, classes)
    det_cls, det_known = _class_index(det_labels, classes)

    # ground truth, grouped by (key, class) in row order: argmax over a group takes its first maximum
    gt_rows = np.flatnonzero(gt_known & ~excluded[gt_code])
    gt_group = gt_code[gt_rows] * n_cls + gt_cls[gt_rows]
    by_group = np.argsort(gt_group, kind="stable")
    gt_rows, gt_group = gt_rows[by_group], gt_group[by_group]
    num_gt = np.bincount(gt_cls[gt_rows], minlength=n_cls)
    groups, group_start, group_size = np.unique(gt_group, return_index=True, return_counts=True)

    # detections: whitelist and exclusions; the keyframe order is that of each key's first whitelisted row
    rows = np.flatnonzero(det_known & ~excluded[det_code])
    first_row = np.full(int(excluded.size), n_det, dtype=np.int64)
    np.minimum.at(first_row, det_code[rows], rows)
    if max_detections_per_key is not None:
        rows = _cap_per_key(rows, det_code, scores, det_labels, det_boxes, int(max_detections_per_key))
    valid = (det_boxes[:, 0] < det_boxes[:, 2]) & (det_boxes[:, 1] < det_boxes[:, 3])
    rows = rows[valid[rows]]  # _remove_invalid_boxes: strict

    code, cls, score = det_code[rows], det_cls[rows], scores[rows]
    tp = _match(rows, code * n_cls + cls, score, det_boxes, gt_boxes[gt_rows], groups, group_start, group_size,
                iou_threshold, match_order)

    # ranking per class: score descending; equal scores: later in (keyframe order, row order) first
    keyframe = first_row[code]
    if keyframe.size and np.any(keyframe[1:] < keyframe[:-1]):
        by_tie = np.lexsort((rows, keyframe))[::-1]
    else:  # keys in contiguous runs: row order is already (keyframe order, row order)
        by_tie = np.arange(rows.size)[::-1]
    ranked = by_tie[np.argsort(-score[by_tie], kind="stable")]
    ranked = ranked[np.argsort(cls[ranked].astype(np.uint8 if n_cls <= 256 else np.int64), kind="stable")]
    bounds = np.searchsorted(cls[ranked], np.arange(n_cls + 1))

    ap = np.full(n_cls, np.nan)
    for c in range(n_cls):
        if num_gt[c]:
            ap[c] = _voc_average_precision(tp[ranked[bounds[c]:bounds[c + 1]]], num_gt[c])
    by_id = np.full(int(classes[-1]), np.nan)
    by_id[classes - 1] = ap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN: no class has ground truth
        mean_ap = float(np.nanmean(by_id)) if np.isfinite(by_id).any() else math.nan

    ids = classes.tolist()
    num_det = np.bincount(cls, minlength=n_cls)
    num_tp = np.bincount(cls[tp], minlength=n_cls)
    return {
        "ap": {i: float(a) for i, a in zip(ids, ap)},
        "mAP": mean_ap,
        "num_gt": {i: int(v) for i, v in zip(ids, num_gt)},
        "num_det": {i: int(v) for i, v in zip(ids, num_det)},
        "num_tp": {i: int(v) for i, v in zip(ids, num_tp)},
        "num_gt_rows": int(gt_rows.size),
        "num_det_rows": int(rows.size),
        "num_classes_with_gt": int(np.count_nonzero(num_gt)),
    }


def _boxes(boxes: Any, name: str) -> np.ndarray:
    """(N, 4) float64, the precision the official code converts to."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), not {arr.shape}")
    return arr


def _labels(labels: Any, name: str) -> np.ndarray:
    """Integer ids; integral floats (e.g. from a CSV parsed as float) are accepted, fractions are not."""
    arr = np.asarray(labels).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        as_int = arr.astype(np.int64)
        if not np.array_equal(as_int, arr):
            raise ValueError(f"{name} must be integer action ids")
        return as_int
    return arr.astype(np.int64)


def _key_array(keys: Sequence[Hashable]) -> np.ndarray:
    """A 1-D array of the keys; tuples stay whole (object dtype) instead of becoming a 2-D array."""
    if isinstance(keys, np.ndarray):
        if keys.ndim != 1:
            raise ValueError("keys must be one hashable per row (a 1-D array)")
        return keys
    return np.fromiter(keys, dtype=object, count=len(keys))


def _encode_keys(gt_keys: Sequence[Hashable], det_keys: Sequence[Hashable],
                 excluded_keys: Iterable[Hashable]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer codes shared by both sides, and which codes are excluded.

    Rows of one keyframe usually come in runs (60 class rows per box), so only the first row of each run is
    hashed: a dictionary over ~50k run heads instead of ~3M rows.
    """
    table: dict[Any, int] = {}

    def encode(keys: Sequence[Hashable]) -> np.ndarray:
        arr = _key_array(keys)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        heads = np.flatnonzero(np.concatenate(([True], np.asarray(arr[1:] != arr[:-1], dtype=bool))))
        head_codes = np.fromiter((table.setdefault(k, len(table)) for k in arr[heads].tolist()),
                                 dtype=np.int64, count=heads.size)
        return np.repeat(head_codes, np.diff(np.append(heads, arr.size)))

    gt_code, det_code = encode(gt_keys), encode(det_keys)
    excluded = np.zeros(len(table), dtype=bool)
    for key in excluded_keys:
        hit = table.get(key.item() if isinstance(key, np.generic) else key)
        if hit is not None:
            excluded[hit] = True
    return gt_code, det_code, excluded


def _class_index(labels: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each label in the sorted class ids, and whether the label is one of them."""
    pos = np.minimum(np.searchsorted(classes, labels), classes.size - 1)
    return pos, classes[pos] == labels


def _cap_per_key(rows: np.ndarray, code: np.ndarray, scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray,
                 capacity: int) -> np.ndarray:
    """The rows (ascending) that ActivityNet's bounded heap keeps per key.

    Where the ``capacity``-th and the next score of a key differ, the heap keeps exactly the top ``capacity``
    scores (a row it drops or evicts has ``capacity`` rows at least as high beside it). Only a key whose cut
    falls inside a run of equal scores depends on the arrival order and the tuple comparison of the heap;
    those few keys are replayed row by row.
    """
    if rows.size == 0:
        return rows
    by_score = rows[np.argsort(-scores[rows], kind="stable")]
    order = by_score[np.argsort(code[by_score], kind="stable")]  # key, then score descending, then row
    key = code[order]
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    sizes = np.diff(np.append(starts, order.size))
    rank = np.arange(order.size) - np.repeat(starts, sizes)
    keep = rank < capacity
    s = scores[order]
    tied = np.flatnonzero((sizes > capacity))
    tied = tied[s[starts[tied] + capacity - 1] == s[starts[tied] + capacity]]
    for g in tied.tolist():
        lo, hi = int(starts[g]), int(starts[g] + sizes[g])
        kept = _heap_replay(np.sort(order[lo:hi]), scores, labels, boxes, capacity)
        keep[lo:hi] = np.isin(order[lo:hi], kept)
    return np.sort(order[keep])


def _heap_replay(rows: np.ndarray, scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray,
                 capacity: int) -> np.ndarray:
    """One key's rows through a min-heap of (score, label, y1, x1, y2, x2) with strict replacement.

    The row index is a last tuple element: it only orders rows whose content is identical, which are
    interchangeable in every result.
    """
    heap: list[tuple] = []
    for i in rows.tolist():
        x1, y1, x2, y2 = boxes[i].tolist()
        item = (float(scores[i]), int(labels[i]), y1, x1, y2, x2, i)
        if len(heap) < capacity:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    return np.array([item[-1] for item in heap], dtype=np.int64)


def _match(rows: np.ndarray, det_group: np.ndarray, score: np.ndarray, det_boxes: np.ndarray,
           gt_boxes: np.ndarray, groups: np.ndarray, group_start: np.ndarray, group_size: np.ndarray,
           iou_threshold: float, match_order: str) -> np.ndarray:
    """TP flag per detection row: the first detection (in matching order) whose best GT it reaches.

    Only detections whose (key, class) has ground truth can be TPs; for them every (detection, GT of the
    group) pair is laid out flat, the IoU computed as the official ``np_box_ops.iou`` does, and the first
    maximum per detection taken with segment reductions.
    """
    tp = np.zeros(rows.size, dtype=bool)
    if rows.size == 0 or groups.size == 0:
        return tp
    pos = np.minimum(np.searchsorted(groups, det_group), groups.size - 1)
    cand = np.flatnonzero(groups[pos] == det_group)
    if cand.size == 0:
        return tp
    size = group_size[pos[cand]]
    seg = np.cumsum(size) - size  # start of each candidate's pairs
    n_pairs = int(size.sum())
    pair_gt = np.repeat(group_start[pos[cand]] - seg, size) + np.arange(n_pairs)
    d = det_boxes[np.repeat(rows[cand], size)]
    g = gt_boxes[pair_gt]
    heights = np.maximum(0.0, np.minimum(d[:, 3], g[:, 3]) - np.maximum(d[:, 1], g[:, 1]))
    widths = np.maximum(0.0, np.minimum(d[:, 2], g[:, 2]) - np.maximum(d[:, 0], g[:, 0]))
    inter = heights * widths
    area_d = (d[:, 3] - d[:, 1]) * (d[:, 2] - d[:, 0])
    area_g = (g[:, 3] - g[:, 1]) * (g[:, 2] - g[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):  # only degenerate ground truth can get here
        iou = inter / (area_d + area_g - inter)
    key = np.where(np.isnan(iou), np.inf, iou)  # np.argmax takes a NaN as the maximum
    best = np.maximum.reduceat(key, seg)
    first = np.minimum.reduceat(np.where(key == np.repeat(best, size), np.arange(n_pairs), n_pairs), seg)
    best_gt = pair_gt[first]
    hit = iou[first] >= iou_threshold
    if match_order == "score":  # groups never share a GT, so one global order keeps each group's order
        order = np.lexsort((cand, -score[cand]))
    else:
        order = np.arange(cand.size)
    claims = order[hit[order]]
    _, first_claim = np.unique(best_gt[claims], return_index=True)
    tp[cand[claims[first_claim]]] = True
    return tp


def _voc_average_precision(tp_ranked: np.ndarray, num_gt: int) -> float:
    """VOC all-point AP of one class from its TP flags in rank order (``metrics.compute_average_precision``)."""
    n = tp_ranked.size
    if n == 0:
        return 0.0
    cum_tp = np.cumsum(tp_ranked, dtype=np.int64)
    precision = cum_tp.astype(float) / np.arange(1, n + 1)  # cumTP + cumFP is the rank
    recall = cum_tp.astype(float) / num_gt
    recall = np.concatenate(([0.0], recall, [1.0]))
    precision = np.concatenate(([0.0], precision, [0.0]))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def dense_to_rows(keys: Sequence[Hashable], boxes: Any, scores: Any, class_ids: Sequence[int],
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One row per (box, class) from per-box score vectors, box-major as SlowFast's ``get_ava_eval_data``.

    ``scores`` is (B, len(class_ids)), column j the score of ``class_ids[j]``. Returns keys, boxes, labels
    and scores for ``frame_average_precision`` / ``write_detections_csv``.
    """
    key_arr = _key_array(keys)
    boxes = _boxes(boxes, "boxes")
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(class_ids, dtype=np.int64)
    if scores.shape != (len(boxes), ids.size) or len(key_arr) != len(boxes):
        raise ValueError(f"scores must be (boxes, classes) = ({len(boxes)}, {ids.size}), one key per box")
    n = ids.size
    return (np.repeat(key_arr, n), np.repeat(boxes, n, axis=0), np.tile(ids, len(boxes)), scores.reshape(-1))


def _key_text(key: Hashable) -> str:
    """``video,timestamp``: a string key as it is, a (video, timestamp) pair as ``make_image_key`` writes it."""
    if isinstance(key, tuple) and len(key) == 2:
        return "%s,%04d" % (key[0], int(key[1]))
    return str(key)


def write_detections_csv(path: Union[str, Path], keys: Sequence[Hashable], boxes: Any, labels: Any,
                         scores: Any, box_decimals: int = 3, score_decimals: int = 4) -> int:
    """Write ``video_id,timestamp,x1,y1,x2,y2,action_id,score`` rows, the AVA submission format; rows written.

    The defaults are SlowFast's ``write_results`` (``%.03f`` boxes, ``%.04f`` scores); the rounding makes
    equal scores, so the number the official script computes from the file can differ slightly from the
    in-memory one.
    """
    key_arr = _key_array(keys)
    boxes = _boxes(boxes, "boxes")
    labels = _labels(labels, "labels")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not (len(key_arr) == len(boxes) == len(labels) == len(scores)):
        raise ValueError("keys, boxes, labels and scores must have one entry per row")
    b, s = f".{int(box_decimals)}f", f".{int(score_decimals)}f"
    texts: dict[Any, str] = {}
    with open(path, "w", newline="") as f:
        for key, (x1, y1, x2, y2), label, score in zip(key_arr.tolist(), boxes.tolist(), labels.tolist(),
                                                        scores.tolist()):
            text = texts.get(key)
            if text is None:
                text = texts[key] = _key_text(key)
            f.write(f"{text},{x1:{b}},{y1:{b}},{x2:{b}},{y2:{b}},{label:d},{score:{s}}\n")
    return len(scores)


def format_ap_table(result: Mapping[str, Any], label_names: Optional[Mapping[int, str]] = None) -> str:
    """A per-class table (id, name, AP %, GT, detections, TPs) and the mAP line, for logs and reports."""
    names = label_names or {}
    width = max([len("class")] + [len(str(names.get(i, ""))) for i in result["ap"]])
    lines = [f"{'id':>4}  {'class':<{width}}  {'AP %':>6}  {'GT':>6}  {'det':>8}  {'TP':>6}"]
    for i, ap in sorted(result["ap"].items()):
        ap_text = "n/a" if math.isnan(ap) else f"{100 * ap:.2f}"
        lines.append(f"{i:>4}  {str(names.get(i, '')):<{width}}  {ap_text:>6}  {result['num_gt'][i]:>6}  "
                     f"{result['num_det'][i]:>8}  {result['num_tp'][i]:>6}")
    mean = result["mAP"]
    mean_text = "n/a" if math.isnan(mean) else f"{100 * mean:.2f}"
    lines.append(f"mAP@0.5 over {result['num_classes_with_gt']} classes with ground truth: {mean_text} %")
    return "\n".join(lines)

"""AVA frame-level mAP: time of our vectorised evaluator at AVA-val size, against the loop reference, in one run.

    python run_scripts/bench_ava_map.py [--keyframes 15000] [--boxes 50000] [--gt-rows 60000] [--subset 20]
                                        [--repeats 3] [--seed 0] [--json PATH]

The data are synthetic but shaped like AVA v2.2 val: ``--keyframes`` keyframes ("video,timestamp" keys, 897
per video), ground-truth persons with one to three of the 60 label-map actions drawn from a long-tailed
distribution (``--gt-rows`` rows in all, a few with ids outside the label map and a few excluded keyframes),
and ``--boxes`` detected person boxes (jittered ground truth plus spurious boxes) each scored for all 60
classes, the classes of the person it covers scored higher: ``--boxes`` x 60 detection rows, box-major as a
model's output is laid out.

Figures: our ``frame_average_precision`` on the full size (median of ``--repeats``; also with the ActivityNet
script's cap of 50 rows per keyframe), then on 1/``--subset`` of the keyframes both ours and the loop
reference of ``tests/test_ava_eval.py`` (the definition, one box at a time), which must agree; the ratio is
the reference's time per detection row over ours on the full size. Single-threaded numpy: the time of one core.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file, installed or not

from engine.eval.ava_map import ACTIVITYNET_DETECTIONS_PER_KEY, dense_to_rows, frame_average_precision  # noqa: E402
from tests.test_ava_eval import reference_ap  # noqa: E402

# AVA v2.2 label map (ActivityNet 2019): ids 1..80 less these 20
NOT_EVALUATED = {2, 16, 18, 19, 21, 23, 25, 31, 32, 33, 35, 39, 40, 42, 44, 50, 53, 55, 71, 75}
CLASS_IDS = [i for i in range(1, 81) if i not in NOT_EVALUATED]
KEYFRAMES_PER_VIDEO = 897  # timestamps 0902..1798


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keyframes", type=int, default=15000, help="keyframes in the synthetic set")
    parser.add_argument("--boxes", type=int, default=50000, help="detected person boxes (x 60 class rows)")
    parser.add_argument("--gt-rows", type=int, default=60000, help="ground-truth (box, action) rows, about")
    parser.add_argument("--subset", type=int, default=20, help="the reference runs on 1/subset of the keyframes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours at full size (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args(argv)


def jitter(rng: np.random.Generator, boxes: np.ndarray, sigma: float) -> np.ndarray:
    """Boxes moved and resized by a few percent, kept inside the frame and well-formed."""
    out = np.clip(boxes + rng.normal(0.0, sigma, boxes.shape), 0.0, 1.0)
    x1, x2 = np.minimum(out[:, 0], out[:, 2]), np.maximum(out[:, 0], out[:, 2])
    y1, y2 = np.minimum(out[:, 1], out[:, 3]), np.maximum(out[:, 1], out[:, 3])
    return np.stack([x1, y1, x2, y2], axis=1)


def random_persons(rng: np.random.Generator, n: int) -> np.ndarray:
    """Standing-person-like boxes: 10-40% of the width, 30-90% of the height."""
    w, h = rng.uniform(0.1, 0.4, n), rng.uniform(0.3, 0.9, n)
    x, y = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
    return np.stack([x, y, x + w, y + h], axis=1)


def synthetic_ava(args: argparse.Namespace) -> dict:
    """Ground-truth rows and dense detections, AVA-val-shaped (see the module doc)."""
    rng = np.random.default_rng(args.seed)
    n_cls = len(CLASS_IDS)
    keys = [f"vid{k // KEYFRAMES_PER_VIDEO:03d}_{args.seed:04d}x,{902 + k % KEYFRAMES_PER_VIDEO:04d}"
            for k in range(args.keyframes)]
    popularity = 1.0 / np.arange(1, n_cls + 1) ** 1.1  # long tail: a few actions make most of the labels
    popularity /= popularity.sum()

    labels_per_person = 2.0
    persons_per_key = args.gt_rows / labels_per_person / args.keyframes
    n_persons = rng.poisson(persons_per_key, args.keyframes)
    person_key = np.repeat(np.arange(args.keyframes), n_persons)
    person_box = random_persons(rng, person_key.size)
    person_labels = [rng.choice(n_cls, int(rng.integers(1, 4)), replace=False, p=popularity)
                     for _ in range(person_key.size)]
    counts = np.array([len(lab) for lab in person_labels])
    gt_person = np.repeat(np.arange(person_key.size), counts)
    gt_labels = np.array(CLASS_IDS)[np.concatenate(person_labels)]
    outside = rng.random(gt_labels.size) < 0.02  # a few ids the label map leaves out
    gt_labels[outside] = rng.choice(sorted(NOT_EVALUATED), int(outside.sum()))
    gt_keys = np.array(keys, dtype=object)[person_key[gt_person]]

    # detected boxes: ~90% of the persons found (jittered), the rest of the budget spurious boxes
    found = np.flatnonzero(rng.random(person_key.size) < 0.9)[: args.boxes]
    spurious = args.boxes - found.size
    box_key = np.concatenate([person_key[found], rng.integers(0, args.keyframes, spurious)])
    box = np.concatenate([jitter(rng, person_box[found], 0.03), random_persons(rng, spurious)])
    hot = np.zeros((args.boxes, n_cls), dtype=bool)
    for row, p in enumerate(found):
        hot[row, person_labels[p]] = True
    logits = rng.normal(-3.0, 1.5, (args.boxes, n_cls)) + 3.5 * hot
    scores = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)  # what a model hands over
    order = np.argsort(box_key, kind="stable")  # a loader visits keyframes video by video
    box_key, box, scores = box_key[order], box[order], scores[order]
    det_keys, det_boxes, det_labels, det_scores = dense_to_rows(np.array(keys, dtype=object)[box_key], box,
                                                                scores, CLASS_IDS)
    excluded = [keys[k] for k in rng.choice(args.keyframes, max(1, args.keyframes // 200), replace=False)]
    return {"gt": (gt_keys, person_box[gt_person], gt_labels), "det": (det_keys, det_boxes, det_labels, det_scores),
            "excluded": excluded, "keys": keys}


def subset(data: dict, every: int) -> dict:
    """The rows of every ``every``-th keyframe."""
    chosen = set(data["keys"][::every])
    gk, gb, gl = data["gt"]
    dk, db, dl, ds = data["det"]
    g = np.fromiter((k in chosen for k in gk), dtype=bool, count=len(gk))
    d = np.fromiter((k in chosen for k in dk), dtype=bool, count=len(dk))
    return {"gt": (gk[g], gb[g], gl[g]), "det": (dk[d], db[d], dl[d], ds[d]),
            "excluded": [k for k in data["excluded"] if k in chosen], "keys": sorted(chosen)}


def timed(fn, *args, **kwargs) -> tuple[float, dict]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_gen, data = timed(synthetic_ava, args)
    n_gt, n_det = len(data["gt"][0]), len(data["det"][0])
    print(f"synthetic AVA-val-like set: {args.keyframes} keyframes, {n_gt} GT rows, {args.boxes} boxes x "
          f"{len(CLASS_IDS)} classes = {n_det} detection rows ({t_gen:.1f} s to generate)")

    def ours(d: dict, **kw) -> dict:
        return frame_average_precision(*d["gt"], *d["det"], CLASS_IDS, excluded_keys=d["excluded"], **kw)

    runs = [timed(ours, data) for _ in range(args.repeats)]
    t_ours = statistics.median(t for t, _ in runs)
    full = runs[0][1]
    t_capped, capped = timed(ours, data, max_detections_per_key=ACTIVITYNET_DETECTIONS_PER_KEY)

    part = subset(data, args.subset)
    n_part = len(part["det"][0])
    t_ours_part, ours_part = timed(ours, part)
    t_ref, (ref_ap, ref_map) = timed(reference_ap, *part["gt"], *part["det"], CLASS_IDS,
                                     excluded_keys=part["excluded"])
    diffs = [abs(ours_part["ap"][c] - ref_ap[c]) for c in CLASS_IDS
             if not (math.isnan(ours_part["ap"][c]) and math.isnan(ref_ap[c]))]
    max_diff = max(diffs + [abs(ours_part["mAP"] - ref_map)])

    per_row_ours = t_ours / n_det
    per_row_ref = t_ref / n_part
    result = {
        "keyframes": args.keyframes, "gt_rows": n_gt, "det_rows": n_det, "classes": len(CLASS_IDS),
        "ours_s": t_ours, "ours_runs_s": [t for t, _ in runs], "ours_capped50_s": t_capped,
        "mAP": full["mAP"], "mAP_capped50": capped["mAP"],
        "subset_keyframes": len(part["keys"]), "subset_det_rows": n_part,
        "ours_subset_s": t_ours_part, "reference_subset_s": t_ref,
        "ours_us_per_row": 1e6 * per_row_ours, "reference_us_per_row": 1e6 * per_row_ref,
        "ratio_per_row": per_row_ref / per_row_ours, "ratio_same_subset": t_ref / t_ours_part,
        "subset_max_abs_diff": max_diff, "subset_mAP": ours_part["mAP"],
    }
    print(f"ours, full size:          {t_ours:7.2f} s (median of {args.repeats}: "
          f"{', '.join(f'{t:.2f}' for t, _ in runs)})  {1e6 * per_row_ours:6.3f} us/row  mAP {full['mAP']:.4f}")
    print(f"ours, full, cap 50/key:   {t_capped:7.2f} s  mAP {capped['mAP']:.4f} "
          f"({capped['num_det_rows']} of {full['num_det_rows']} rows kept)")
    print(f"subset 1/{args.subset}: {len(part['keys'])} keyframes, {n_part} detection rows")
    print(f"  ours:                   {t_ours_part:7.3f} s")
    print(f"  reference (loops):      {t_ref:7.2f} s  {1e6 * per_row_ref:8.3f} us/row  "
          f"max |ours - reference| = {max_diff:.1e}")
    print(f"ratio per detection row (reference on the subset / ours on the full size): "
          f"{result['ratio_per_row']:.0f}x; same subset: {result['ratio_same_subset']:.0f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

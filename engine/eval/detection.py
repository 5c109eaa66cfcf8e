"""AVA detection scoring: every box of a set of keyframes scored once over the ranks (the lockstep protocol), the
rows gathered in keyframe order, and ``engine.eval.ava_map.frame_average_precision`` against the ground truth. A
keyframe whose frames cannot be read is listed as unscored (its ground truth then counts as missed), never
dropped silently."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets.ava.dataset import AVAKeyframes, Keyframe, collate_keyframes
from datasets.files import write_text_atomic
from datasets.video_dataset import Failure, model_input
from engine import preempt
from engine.dist import all_gather_objects, group_rank_and_size
from engine.eval.ava_map import dense_to_rows, format_ap_table, frame_average_precision, write_detections_csv
from engine.eval.lockstep import forwards_in_lockstep

log = logging.getLogger("detect")


def rank_batches(keyframes: list[Keyframe], micro_batch: int, world: int, rank: int) -> list[list[int]]:
    """This rank's batches of keyframe indices: a contiguous share of the items (every item once over the ranks,
    no padding), cut into runs of at most ``micro_batch`` consecutive keyframes of one video. Whole test frames
    differ in size between videos, and a batch must share one. Known before any frame is read, so every rank
    knows how many forwards it runs."""
    start, stop = rank * len(keyframes) // world, (rank + 1) * len(keyframes) // world
    batches: list[list[int]] = []
    for index in range(start, stop):
        last = batches[-1] if batches else None
        if last and len(last) < micro_batch and keyframes[last[-1]].video_id == keyframes[index].video_id:
            last.append(index)
        else:
            batches.append([index])
    return batches


@dataclass
class DetectionScores:
    """Per-box action scores of a test set, gathered from every rank, in keyframe order."""

    keys: list[str]  # "video_id,timestamp" of each box
    boxes: np.ndarray  # (N, 4) normalized x1, y1, x2, y2
    scores: np.ndarray  # (N, len(class_ids)): sigmoid score of each label-map class
    class_ids: list[int]  # the label map's action ids, the columns of `scores`
    num_keyframes: int  # keyframes in the test set
    unscored: list[tuple[str, str]]  # (keyframe, reason) of keyframes whose frames could not be read


@torch.no_grad()
def score_keyframes(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dataset: AVAKeyframes,
                    class_ids: list[int], *, micro_batch: int, num_workers: int, device: torch.device,
                    dtype: torch.dtype, collective_forward: bool = False, times_box_score: bool = False
                    ) -> DetectionScores:
    """Score every box of ``dataset`` (test views) once over the ranks; call on every rank, all get the result.

    ``forward(video, rois)`` → (K, num_classes) logits, in eval mode. ``collective_forward`` (ZeRO-3, whose
    forward gathers parameters from every rank): a rank with fewer batches, or with a batch that could not be
    read, runs a forward on a blank clip without boxes, so every rank calls it the same number of times.
    ``times_box_score``: each action score is multiplied by the box's detector score."""
    rank, world = group_rank_and_size()
    batches = rank_batches(dataset.keyframes, micro_batch, world, rank)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_keyframes, num_workers=num_workers,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # not the global RNG: validation must not shift training's
    columns = torch.tensor([i - 1 for i in class_ids])
    scored: list[tuple[int, np.ndarray]] = []  # (keyframe index, (K_i, classes) scores)
    failures: list[Failure] = []

    def run(batch: dict) -> bool:
        failures.extend(batch["failures"])
        if batch["video"] is None:
            return False
        video = model_input(batch["video"].to(device, non_blocking=True), dataset.cfg, dtype)
        probs = forward(video, batch["rois"].to(device)).float().sigmoid().cpu()[:, columns].double().numpy()
        if times_box_score:
            probs *= batch["scores"].double().numpy()[:, None]
        keyframe = batch["keyframe"].numpy()
        for index in np.unique(keyframe):
            scored.append((int(index), probs[keyframe == index]))
        return True

    def blank() -> None:
        forward(_blank_clip(dataset, device, dtype), torch.zeros(0, 5, device=device))

    # validation runs during training: its loader's workers must survive the signals
    forwards_in_lockstep(preempt.iterate(loader), len(batches), run, blank, collective_forward)
    parts = all_gather_objects((scored, [(f.index, f.path, f.reason) for f in failures]))
    return _assemble(dataset, class_ids, [row for part in parts for row in part[0]],
                     sorted({f for part in parts for f in part[1]}))


def _blank_clip(dataset: AVAKeyframes, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    cfg = dataset.cfg
    side = cfg.test_short_side
    return torch.zeros(1, 3, cfg.clip_len, side, side, device=device, dtype=dtype)


def _assemble(dataset: AVAKeyframes, class_ids: list[int], scored: list[tuple[int, np.ndarray]],
              failures: list[tuple[int, str, str]]) -> DetectionScores:
    """Rows of every scored keyframe, in keyframe order, with the boxes as the detector gave them (normalized)."""
    scored.sort(key=lambda pair: pair[0])
    keys, boxes, scores = [], [], []
    for index, probs in scored:
        keyframe = dataset.keyframes[index]
        keys += [keyframe.key] * len(keyframe.boxes)
        boxes.append(keyframe.boxes)
        scores.append(probs)
    return DetectionScores(keys=keys, boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
                           scores=np.concatenate(scores) if scores else np.zeros((0, len(class_ids))),
                           class_ids=list(class_ids), num_keyframes=len(dataset),
                           unscored=[(f"{dataset.keyframes[i].key}", reason) for i, _, reason in failures])


def average_precision(result: DetectionScores, truth, excluded: set[str]) -> dict:
    """``frame_average_precision`` of the scored rows against the ground-truth table ``truth``."""
    rows = dense_to_rows(result.keys, result.boxes, result.scores, result.class_ids)
    return frame_average_precision(truth.keys(), truth.boxes, truth.action, *rows, result.class_ids,
                                   excluded_keys=excluded)


def summary(result: DetectionScores, ap: dict, label_map: dict[int, str]) -> dict:
    """What test_results.json holds: mAP, AP per class by name (null without ground truth), the unscored."""
    def number(value: float) -> Optional[float]:
        return None if math.isnan(value) else float(value)

    return {"mAP": number(ap["mAP"]),
            "ap": {label_map[i]: number(value) for i, value in sorted(ap["ap"].items())},
            "num_keyframes": result.num_keyframes, "num_scored": result.num_keyframes - len(result.unscored),
            "num_boxes": len(result.keys), "unscored": [list(pair) for pair in result.unscored]}


def write_results(out: Path, name: str, result: DetectionScores, ap: dict, label_map: dict[int, str],
                  **extra) -> None:
    """``<name>.json``: the summary, with ``extra`` (the step, the weights) first."""
    write_text_atomic(out / f"{name}.json", json.dumps({**extra, **summary(result, ap, label_map)}, indent=2) + "\n")


def describe(title: str, result: DetectionScores, ap: dict, label_map: dict[int, str]) -> str:
    lines = [f"{title}: {result.num_keyframes - len(result.unscored)} of {result.num_keyframes} keyframes scored",
             format_ap_table(ap, label_map)]
    lines += [f"  unreadable: {key}: {reason}" for key, reason in result.unscored]
    return "\n".join(lines)


def write_outputs(out: Path, results_name: str, detections_name: str, result: DetectionScores, ap: dict,
                  label_map: dict[int, str], **extra) -> None:
    """``<results_name>.json`` (mAP, AP per class, unscored keyframes) and the detections in AVA's 8-column
    submission format (rank 0)."""
    write_results(out, results_name, result, ap, label_map, **extra)
    rows = dense_to_rows(result.keys, result.boxes, result.scores, result.class_ids)
    write_detections_csv(out / detections_name, rows[0], rows[1], rows[2], rows[3])
    log.info("wrote %s and %s", out / f"{results_name}.json", out / detections_name)

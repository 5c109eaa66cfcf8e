"""The AVA files a detection run reads, as one config section, and the keyframes of each split built from them:
ground-truth keyframes to train on, detected keyframes to score."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from datasets.ava.dataset import AVAClipConfig, Keyframe, group_keyframes
from datasets.ava.files import (
    DEFAULT_MIN_SCORE,
    filter_detections,
    keep_label_map_actions,
    read_ava_csv,
    read_excluded_timestamps,
    read_proposals_pkl,
)
from datasets.synthetic.ava import SyntheticAVASpec
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("detect")


@dataclass
class AVADataConfig(AVAClipConfig):
    # folder the annotation paths below (and frames_dir) are relative to
    root: str = ""
    # the built-in synthetic AVA dataset: generated into `root` when missing (its fps must equal `fps`); null = none
    synthetic: Optional[SyntheticAVASpec] = None
    # training ground truth: video_id,timestamp,x1,y1,x2,y2,action_id,person_id
    train_csv: str = "annotations/ava_train_v2.2.csv"
    # validation (and test) ground truth, same format
    val_csv: str = "annotations/ava_val_v2.2.csv"
    # the evaluated actions (.pbtxt); training and evaluation keep only these
    label_map: str = "annotations/ava_action_list_v2.2.pbtxt"
    # training keyframes to skip: video_id,timestamp
    train_excluded: str = "annotations/ava_train_excluded_timestamps_v2.2.csv"
    # validation keyframes to skip, on both the ground-truth and the detection side
    val_excluded: str = "annotations/ava_val_excluded_timestamps_v2.2.csv"
    # person boxes of a detector on the validation keyframes: video_id,timestamp,x1,y1,x2,y2,,score; or a .pkl of
    # dense proposals (mmaction2's ava_dense_proposals_val.FAIR.recall_93.9.pkl: {"video_id,%04d": (N, 5) array})
    val_detections: str = "annotations/ava_val_predicted_person_boxes.csv"
    # detected boxes scored below this are not evaluated (VideoMAE 0.8, SlowFast 0.9)
    detection_min_score: float = DEFAULT_MIN_SCORE
    # per-channel mean for normalization (applied on the device)
    mean: tuple[float, ...] = IMAGENET_MEAN
    # per-channel std for normalization (applied on the device)
    std: tuple[float, ...] = IMAGENET_STD
    # after normalization, subtract every pixel's mean over the clip's frames (keeps what moves; tiny models)
    subtract_clip_mean: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.synthetic is not None and not self.root:
            raise ValueError("the synthetic dataset needs `root`, the folder it is generated into")
        if self.synthetic is not None and self.synthetic.fps != self.fps:
            raise ValueError(f"fps {self.fps} differs from the synthetic dataset's fps {self.synthetic.fps}: "
                             "keyframes would be read from the wrong frames")
        if not math.isfinite(self.detection_min_score):
            raise ValueError(f"detection_min_score must be a finite number, got {self.detection_min_score}")

    def path(self, name: str) -> Path:
        """The file of field ``name`` (train_csv, label_map, ...), joined to ``root``."""
        return Path(self.root or ".") / getattr(self, name)


def ground_truth(data: AVADataConfig, split: str, label_map: dict[int, str]):
    """The ground-truth table of ``split`` with only the label map's actions (rows of other actions are counted
    in the log, so that a wrong label map shows)."""
    table, dropped = keep_label_map_actions(read_ava_csv(data.path(f"{split}_csv"), kind="groundtruth"), label_map)
    if dropped:
        log.info("%s: left out rows of actions outside the label map: %s", data.path(f"{split}_csv"), dropped)
    return table


def train_keyframes(data: AVADataConfig, label_map: dict[int, str]) -> list[Keyframe]:
    """Ground-truth keyframes to train on: label-map actions, excluded timestamps removed."""
    excluded = read_excluded_timestamps(data.path("train_excluded"))
    return group_keyframes(ground_truth(data, "train", label_map), data.num_classes, excluded)


def detected_keyframes(data: AVADataConfig) -> list[Keyframe]:
    """Validation keyframes to score: the detector's boxes at or above ``detection_min_score``, excluded
    timestamps removed."""
    path = data.path("val_detections")
    table = read_proposals_pkl(path) if path.suffix == ".pkl" else read_ava_csv(path, kind="detections")
    table = filter_detections(table, data.detection_min_score)
    return group_keyframes(table, data.num_classes, read_excluded_timestamps(data.path("val_excluded")))

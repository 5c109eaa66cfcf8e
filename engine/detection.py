"""AVA spatio-temporal action detection as a task of the shared training loop: the RoI detector of
``models.detection`` trained on ground-truth person boxes, validated and tested by frame mAP on detected boxes.

The training loop is ``engine.loop``'s; this module says what detection is made of: where the keyframes and
their boxes come from (``datasets.ava_files`` / ``datasets.ava_dataset``), the detector and its initial encoder
weights, the multi-label box loss, and the evaluation: every validation keyframe scored once over the ranks,
the rows gathered, and ``engine.ava_eval.frame_average_precision`` against the ground truth. A keyframe whose
frames cannot be read is listed as unscored (its ground truth then counts as missed), never dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets.ava_dataset import AVAClipConfig, AVAKeyframes, Keyframe, collate_keyframes, group_keyframes
from datasets.ava_files import (DEFAULT_MIN_SCORE, filter_detections, keep_label_map_actions, read_ava_csv,
                                read_excluded_timestamps, read_label_map)
from datasets.files import write_text_atomic
from datasets.synthetic_ava import SyntheticAVASpec, ensure_synthetic_ava
from datasets.video_dataset import IMAGENET_MEAN, IMAGENET_STD, Failure, model_input
from engine import checkpoint, ds, preempt
from engine.ava_eval import dense_to_rows, format_ap_table, frame_average_precision, write_detections_csv
from engine.evaluate import forwards_in_lockstep
from engine.config import BatchConfig, ConfigError
from engine.dist import all_gather_objects, barrier, get_rank, get_world_size, is_main_process
from engine.loop import RunConfig
from engine.optim import OptimConfig
from engine.task import Task, export_final_weights
from models.detection import ActionDetector, DetectorConfig, detection_loss, load_encoder_weights

log = logging.getLogger("detect")


# ---- configuration ---------------------------------------------------------------------------------------------


@dataclass
class DetectionModelConfig(DetectorConfig):
    # weights the encoder starts from (our pre-training export, a fine-tuned classifier, an official VideoMAE / V2
    # or Hugging Face checkpoint); "" trains from scratch
    init: str = ""


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
    # person boxes of a detector on the validation keyframes: video_id,timestamp,x1,y1,x2,y2,,score
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


@dataclass
class DetectionEvalConfig:
    # validate (frame mAP on the detected val boxes) every this many epochs and after the last; 0 = never
    every_epochs: int = 1
    # val keyframes per rank and forward (only keyframes of one video, whose frames share a size, go together)
    micro_batch: int = 4
    # score the val keyframes with the last weights after training: test_results.json and detections.csv
    final_test: bool = True
    # an action's score = its sigmoid x the person detector's score for the box (VideoMAE's detector); false = the
    # sigmoid alone (SlowFast)
    times_box_score: bool = False

    def __post_init__(self) -> None:
        if self.every_epochs < 0 or self.micro_batch < 1:
            raise ValueError(f"every_epochs must be >= 0 and micro_batch >= 1, got {self.every_epochs}, "
                             f"{self.micro_batch}")


def _detection_optim() -> OptimConfig:
    # VideoMAE's AVA fine-tuning: AdamW (0.9, 0.999), layer decay 0.75, warmup then cosine.
    return OptimConfig(blr=1e-3, betas=(0.9, 0.999), epochs=30, warmup_epochs=5, layer_decay=0.75)


@dataclass
class DetectionConfig:
    model: DetectionModelConfig = field(default_factory=DetectionModelConfig)  # detector and initial weights
    data: AVADataConfig = field(default_factory=AVADataConfig)  # AVA files, clips around keyframes, views
    eval: DetectionEvalConfig = field(default_factory=DetectionEvalConfig)  # validation and the final test
    batch: BatchConfig = field(default_factory=BatchConfig)  # keyframes per rank and micro-step, workers
    optim: OptimConfig = field(default_factory=_detection_optim)  # AdamW, layer decay and schedule
    ds: ds.DeepSpeedConfig = field(default_factory=ds.DeepSpeedConfig)  # ZeRO stage and precision
    run: RunConfig = field(default_factory=RunConfig)  # output directory, seed, logging, checkpoints

    def __post_init__(self) -> None:
        if self.data.num_classes != self.model.num_classes:
            raise ValueError(f"data.num_classes {self.data.num_classes} differs from model.num_classes "
                             f"{self.model.num_classes}")
        if self.data.clip_len != self.model.encoder.num_frames:
            raise ValueError(f"data.clip_len {self.data.clip_len} differs from model.encoder.num_frames "
                             f"{self.model.encoder.num_frames}")


# ---- data ------------------------------------------------------------------------------------------------------


def prepare_data(data: AVADataConfig) -> None:
    """Generate the synthetic dataset when asked for: rank 0 first while the others wait, so that no two
    processes write the same files."""
    if data.synthetic is None:
        return
    if not is_main_process():
        barrier()
    ensure_synthetic_ava(data.root, data.synthetic)
    if is_main_process():
        barrier()


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
    table = filter_detections(read_ava_csv(data.path("val_detections"), kind="detections"), data.detection_min_score)
    return group_keyframes(table, data.num_classes, read_excluded_timestamps(data.path("val_excluded")))


# ---- evaluation ------------------------------------------------------------------------------------------------


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
    batches = rank_batches(dataset.keyframes, micro_batch, get_world_size(), get_rank())
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


# ---- the task --------------------------------------------------------------------------------------------------


def build_initial_detector(cfg: DetectionModelConfig) -> ActionDetector:
    """The detector, its encoder initialised from ``cfg.init`` when set (the head is always fresh)."""
    model = ActionDetector(cfg)
    if cfg.init:
        report = load_encoder_weights(model, checkpoint.read_checkpoint(cfg.init))
        log.info("initial encoder weights from %s: %s", cfg.init, report)
    else:
        log.info("training from scratch (model.init is not set)")
    return model


def load_trained_detector(cfg: DetectionModelConfig, path: str) -> ActionDetector:
    """A detector holding the weights a detection run exported (weights.pt, best.pt): all of them, head included."""
    model = ActionDetector(cfg)
    weights = checkpoint.load_weights(path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(f"{path} does not hold this detector's weights: {str(err).splitlines()[0]}") from None
    return model


class DetectionTask(Task):
    """AVA action detection for ``engine.loop.train``: frame mAP on the validation keyframes every
    ``eval.every_epochs`` (best weights in best.pt), and the final test of the last weights."""

    config_class = DetectionConfig
    outputs = ("config.yaml, derived.yaml, metrics.jsonl, tb/, checkpoints/, weights.pt, best.pt, "
               "test_results.json, detections.csv")

    def __init__(self, cfg: DetectionConfig):
        super().__init__(cfg)
        prepare_data(cfg.data)
        self.label_map = read_label_map(cfg.data.path("label_map"))
        self._check_label_map()
        torch.manual_seed(cfg.run.seed)  # the same fresh weights on every rank and in every run
        self.model = build_initial_detector(cfg.model)
        self.train_set = AVAKeyframes(cfg.data.root, train_keyframes(cfg.data, self.label_map), cfg.data,
                                      train=True, seed=cfg.run.seed)
        log.info("training on %d keyframes (%d boxes)", len(self.train_set), self.boxes_per_keyframe()
                 * len(self.train_set))
        self._val: Optional[tuple] = None  # (dataset, ground truth, excluded keys), read when first needed
        self.best = -1.0  # best validation mAP so far

    def _check_label_map(self) -> None:
        beyond = [i for i in self.label_map if i > self.cfg.model.num_classes]
        if beyond:
            raise ConfigError(f"label map {self.cfg.data.path('label_map')} has action ids {beyond} beyond "
                              f"model.num_classes={self.cfg.model.num_classes}")

    # ---- training --------------------------------------------------------------------------------------------

    def collate(self, items: list) -> dict:
        return collate_keyframes(items)

    def blank_batch(self, size: int) -> dict:
        """Zero clips of the training shape without boxes: the detector returns (0, C) logits and the loss a zero
        that still runs backward through every parameter, so this rank joins the step's collectives."""
        data = self.cfg.data
        return collate_keyframes([{"video": torch.zeros(3, data.clip_len, data.crop, data.crop, dtype=torch.uint8),
                                   "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, data.num_classes),
                                   "scores": torch.zeros(0), "index": 0} for _ in range(size)])

    def loss(self, engine, batch: dict, generator: torch.Generator) -> torch.Tensor:
        # float32 here; the model casts the clip to its weights' dtype (the RoI head runs in float32).
        logits = engine(model_input(batch["video"], self.cfg.data, torch.float32), batch["rois"])
        return detection_loss(logits, batch["labels"])

    def token_grid(self) -> tuple[int, int, int]:
        return self._train_grid()

    def _train_grid(self) -> tuple[int, int, int]:
        return dataclasses.replace(self.cfg.model.encoder, img_size=self.cfg.data.crop).grid

    def boxes_per_keyframe(self) -> float:
        keyframes = self.train_set.keyframes
        return sum(len(k.boxes) for k in keyframes) / max(len(keyframes), 1)

    def train_flops_per_clip(self) -> float:
        return 3 * self.model.forward_flops(self._train_grid(), self.boxes_per_keyframe())

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best", -1.0)

    # ---- evaluation ------------------------------------------------------------------------------------------

    def validation(self):
        """(test dataset of detected boxes, ground-truth table, excluded keys), read once."""
        if self._val is None:
            data = self.cfg.data
            dataset = AVAKeyframes(data.root, detected_keyframes(data), data, train=False)
            self._val = (dataset, ground_truth(data, "val", self.label_map),
                         read_excluded_timestamps(data.path("val_excluded")))
        return self._val

    def evaluate(self, engine) -> tuple[DetectionScores, dict]:
        """Scores and frame AP of the engine's current weights on the validation keyframes (every rank)."""
        dataset, truth, excluded = self.validation()
        engine.eval()
        try:
            result = score_keyframes(engine, dataset, sorted(self.label_map), micro_batch=self.cfg.eval.micro_batch,
                                     num_workers=self.cfg.batch.num_workers, device=engine.device,
                                     dtype=ds.input_dtype(engine),
                                     collective_forward=ds.parameters_partitioned(engine),
                                     times_box_score=self.cfg.eval.times_box_score)
        finally:
            engine.train()
        return result, average_precision(result, truth, excluded)

    def on_epoch_end(self, engine, epoch: int, output_dir: str, generator: torch.Generator) -> Optional[dict]:
        every = self.cfg.eval.every_epochs
        if not every or (epoch % every and epoch < self.cfg.optim.epochs):
            return None
        result, ap = self.evaluate(engine)
        log.info("%s", describe(f"epoch {epoch} validation", result, ap, self.label_map))
        value = ap["mAP"]
        if not math.isnan(value) and value > self.best:
            self.best = value
            weights = ds.full_parameters(engine)  # a collective under ZeRO-3: every rank
            if is_main_process():
                path = checkpoint.export_weights(weights, Path(output_dir) / "best.pt")
                log.info("new best validation mAP %.2f: wrote %s", 100 * value, path)
        return {"val_mAP": value, "val_unscored": len(result.unscored)}

    def finish(self, engine, output_dir: str) -> None:
        """Export the last weights (fp32, whole), then score the validation keyframes with them:
        test_results.json and detections.csv (AVA's submission format) next to the run."""
        out = Path(output_dir)
        step = export_final_weights(engine, out)
        if not self.cfg.eval.final_test:
            return
        result, ap = self.evaluate(engine)
        log.info("%s", describe("test", result, ap, self.label_map))
        if is_main_process():
            write_outputs(out, "test_results", "detections.csv", result, ap, self.label_map, step=step)


def write_outputs(out: Path, results_name: str, detections_name: str, result: DetectionScores, ap: dict,
                  label_map: dict[int, str], **extra) -> None:
    """``<results_name>.json`` (mAP, AP per class, unscored keyframes) and the detections in AVA's 8-column
    submission format (rank 0)."""
    write_results(out, results_name, result, ap, label_map, **extra)
    rows = dense_to_rows(result.keys, result.boxes, result.scores, result.class_ids)
    write_detections_csv(out / detections_name, rows[0], rows[1], rows[2], rows[3])
    log.info("wrote %s and %s", out / f"{results_name}.json", out / detections_name)


def evaluate_weights(cfg: DetectionConfig, path: str, device: torch.device) -> tuple[DetectionScores, dict,
                                                                                       dict[int, str]]:
    """Score the validation keyframes with exported detector weights, without training (``detect.py
    --eval-only``); every rank calls it, each scoring its share. Returns (scores, AP, label map)."""
    prepare_data(cfg.data)
    label_map = read_label_map(cfg.data.path("label_map"))
    model = load_trained_detector(cfg.model, path).to(device).eval()
    dataset = AVAKeyframes(cfg.data.root, detected_keyframes(cfg.data), cfg.data, train=False)
    result = score_keyframes(model, dataset, sorted(label_map), micro_batch=cfg.eval.micro_batch,
                             num_workers=cfg.batch.num_workers, device=device, dtype=torch.float32,
                             times_box_score=cfg.eval.times_box_score)
    truth = ground_truth(cfg.data, "val", label_map)
    return result, average_precision(result, truth, read_excluded_timestamps(cfg.data.path("val_excluded"))), \
        label_map

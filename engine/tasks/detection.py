"""AVA spatio-temporal action detection as a task of the shared training loop: the RoI detector of
``models.detection`` trained on ground-truth person boxes, validated and tested by frame mAP on detected boxes.

The training loop is ``engine.loop``'s; this module says what detection is made of: where the keyframes and
their boxes come from (``datasets.ava.files`` / ``datasets.ava.dataset``), the detector and its initial encoder
weights, the multi-label box loss, and the evaluation: every validation keyframe scored once over the ranks,
the rows gathered, and ``engine.eval.ava_map.frame_average_precision`` against the ground truth. A keyframe whose
frames cannot be read is listed as unscored (its ground truth then counts as missed), never dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from datasets.ava.dataset import AVAKeyframes, collate_keyframes
from datasets.ava.files import read_excluded_timestamps, read_label_map
from datasets.ava.splits import AVADataConfig, detected_keyframes, ground_truth, train_keyframes
from datasets.video_dataset import model_input
from engine import checkpoint, ds
from engine.config import BatchConfig, ConfigError
from engine.data import prepare_synthetic
from engine.dist import is_main_process
from engine.eval.detection import DetectionScores, average_precision, describe, score_keyframes, write_outputs
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


def evaluate_weights(cfg: DetectionConfig, path: str, device: torch.device) -> tuple[DetectionScores, dict,
                                                                                       dict[int, str]]:
    """Score the validation keyframes with exported detector weights, without training (``detect.py
    --eval-only``); every rank calls it, each scoring its share. Returns (scores, AP, label map)."""
    prepare_synthetic(cfg.data)
    label_map = read_label_map(cfg.data.path("label_map"))
    model = load_trained_detector(cfg.model, path).to(device).eval()
    dataset = AVAKeyframes(cfg.data.root, detected_keyframes(cfg.data), cfg.data, train=False)
    result = score_keyframes(model, dataset, sorted(label_map), micro_batch=cfg.eval.micro_batch,
                             num_workers=cfg.batch.num_workers, device=device, dtype=torch.float32,
                             times_box_score=cfg.eval.times_box_score)
    truth = ground_truth(cfg.data, "val", label_map)
    return result, average_precision(result, truth, read_excluded_timestamps(cfg.data.path("val_excluded"))), \
        label_map

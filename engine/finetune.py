"""Supervised fine-tuning of a (pre-trained) video ViT classifier, with validation and the multi-view test.

The training loop is ``engine.loop``'s; this module says what fine-tuning is made of: the classifier and where
its weights come from, mixup/cutmix and the classification loss, optional MAE-ST masking annealed to zero,
a model EMA that is evaluated as well as saved, validation with best-weights export, and the final test.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import torch

from datasets.files import write_text_atomic
from datasets.transforms import AugmentConfig
from datasets.video_dataset import DataConfig, EvalClips, model_input
from engine import checkpoint, ds
from engine.config import BatchConfig
from engine.data import read_split, train_clips
from engine.dist import is_main_process
from engine.evaluate import evaluate_clips
from engine.loop import RunConfig
from engine.mixup import MixupConfig, build_mixup, classification_loss
from engine.optim import OptimConfig
from engine.task import Task, export_final_weights
from engine.tokenizer import load_trained_tokenizer
from models.convert import load_into_classifier
from models.masking import MaskConfig, build_mask_generator
from models.vit import ClassifierConfig, ViTConfig, build_classifier

log = logging.getLogger("finetune")


@dataclass
class FinetuneModelConfig(ClassifierConfig):
    # weights to start from: our pre-training export, a fine-tuned checkpoint, an official VideoMAE / V2
    # release or a Hugging Face VideoMAE checkpoint; None trains from scratch
    init: Optional[str] = None
    # a classifier over tokenizer codes (VIMPAC): the weights.pt of the frozen tokenizer it reads them from, run in
    # front of the transformer on every clip; "" = a ViT over pixels
    tokenizer: str = ""


@dataclass
class FinetuneMaskConfig:
    """MAE-ST appendix B.3: hide a fraction of the tokens from the encoder, annealed to 0 by a cosine."""

    # "random" (MAE-ST, spacetime-agnostic) or "tube"
    kind: Literal["random", "tube"] = "random"
    # fraction hidden at the first step (MAE-ST tried 0.5 and 0.75); 0 = no masking
    start_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.start_ratio < 1:
            raise ValueError(f"start_ratio must be in [0, 1), got {self.start_ratio}")

    def ratio_at(self, step: int, total_steps: int) -> float:
        """The ratio for optimizer step ``step`` (0-based) of ``total_steps``: start → 0 on a half cosine."""
        return self.start_ratio * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


@dataclass
class EmaConfig:
    # decay of an exponential moving average of the weights, updated every optimizer step, validated, tested
    # and exported beside the model (VideoMAE: 0.9999); None = no EMA
    decay: Optional[float] = None

    def __post_init__(self) -> None:
        if self.decay is not None and not 0 < self.decay < 1:
            raise ValueError(f"decay must be in (0, 1) or null, got {self.decay}")


@dataclass
class EvalConfig:
    # validate (one temporal view, one centre crop) every this many epochs and after the last; 0 = never
    every_epochs: int = 5
    # test items per rank and forward; an item is one temporal view cut into eval_augment's spatial crops
    micro_batch: int = 4
    # run the multi-view test (data.test_temporal_views x data.eval_augment.num_spatial_views) after training
    final_test: bool = True

    def __post_init__(self) -> None:
        if self.every_epochs < 0 or self.micro_batch < 1:
            raise ValueError(f"every_epochs must be >= 0 and micro_batch >= 1, got {self.every_epochs}, "
                             f"{self.micro_batch}")


def _finetune_augment() -> AugmentConfig:
    # VideoMAE fine-tuning: RandAugment, random-resized crop (0.08-1), flip, cube erasing p=0.25.
    return AugmentConfig(kind="finetune", rrc_scale=(0.08, 1.0), rand_augment="rand-m7-n4-mstd0.5-inc1",
                         erase_prob=0.25)


def _finetune_model() -> FinetuneModelConfig:
    return FinetuneModelConfig(encoder=ViTConfig(drop_path=0.1))


def _finetune_optim() -> OptimConfig:
    # VideoMAE fine-tuning defaults: base lr 1e-3 per 256 clips, AdamW (0.9, 0.999), layer decay 0.75.
    return OptimConfig(blr=1e-3, betas=(0.9, 0.999), epochs=100, warmup_epochs=5, layer_decay=0.75)


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=_finetune_model)  # classifier and its initial weights
    mask: FinetuneMaskConfig = field(default_factory=FinetuneMaskConfig)  # optional annealed token masking
    data: DataConfig = field(default_factory=lambda: DataConfig(train_augment=_finetune_augment()))
    mixup: MixupConfig = field(default_factory=MixupConfig)  # mixup / cutmix / label smoothing
    ema: EmaConfig = field(default_factory=EmaConfig)  # model EMA
    eval: EvalConfig = field(default_factory=EvalConfig)  # validation and the final test
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(repeats=2))  # repeats = VideoMAE num_sample
    optim: OptimConfig = field(default_factory=_finetune_optim)  # AdamW, layer decay and schedule
    ds: ds.DeepSpeedConfig = field(default_factory=ds.DeepSpeedConfig)  # ZeRO stage and precision
    run: RunConfig = field(default_factory=RunConfig)  # output directory, seed, logging, checkpoints

    def __post_init__(self) -> None:
        if self.ema.decay is not None and ds.zero_stage(self.ds) == 3:
            raise ValueError("ema.decay needs whole parameters on every rank: use ZeRO stage 0-2, or no EMA")
        if self.mixup.enabled and (self.batch.micro_batch * self.batch.repeats) % 2:
            raise ValueError(f"mixup/cutmix pairs clips: batch.micro_batch x batch.repeats must be even, got "
                             f"{self.batch.micro_batch} x {self.batch.repeats}")
        if self.data.num_classes is not None and self.data.num_classes != self.model.num_classes:
            raise ValueError(f"data.num_classes {self.data.num_classes} differs from model.num_classes "
                             f"{self.model.num_classes}")


def build_model(cfg: FinetuneModelConfig):
    """The classifier, freshly initialised: a ViT over pixels, or over the codes of ``cfg.tokenizer``."""
    if not cfg.tokenizer:
        return build_classifier(cfg)
    from models.vimpac import build_token_classifier

    return build_token_classifier(cfg, load_trained_tokenizer(cfg.tokenizer, "model.tokenizer"))


def build_initial_model(cfg: FinetuneModelConfig):
    """The classifier, with the weights of ``cfg.init`` when set (a fresh head where they have none)."""
    model = build_model(cfg)
    if cfg.init:
        report = load_into_classifier(model, checkpoint.read_checkpoint(cfg.init))
        log.info("initial weights from %s: %s", cfg.init, report)
    else:
        log.info("training from scratch (model.init is not set)")
    return model


def load_trained_model(cfg: FinetuneModelConfig, path: str):
    """A classifier holding fine-tuned weights: unlike ``build_initial_model``, a missing head is an error."""
    model = build_model(cfg)
    report = load_into_classifier(model, checkpoint.read_checkpoint(path))
    if report.fresh:
        raise ValueError(f"{path} has no classification head for {cfg.num_classes} classes (it lacks "
                         f"{', '.join(report.fresh)}): these weights are not fine-tuned for this task")
    return model


def multiview_test_set(cfg: FinetuneConfig) -> EvalClips:
    """The multi-view test set (``data.test_temporal_views`` × ``data.eval_augment.num_spatial_views``)."""
    encoder = cfg.model.encoder
    return EvalClips(read_split(cfg.data, "test"), cfg.data, clip_len=encoder.num_frames, size=encoder.img_size)


def validation_set(cfg: FinetuneConfig) -> EvalClips:
    """The validation set: one temporal view and one centre crop per video, deterministic."""
    data = replace(cfg.data, eval_augment=replace(cfg.data.eval_augment, num_spatial_views=1))
    encoder = cfg.model.encoder
    return EvalClips(read_split(cfg.data, "val"), data, clip_len=encoder.num_frames, size=encoder.img_size,
                     temporal_views=1)


def score(cfg: FinetuneConfig, forward, dataset: EvalClips, device: torch.device, dtype: torch.dtype,
          collective_forward: bool = False) -> dict:
    """``engine.evaluate.evaluate_clips`` with this run's batch, workers and normalization."""
    return evaluate_clips(forward, dataset, num_classes=cfg.model.num_classes, micro_batch=cfg.eval.micro_batch,
                          num_workers=cfg.batch.num_workers, device=device, dtype=dtype,
                          collective_forward=collective_forward)


def describe_scores(title: str, summary: dict) -> str:
    """A few lines for the log: accuracies, how many videos were scored, which could not be read."""
    lines = [f"{title}: top-1 {100 * summary['top1']:.2f}  top-5 {100 * summary['top5']:.2f}  mean class "
             f"{100 * summary['mean_class_accuracy']:.2f}  ({summary['num_scored']} of {summary['num_videos']} "
             "videos scored)"]
    lines += [f"  unreadable: {path}: {reason}" for path, reason in summary["unscored"]]
    lines += [f"  partly scored ({views} views): {path}: {reason}" for path, views, reason in
              summary["partially_scored"]]
    return "\n".join(lines)


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# What a run exports: the last weights, the best-validated weights, for the model and its EMA.
EXPORTS = {"model": ("weights.pt", "best.pt"), "ema": ("weights_ema.pt", "best_ema.pt")}


class FinetuneTask(Task):
    """Classification fine-tuning for ``engine.loop.train``: validation every ``eval.every_epochs`` with the
    best weights exported, and the multi-view test of the last weights (model and EMA) at the end."""

    config_class = FinetuneConfig
    outputs = ("config.yaml, derived.yaml, metrics.jsonl, tb/, checkpoints/, weights.pt, best.pt, "
               "test_results.json")

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        torch.manual_seed(cfg.run.seed)  # the same fresh head on every rank and in every run
        self.model = build_initial_model(cfg.model)
        self.train_set = train_clips(cfg.data, cfg.model.encoder, cfg.batch.repeats, cfg.run.seed)
        self.mixup = build_mixup(cfg.mixup, cfg.model.num_classes)
        self.ema = None
        if cfg.ema.decay is not None:
            from timm.utils import ModelEmaV3

            # float32 whatever the engine's precision: a 0.9999 average vanishes in bf16 steps.
            self.ema = ModelEmaV3(self.model, decay=cfg.ema.decay, dtype=torch.float32)
        self.val_set = validation_set(cfg) if cfg.eval.every_epochs else None
        self.step = 0  # optimizer steps taken: the position of the mask-ratio schedule
        self.best: dict[str, float] = {}  # variant -> best validation top-1 so far
        self._masks: dict[int, object] = {}  # hidden-token count -> mask generator

    # ---- training --------------------------------------------------------------------------------------------

    def _mask(self, batch: int, device: torch.device, generator: torch.Generator) -> Optional[torch.Tensor]:
        """MAE-ST fine-tuning mask for the current step, or None once the annealed ratio hides no token."""
        grid = self.cfg.model.encoder.grid
        num_tokens = math.prod(grid)
        hidden = int(num_tokens * self.cfg.mask.ratio_at(self.step, self.derived.total_steps))
        if hidden == 0:
            return None
        if hidden not in self._masks:
            # the midpoint ratio truncates back to exactly `hidden` tokens
            ratio = (hidden + 0.5) / num_tokens
            self._masks[hidden] = build_mask_generator(MaskConfig(kind=self.cfg.mask.kind, ratio=ratio), grid)
        mask, _ = self._masks[hidden](batch, device=device, generator=generator)
        return mask

    def loss(self, engine, batch: dict, generator: torch.Generator) -> torch.Tensor:
        # float32 (mixup blends in full precision); the model casts the clip to its weights' dtype.
        video = model_input(batch["video"], self.cfg.data, torch.float32)
        targets = batch["label"]
        if self.mixup is not None:
            if video.shape[0] % 2:
                # An unreadable video left an odd batch and mixup pairs clips: the last clip goes twice. Dropping
                # it instead would leave nothing of a batch of one clip (a NaN loss, which stops the run).
                video, targets = torch.cat([video, video[-1:]]), torch.cat([targets, targets[-1:]])
            video, targets = self.mixup(video, targets)
        logits = engine(video, self._mask(video.shape[0], video.device, generator))
        return classification_loss(logits.float(), targets, self.cfg.mixup.label_smoothing)

    def after_step(self, engine, step: int) -> None:
        self.step = step
        if self.ema is not None:
            self._ema_to(engine.device)
            self.ema.update(engine.module, step=step)

    def _ema_to(self, device: torch.device) -> None:
        if next(self.ema.module.parameters()).device != device:
            self.ema.module.to(device)

    def token_grid(self) -> tuple[int, int, int]:
        return self.cfg.model.encoder.grid

    def train_flops_per_clip(self) -> float:
        # Dense count: annealed masking makes the first epochs cheaper than this.
        return 3 * self.model.forward_flops(self.cfg.model.encoder.grid)

    def state_dict(self) -> dict:
        state = {"step": self.step, "best": dict(self.best)}
        if self.ema is not None:
            state["ema"] = {k: v.cpu() for k, v in self.ema.module.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state.get("step", 0)
        self.best = dict(state.get("best", {}))
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])

    # ---- evaluation ------------------------------------------------------------------------------------------

    def _variants(self, engine):
        """(name, forward, input dtype, collective forward) of what is evaluated: the model, and its EMA."""
        yield "model", engine, ds.input_dtype(engine), ds.parameters_partitioned(engine)
        if self.ema is not None:
            self._ema_to(engine.device)
            yield "ema", self.ema.module, torch.float32, False

    def _weights(self, engine, variant: str) -> dict[str, torch.Tensor]:
        """Whole weights of a variant (a collective under ZeRO-3: call on every rank)."""
        if variant == "ema":
            return {k: v.detach().float().cpu() for k, v in self.ema.module.state_dict().items()}
        return ds.full_parameters(engine)

    def _score_all(self, engine, dataset: EvalClips) -> dict[str, dict]:
        engine.eval()
        try:
            return {name: score(self.cfg, forward, dataset, engine.device, dtype, collective)
                    for name, forward, dtype, collective in self._variants(engine)}
        finally:
            engine.train()

    def on_epoch_end(self, engine, epoch: int, output_dir: str, generator: torch.Generator) -> Optional[dict]:
        every = self.cfg.eval.every_epochs
        if self.val_set is None or (epoch % every and epoch < self.cfg.optim.epochs):
            return None
        record = {}
        for name, summary in self._score_all(engine, self.val_set).items():
            log.info("%s", describe_scores(f"epoch {epoch} validation ({name})", summary))
            prefix = "val" if name == "model" else f"val_{name}"
            record.update({f"{prefix}_top1": summary["top1"], f"{prefix}_top5": summary["top5"],
                           f"{prefix}_unreadable": len(summary["unscored"])})
            if summary["top1"] > self.best.get(name, -1.0):
                self.best[name] = summary["top1"]
                weights = self._weights(engine, name)
                if is_main_process():
                    path = checkpoint.export_weights(weights, Path(output_dir) / EXPORTS[name][1])
                    log.info("new best %s validation top-1 %.2f: wrote %s", name, 100 * summary["top1"], path)
        return record

    def finish(self, engine, output_dir: str) -> None:
        """Export the last weights (fp32, whole), then run the multi-view test on them and the EMA's."""
        out = Path(output_dir)
        step = export_final_weights(engine, out, EXPORTS["model"][0])
        if self.ema is not None:
            ema_weights = self._weights(engine, "ema")
            if is_main_process():
                checkpoint.export_weights(ema_weights, out / EXPORTS["ema"][0])
        if not self.cfg.eval.final_test:
            return
        results = self._score_all(engine, multiview_test_set(self.cfg))
        views = f"{self.cfg.data.test_temporal_views}x{self.cfg.data.eval_augment.num_spatial_views} views"
        for name, summary in results.items():
            log.info("%s", describe_scores(f"test, {views} ({name})", summary))
        if is_main_process():
            write_json(out / "test_results.json", {"step": step, "views": views, **results})
            log.info("wrote %s", out / "test_results.json")


def evaluate_weights(cfg: FinetuneConfig, path: str, device: torch.device) -> dict:
    """The multi-view test of fine-tuned weights, without training (``finetune.py --eval-only``); every rank
    calls it, each scoring its share."""
    model = load_trained_model(cfg.model, path).to(device).eval()
    return score(cfg, model, multiview_test_set(cfg), device, torch.float32)

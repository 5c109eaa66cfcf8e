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

from datasets.transforms import AugmentConfig
from datasets.video_dataset import DataConfig, EvalClips, normalize
from engine import checkpoint, ds
from engine.config import BatchConfig, Derived, OptimConfig, RunConfig, derive
from engine.data import read_split, train_clips
from engine.dist import is_main_process
from engine.evaluate import evaluate_clips
from engine.mixup import MixupConfig, build_mixup, classification_loss
from models.convert import load_into_classifier
from models.masking import MaskConfig, build_mask_generator
from models.vit import ClassifierConfig, ViTConfig, build_classifier

log = logging.getLogger("finetune")


@dataclass
class FinetuneModelConfig(ClassifierConfig):
    # weights to start from: our pre-training export, a fine-tuned checkpoint, an official VideoMAE / V2
    # release or a Hugging Face VideoMAE checkpoint; None trains from scratch
    init: Optional[str] = None


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

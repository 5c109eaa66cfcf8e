"""Masked video pre-training: the task's configuration and the pieces it builds from it.

The training loop itself is shared by every task; this module only says what pre-training is made of.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets.video_dataset import DataConfig, TrainClips, load_records
from engine.config import BatchConfig, Derived, OptimConfig, RunConfig, derive
from models.masking import MaskConfig, build_mask_generator
from models.videomae import PretrainModelConfig, VideoMAE


@dataclass
class PretrainConfig:
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)  # encoder, decoder, targets
    mask: MaskConfig = field(default_factory=MaskConfig)  # which tokens the encoder and decoder drop
    data: DataConfig = field(default_factory=DataConfig)  # videos, clip sampling, augmentation
    batch: BatchConfig = field(default_factory=BatchConfig)  # videos per rank and step
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and its schedule
    run: RunConfig = field(default_factory=RunConfig)  # output directory, seed, logging


def derive_pretrain(cfg: PretrainConfig, world_size: int, num_train_samples: int | None = None) -> Derived:
    return derive(cfg.batch, cfg.optim, world_size, num_train_samples=num_train_samples,
                  token_grid=cfg.model.encoder.grid)


def build_model_and_masks(cfg: PretrainConfig):
    """The pre-training model and the mask generator for its token grid."""
    model = VideoMAE(cfg.model, pixel_mean=cfg.data.mean, pixel_std=cfg.data.std)
    return model, build_mask_generator(cfg.mask, cfg.model.encoder.grid)


def build_train_clips(cfg: PretrainConfig) -> TrainClips:
    """uint8 training clips shaped for the encoder: its frame count and input size."""
    encoder = cfg.model.encoder
    return TrainClips(load_records(cfg.data, "train"), cfg.data, clip_len=encoder.num_frames,
                      size=encoder.img_size, repeats=cfg.batch.repeats, seed=cfg.run.seed)

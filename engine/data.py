"""The splits a task trains and evaluates on, as a training process builds them: rank 0 reads (or generates) an
annotation split first; clips are shaped for the encoder (its frame count and input size)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from datasets.annotations import VideoRecord
from datasets.video_dataset import DataConfig, EvalClips, TrainClips, load_records
from engine.dist import barrier, is_main_process
from models.vit import ViTConfig

T = TypeVar("T")


def rank_zero_first(make: Callable[..., T], *args) -> T:
    """``make(*args)`` on rank 0 first while the other ranks wait, then on them: what writes files once (a
    generated dataset) is written by one process, and the others read what it wrote."""
    if not is_main_process():
        barrier()
    result = make(*args)
    if is_main_process():
        barrier()
    return result


def read_split(data: DataConfig, split: str) -> list[VideoRecord]:
    """The records of ``split``; rank 0 reads (and, for the built-in dataset, generates) them first."""
    return rank_zero_first(load_records, data, split)


def train_clips(data: DataConfig, encoder: ViTConfig, repeats: int, seed: int) -> TrainClips:
    """uint8 training clips shaped for ``encoder``: its frame count and input size."""
    return TrainClips(read_split(data, "train"), data, clip_len=encoder.num_frames, size=encoder.img_size,
                      repeats=repeats, seed=seed)


def multiview_test_set(data: DataConfig, encoder: ViTConfig) -> EvalClips:
    """The multi-view test set (``data.test_temporal_views`` × ``data.eval_augment.num_spatial_views``)."""
    return EvalClips(read_split(data, "test"), data, clip_len=encoder.num_frames, size=encoder.img_size)


def validation_set(data: DataConfig, encoder: ViTConfig) -> EvalClips:
    """The validation set: one temporal view and one centre crop per video, deterministic."""
    centre = replace(data, eval_augment=replace(data.eval_augment, num_spatial_views=1))
    return EvalClips(read_split(data, "val"), centre, clip_len=encoder.num_frames, size=encoder.img_size,
                     temporal_views=1)

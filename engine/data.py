"""Datasets as a training process builds them: rank 0 reads (or generates) an annotation split first."""

from __future__ import annotations

from datasets.annotations import VideoRecord
from datasets.video_dataset import DataConfig, TrainClips, load_records
from engine.dist import barrier, is_main_process
from models.vit import ViTConfig


def read_split(data: DataConfig, split: str) -> list[VideoRecord]:
    """The records of ``split``; rank 0 reads (and, for the built-in dataset, generates) them first while the
    other ranks wait, so no two processes write the same files."""
    if not is_main_process():
        barrier()
    records = load_records(data, split)
    if is_main_process():
        barrier()
    return records


def train_clips(data: DataConfig, encoder: ViTConfig, repeats: int, seed: int) -> TrainClips:
    """uint8 training clips shaped for ``encoder``: its frame count and input size."""
    return TrainClips(read_split(data, "train"), data, clip_len=encoder.num_frames, size=encoder.img_size,
                      repeats=repeats, seed=seed)

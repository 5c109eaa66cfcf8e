"""Datasets of uint8 clips: annotation records → decoded frames → sampled clips → augmented views.

Every item is a dict ``{"video": uint8 (V, C, T, H, W), "label": int, "index": int, "view": int}`` where V is
the number of clips cut from one decode (repeated sampling in training, spatial crops in testing), or a
``Failure`` when the video could not be read. ``collate_clips`` flattens V into the batch and passes the
failures on, so the training loop can count and name them and the evaluator can list the videos it could not
score: an unreadable video is never replaced by another one.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch.utils.data import Dataset

from datasets.annotations import AnnotationError, AnnotationFormat, VideoRecord, read_annotations
from datasets.decode import VideoReadError, open_video
from datasets.sampling import (
    clip_span,
    multiview_segment_indices,
    multiview_temporal_indices,
    repeated_dense_indices,
    segment_indices,
    union_indices,
)
from datasets.synthetic.motion import SyntheticSpec, is_complete
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, build_eval_views, build_transform


@dataclass
class DataConfig:
    train_list: str = ""  # training annotation list, or a folder of videos for unlabeled pre-training
    val_list: str = ""  # validation annotation list (and the test list when `test_list` is not set)
    test_list: str = ""  # multi-view test annotation list; empty = `val_list` (VideoMAE tests K400 on val)
    root: Optional[str] = None  # folder that relative paths in the lists are joined to
    synthetic: Optional[SyntheticSpec] = None  # the built-in dataset: generated into `root` when missing,
    #                                            its train.csv/val.csv used when the lists are not set
    format: AnnotationFormat = "video"  # list format: video | video_v2 | frames_start_total | frames_total_label
    num_classes: Optional[int] = None  # when set, labels are checked against it at load time
    backend: Literal["pyav", "decord", "frames"] = "pyav"  # video decoder (pyav: exact on every file tested;
    #                                                         decord: refuses files it mis-indexes), or JPEG folders
    frame_template: str = "img_{:05d}.jpg"  # frame folders: file name of frame i
    first_frame_index: int = 1  # frame folders: number of the first file (1 for SSv2 lists, 0 for V2 lists)
    sampling: Literal["dense", "segments"] = "dense"  # frames at a fixed stride, or one per segment (TSN, SSv2)
    sampling_rate: int = 4  # dense sampling: stride between sampled frames
    short_video: Literal["loop", "repeat_last", "skip"] = "loop"  # a video shorter than a clip's span
    # repeated sampling (batch.repeats > 1, dense): the most frames between the first clip's start and any other's
    # (VIMPAC's bound on the distance between a video's two clips); null = independent starts
    repeat_max_distance: Optional[int] = None
    test_temporal_views: int = 1  # testing: clips along time per video (K in K×3 views)
    train_augment: AugmentConfig = field(default_factory=AugmentConfig)  # training clips
    eval_augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(kind="eval"))  # test views
    mean: tuple[float, ...] = IMAGENET_MEAN  # per-channel mean for normalization (applied on the device)
    std: tuple[float, ...] = IMAGENET_STD  # per-channel std for normalization (applied on the device)
    # after normalization, subtract every pixel's mean over the clip's frames: what stays still (a static
    # background) is removed and what moves remains; for motion-defined data seen by very small models
    subtract_clip_mean: bool = False

    def __post_init__(self):
        if self.sampling_rate < 1 or self.test_temporal_views < 1:
            raise ValueError("sampling_rate and test_temporal_views must be >= 1")
        if self.repeat_max_distance is not None and self.repeat_max_distance < 0:
            raise ValueError(f"repeat_max_distance must be >= 0 or null, got {self.repeat_max_distance}")
        if self.train_augment.kind == "eval":
            raise ValueError("train_augment.kind must be a training pipeline, not 'eval'")
        if self.eval_augment.kind != "eval":
            raise ValueError("eval_augment.kind must be 'eval'")
        if self.synthetic is not None and not self.root:
            raise ValueError("the synthetic dataset needs `root`, the folder it is generated into")


@dataclass(frozen=True)
class Failure:
    """A video that could not be turned into clips, and why."""

    index: int
    path: str
    reason: str


class _ClipSource(Dataset):
    """Reads the frames one item needs, once, whatever the number of clips cut from them."""

    clips_per_item = 1  # clips (or crops) one item holds

    def __init__(self, records: list[VideoRecord], cfg: DataConfig, clip_len: int, size: int):
        self.records = records
        self.cfg = cfg
        self.clip_len = clip_len
        self.size = size

    def blank_item(self) -> dict:
        """An item shaped like a decoded video's, all zeros: what a rank runs, with zero weight in training and
        unscored in evaluation, when every video of its micro-batch failed, so that it still takes part in the
        collectives of the step (DeepSpeed's reductions, ZeRO-3's parameter gathers)."""
        video = torch.zeros(self.clips_per_item, 3, self.clip_len, self.size, self.size, dtype=torch.uint8)
        return {"video": video, "label": 0, "index": -1, "view": 0}

    def _decode_clips(self, record: VideoRecord, choose) -> list[torch.Tensor]:
        """``choose(num_frames) -> list of index lists``; returns uint8 clips (T, C, H, W), one per list."""
        cfg = self.cfg
        with open_video(record, cfg.backend, frame_template=cfg.frame_template,
                        first_frame_index=cfg.first_frame_index) as video:
            self._check_length(video.num_frames, record.path)
            clips = choose(video.num_frames)
            frames, positions = union_indices(clips)
            decoded = torch.from_numpy(video.get_frames(frames)).permute(0, 3, 1, 2)  # (U, C, H, W)
        return [_take(decoded, pos) for pos in positions]

    def _check_length(self, num_frames: int, path: str) -> None:
        if self.cfg.short_video == "skip" and self.cfg.sampling == "dense":
            span = clip_span(self.clip_len, self.cfg.sampling_rate)
            if num_frames < span:
                raise VideoReadError(path, f"{num_frames} frames, shorter than the clip span of {span}")

    @property
    def _short_policy(self) -> str:
        """How a clip is cut from a short video; with ``skip`` such videos never get this far."""
        return "loop" if self.cfg.short_video == "skip" else self.cfg.short_video

    def _failure(self, index: int, error: VideoReadError) -> Failure:
        return Failure(index, self.records[index].path, error.reason)


class TrainClips(_ClipSource):
    """Training clips: ``repeats`` random clips per decoded video (MAE-ST repeated sampling).

    Augmentations draw from a generator seeded by (seed, epoch, index), so an epoch's clips are the same
    whichever worker builds them and after a resume.
    """

    def __init__(self, records, cfg: DataConfig, clip_len: int, size: int, repeats: int = 1, seed: int = 0):
        super().__init__(records, cfg, clip_len, size)
        self.repeats = repeats
        self.seed = seed
        self.epoch = 0
        self.transform = build_transform(cfg.train_augment, size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _choose(self, num_frames: int, rng: random.Random) -> list[list[int]]:
        cfg = self.cfg
        if cfg.sampling == "segments":
            return [segment_indices(num_frames, self.clip_len, rng) for _ in range(self.repeats)]
        return repeated_dense_indices(num_frames, self.clip_len, cfg.sampling_rate, self.repeats, rng,
                                      self._short_policy, cfg.repeat_max_distance)

    @property
    def clips_per_item(self) -> int:
        return self.repeats

    def __getitem__(self, index: int):
        return self.item(index, self.epoch)

    def item(self, index: int, epoch: int, view: int = 0):
        """Video ``index``'s clips as epoch ``epoch`` draws them (``view``: what the item's ``view`` says)."""
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        record = self.records[index]
        try:
            clips = self._decode_clips(record, lambda n: self._choose(n, rng))
        except VideoReadError as error:
            return self._failure(index, error)
        views = torch.stack([self.transform(clip, rng) for clip in clips])  # (V, T, C, H, W)
        return {"video": views.transpose(1, 2).contiguous(), "label": record.label, "index": index, "view": view}


class AugmentedViews(Dataset):
    """``views`` augmented draws of every training video, as ``TrainClips`` gives them in epochs 0, 1, ...:
    item ``j`` is view ``j // N`` of video ``j % N`` (N videos). What a probe caches of its training set."""

    def __init__(self, clips: TrainClips, views: int):
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.clips, self.views = clips, views
        self.records = clips.records

    def __len__(self) -> int:
        return len(self.clips) * self.views

    @property
    def clips_per_item(self) -> int:
        return self.clips.clips_per_item

    def blank_item(self) -> dict:
        return self.clips.blank_item()

    def __getitem__(self, item: int):
        view, index = divmod(item, len(self.clips))
        return self.clips.item(index, view, view)


class EvalClips(_ClipSource):
    """Deterministic test views: item ``i`` is temporal view ``i % K`` of video ``i // K``, decoding only its
    own frames, cut into 1 or 3 spatial crops. ``K = test_temporal_views`` (1 for validation)."""

    def __init__(self, records, cfg: DataConfig, clip_len: int, size: int, temporal_views: Optional[int] = None):
        super().__init__(records, cfg, clip_len, size)
        self.temporal_views = temporal_views or cfg.test_temporal_views
        self.num_spatial_views = cfg.eval_augment.num_spatial_views
        self.views = build_eval_views(cfg.eval_augment, size)

    def __len__(self) -> int:
        return len(self.records) * self.temporal_views

    @property
    def clips_per_item(self) -> int:
        return self.num_spatial_views

    @property
    def views_per_video(self) -> int:
        """Clips a video is scored on when nothing fails: temporal views × spatial crops."""
        return self.temporal_views * self.num_spatial_views

    def _choose(self, num_frames: int, view: int) -> list[list[int]]:
        cfg, k = self.cfg, self.temporal_views
        if cfg.sampling == "segments":
            return [multiview_segment_indices(num_frames, self.clip_len, k)[view]]
        return [multiview_temporal_indices(num_frames, self.clip_len, cfg.sampling_rate, k, self._short_policy)[view]]

    def __getitem__(self, item: int):
        index, view = divmod(item, self.temporal_views)
        record = self.records[index]
        try:
            (clip,) = self._decode_clips(record, lambda n: self._choose(n, view))
        except VideoReadError as error:
            return self._failure(index, error)
        crops = torch.stack(self.views(clip))  # (S, T, C, H, W)
        return {"video": crops.transpose(1, 2).contiguous(), "label": record.label, "index": index, "view": view}


def normalize(video: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32,
              subtract_clip_mean: bool = False) -> torch.Tensor:
    """uint8 clips (B, C, T, H, W) → ``dtype`` scaled to [0, 1] and normalized per channel (and, with
    ``subtract_clip_mean``, minus each pixel's mean over the T frames); run on the device, so workers ship 4×
    fewer bytes than float32 would take."""
    shape = (1, -1, 1, 1, 1)
    mean = torch.as_tensor(mean, device=video.device).view(shape)
    std = torch.as_tensor(std, device=video.device).view(shape)
    out = (video.float() / 255 - mean) / std
    if subtract_clip_mean:
        out = out - out.mean(dim=2, keepdim=True)
    return out.to(dtype)


def unnormalize(normalized: torch.Tensor, mean, std) -> torch.Tensor:
    """``normalize`` undone (its clip-mean subtraction cannot be): [0, 1] float32 pixels of normalized values whose
    channels are dim 1 (clips B, C, T, H, W or frames B, C, H, W), for pictures."""
    shape = (1, -1) + (1,) * (normalized.dim() - 2)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=normalized.device).view(shape)
    std = torch.as_tensor(std, dtype=torch.float32, device=normalized.device).view(shape)
    return normalized.float() * std + mean


def model_input(video: torch.Tensor, cfg: DataConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What the model sees of uint8 clips (B, C, T, H, W): ``normalize`` with the settings of ``cfg`` (any config
    with ``mean``, ``std`` and ``subtract_clip_mean``: the AVA data config has them too)."""
    return normalize(video, cfg.mean, cfg.std, dtype, cfg.subtract_clip_mean)


def _take(frames: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """``frames[positions]``, as a view when the positions are consecutive (a single clip's usual case):
    gathering would copy every full-resolution frame before the crop throws most of it away."""
    first = positions[0]
    if positions == list(range(first, first + len(positions))):
        return frames[first : first + len(positions)]
    return frames[positions]


def collate_clips(items: list) -> dict:
    """Stack items into a batch: video uint8 (ΣV, C, T, H, W); label, index, view (ΣV,); failures list.

    With every item failed, ``video`` is None: the caller decides (the training loop, which must still take
    part in collectives, trains on the dataset's ``blank_item`` with zero weight; the evaluator only records the
    failures).
    """
    good = [item for item in items if not isinstance(item, Failure)]
    failures = [item for item in items if isinstance(item, Failure)]
    if not good:
        return {"video": None, "label": None, "index": None, "view": None, "failures": failures}
    counts = torch.tensor([item["video"].shape[0] for item in good])

    def per_clip(key):
        return torch.tensor([item[key] for item in good]).repeat_interleave(counts)

    return {
        "video": torch.cat([item["video"] for item in good]),
        "label": per_clip("label"),
        "index": per_clip("index"),
        "view": per_clip("view"),
        "failures": failures,
    }


def load_records(cfg: DataConfig, split: Literal["train", "val", "test"]) -> list[VideoRecord]:
    """The records of a split; a folder given as ``train_list`` is scanned for videos (unlabeled). The test
    split is ``test_list``, or ``val_list`` when that is empty.

    With ``cfg.synthetic`` the lists default to those of the built-in dataset in ``cfg.root``, which must have been
    generated first (``engine.data.prepare_synthetic``, the set-up step of every entry point): reading never writes.
    """
    lists = {"train": cfg.train_list, "val": cfg.val_list, "test": cfg.test_list or cfg.val_list}
    path = lists[split]
    if cfg.synthetic is not None:
        if not is_complete(cfg.root, cfg.synthetic):
            raise AnnotationError(f"data.synthetic is set, but {cfg.root} holds no complete synthetic dataset of that "
                                  "spec: an entry point generates it before reading it (engine.data.prepare_synthetic)")
        path = path or os.path.join(cfg.root, "train.csv" if split == "train" else "val.csv")
    if not path:
        raise ValueError(f"data.{'train' if split == 'train' else 'val'}_list is not set")
    return read_annotations(path, format=cfg.format, data_root=cfg.root, num_classes=cfg.num_classes)

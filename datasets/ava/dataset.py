"""AVA keyframes as training and test items: a clip centred on each keyframe, its person boxes moved with the pixels,
and multi-hot action targets.

Time base: AVA's frames are extracted at ``fps`` from the 15-minute cut that starts at second ``first_second`` (900)
of the movie, numbered from 1, so the keyframe of second ``s`` is frame ``(s - first_second) * fps + 1`` — the file
``<frames>/<video_id>/<video_id>_%06d.jpg`` of that number. A clip takes ``clip_len`` frames at stride
``sampling_rate`` around it (``center + (i - clip_len // 2) * sampling_rate``, 16×4 spans center − 32 … center + 28
as in SlowFast and VideoMAE), clamped to the frames the video has.

Or straight from the video files (``source="video"``, ``<videos_dir>/<video_id>.<ext>``), without extracting
~100 GB of frames first: the same clip on the same time grid. Tick k of the grid is k / ``fps`` seconds after the
file's first frame (which shows movie second ``first_second``: 900 for the 15-minute cuts, 0 for whole movies), and
shows the frame FFmpeg's fps filter would output there (``frames_at_ticks``) — the frame ``ffmpeg -r 30``
extraction writes — whatever the file's own frame rate, constant or variable (frame start times from the
container, ``VideoSource.frame_times``). A video decoded losslessly gives exactly the folder's items
(tests/test_ava_video.py).

Boxes come in normalized x1, y1, x2, y2 and leave as pixels of the clip the model sees. Training: the short side is
resized to ``train_short_side``, a random ``crop`` × ``crop`` square is cut and flipped with probability 0.5; a box
is clipped to the crop and dropped when less than ``min_box_side`` pixels of it remain in either direction (it left
the crop); optionally each ground-truth box is first jittered (``box_jitter``, as VideoMAE trains). Testing: the
whole frame, short side ``test_short_side``, nothing cropped, so the clip is not square.
"""

from __future__ import annotations

import math
import os
import random
import weakref
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.annotations import VideoRecord
from datasets.ava.files import BoxTable
from datasets.decode import VideoReadError, open_video
from datasets.transforms import resize_short_side
from datasets.video_dataset import Failure


@dataclass
class AVAClipConfig:
    """Where the frames are and how a keyframe becomes a clip."""

    # where the clips come from: "frames" (folders of extracted JPEG frames) or "video" (the video files, read by
    # timestamp: no extraction needed)
    source: Literal["frames", "video"] = "frames"
    frames_dir: str = "frames"  # folder of per-video frame folders: <frames_dir>/<video_id>/<video_id>_%06d.jpg
    frame_template: str = "{video_id}_{number:06d}.jpg"  # file name of frame `number` (1-based) of a video
    videos_dir: str = "videos"  # source "video": folder of <video_id>.<any extension> (mkv, mp4, webm, ...)
    video_backend: Literal["pyav", "decord"] = "pyav"  # source "video": decoder (datasets/decode.py)
    # frames per second of the extracted frames (AVA: 30); for source "video", the time grid the clip's
    # sampling_rate counts in (30 reads the frames `ffmpeg -r 30` would have extracted)
    fps: int = 30
    # movie second that frame 1 (or a video file's first frame) shows: 900 for AVA's frames and for videos cut to
    # the 15-minute segment (ffmpeg -ss 900 -t 901); 0 for the whole movies as downloaded
    first_second: int = 900
    clip_len: int = 16  # frames per clip
    sampling_rate: int = 4  # stride between the clip's frames
    train_short_side: int = 256  # training: short side before the random crop
    crop: int = 224  # training: side of the random square crop
    flip: bool = True  # training: horizontal flip with probability 0.5
    test_short_side: int = 256  # testing: short side of the whole frame (no crop)
    min_box_side: float = 1.0  # training: a box with less than this many pixels left inside the crop is dropped
    # training: each side of a ground-truth box moves by a uniform fraction of the box's width (x sides) or height
    # (y sides) in [-in, +out], outwards positive: (x_out, x_in, y_out, y_in); VideoMAE (0.2, 0.1, 0.1, 0.05)
    box_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    num_classes: int = 80  # target columns: action id a -> column a - 1

    def __post_init__(self) -> None:
        if self.clip_len < 1 or self.sampling_rate < 1 or self.fps < 1:
            raise ValueError("clip_len, sampling_rate and fps must be >= 1")
        if self.crop > self.train_short_side:
            raise ValueError(f"crop {self.crop} does not fit a short side of {self.train_short_side}")
        if self.source not in ("frames", "video"):
            raise ValueError(f"source must be 'frames' or 'video', got {self.source!r}")
        if len(self.box_jitter) != 4 or not all(0 <= j < 0.5 for j in self.box_jitter):
            raise ValueError(f"box_jitter is (x_out, x_in, y_out, y_in), each in [0, 0.5), got {self.box_jitter}")


@dataclass(frozen=True)
class Keyframe:
    """One keyframe to score: its boxes (normalized) and, for training, their multi-hot actions."""

    video_id: str
    timestamp: int
    boxes: np.ndarray  # float32 (K, 4), x1, y1, x2, y2 in [0, 1]
    labels: np.ndarray  # float32 (K, num_classes); all zero for test boxes, whose actions are what is predicted
    scores: np.ndarray  # float32 (K,): the detector's score for test boxes, 1 for ground truth

    @property
    def key(self) -> str:
        return f"{self.video_id},{self.timestamp:04d}"


def group_keyframes(table: BoxTable, num_classes: int, excluded: frozenset[str] | set[str] = frozenset()
                    ) -> list[Keyframe]:
    """Rows of a box table as keyframes, in (video, timestamp) order. Rows with the same box (same coordinates, the
    repeated rows of one person with several actions) become one box whose target has each action set; rows with
    no action (detections) give boxes with all-zero targets. Excluded keyframes are left out."""
    keys = table.keys()
    keep = ~np.isin(keys, list(excluded)) if excluded else np.ones(len(table), dtype=bool)
    order = np.lexsort((table.timestamp, table.video_id.astype(str)))
    frames: dict[str, dict[tuple, list]] = {}
    meta: dict[str, tuple[str, int]] = {}
    for row in order[keep[order]]:
        key = keys[row]
        meta.setdefault(key, (str(table.video_id[row]), int(table.timestamp[row])))
        box = tuple(table.boxes[row].tolist())
        entry = frames.setdefault(key, {}).setdefault(box, [np.zeros(num_classes, np.float32), 1.0])
        action = int(table.action[row])
        if action > 0:
            if action > num_classes:
                raise ValueError(f"{table.source}: action id {action} is beyond num_classes={num_classes}")
            entry[0][action - 1] = 1.0
        score = float(table.score[row])
        if not math.isnan(score):
            entry[1] = score
    keyframes = []
    for key, boxes in frames.items():
        video_id, timestamp = meta[key]
        coords = np.array(list(boxes), dtype=np.float32).reshape(-1, 4)
        labels = np.stack([entry[0] for entry in boxes.values()])
        scores = np.array([entry[1] for entry in boxes.values()], dtype=np.float32)
        keyframes.append(Keyframe(video_id, timestamp, coords, labels, scores))
    return keyframes


def clip_frame_numbers(keyframe_number: int, clip_len: int, sampling_rate: int, num_frames: int) -> list[int]:
    """1-based frame numbers of the clip centred on ``keyframe_number``, clamped to 1 … ``num_frames``."""
    offsets = (np.arange(clip_len) - clip_len // 2) * sampling_rate
    return np.clip(keyframe_number + offsets, 1, num_frames).tolist()


def frames_at_ticks(ticks: np.ndarray, starts: np.ndarray, rate: float) -> np.ndarray:
    """Index of the frame that FFmpeg's fps filter (``fps=rate``, its default rounding) outputs at each tick of
    1/``rate`` s counted from the first frame: every frame start is rounded to the nearest tick (halves away from
    zero), and tick k shows the last frame whose rounded start is at or before k. Ticks before the first frame
    show the first, ticks after the last frame the last (a clip clamped at the video's ends)."""
    frame_ticks = np.floor(np.asarray(starts, dtype=np.float64) * rate + 0.5 + 1e-9)
    found = np.searchsorted(frame_ticks, np.asarray(ticks), side="right") - 1
    return np.clip(found, 0, len(frame_ticks) - 1)


def keyframe_number(timestamp: int, cfg: AVAClipConfig) -> int:
    return (timestamp - cfg.first_second) * cfg.fps + 1


# ---- boxes that follow the pixels -----------------------------------------------------------------------------


def boxes_to_pixels(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    return boxes * np.array([width, height, width, height], dtype=np.float32)


def crop_boxes(boxes: np.ndarray, top: int, left: int, size: int, min_side: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel boxes moved into a ``size`` square cut at (top, left) and clipped to it; returns (boxes, kept rows)."""
    moved = boxes - np.array([left, top, left, top], dtype=np.float32)
    moved = np.clip(moved, 0, size)
    kept = ((moved[:, 2] - moved[:, 0]) >= min_side) & ((moved[:, 3] - moved[:, 1]) >= min_side)
    return moved[kept], kept


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return flipped


def jitter_boxes(boxes: np.ndarray, jitter: tuple[float, float, float, float], rng: random.Random) -> np.ndarray:
    """Normalized boxes whose sides each moved by a uniform fraction of the box's side in [-in, +out] (outwards
    positive; ``jitter`` = (x_out, x_in, y_out, y_in)), clipped to the frame. Inward moves stay below half a side
    each, so a box never turns inside out."""
    x_out, x_in, y_out, y_in = jitter
    if not any(jitter) or not len(boxes):
        return boxes
    moved = boxes.astype(np.float32).copy()
    for row in moved:
        width, height = row[2] - row[0], row[3] - row[1]
        row[0] -= rng.uniform(-x_in, x_out) * width
        row[2] += rng.uniform(-x_in, x_out) * width
        row[1] -= rng.uniform(-y_in, y_out) * height
        row[3] += rng.uniform(-y_in, y_out) * height
    return np.clip(moved, 0.0, 1.0)


def train_view(clip: torch.Tensor, boxes: np.ndarray, cfg: AVAClipConfig, rng: random.Random):
    """(T, C, H, W) uint8 clip and normalized boxes → the cropped, maybe flipped clip, its pixel boxes, kept rows."""
    boxes = jitter_boxes(boxes, cfg.box_jitter, rng)
    clip = resize_short_side(clip, cfg.train_short_side)
    height, width = clip.shape[-2:]
    top, left = rng.randint(0, height - cfg.crop), rng.randint(0, width - cfg.crop)
    clip = clip[:, :, top:top + cfg.crop, left:left + cfg.crop]
    pixels, kept = crop_boxes(boxes_to_pixels(boxes, height, width), top, left, cfg.crop, cfg.min_box_side)
    if cfg.flip and rng.random() < 0.5:
        clip, pixels = clip.flip(-1), flip_boxes(pixels, cfg.crop)
    return clip, pixels, kept


def full_frame_view(clip: torch.Tensor, boxes: np.ndarray, cfg: AVAClipConfig):
    clip = resize_short_side(clip, cfg.test_short_side)
    return clip, boxes_to_pixels(boxes, *clip.shape[-2:])


# ---- the dataset ----------------------------------------------------------------------------------------------


class AVAKeyframes(Dataset):
    """Items ``{"video": uint8 (C, T, H, W), "boxes": float32 (K, 4) pixels, "labels": float32 (K, classes),
    "scores": (K,), "index": keyframe index}``, or a ``Failure`` naming the keyframe when its frames cannot be read
    (the evaluator lists it as unscored; training skips it like an unreadable video). ``train=True`` draws the
    random crop and flip from (seed, epoch, index), so a resumed run sees the same views."""

    def __init__(self, root: str | os.PathLike, keyframes: list[Keyframe], cfg: AVAClipConfig, *, train: bool,
                 seed: int = 0):
        self.root, self.keyframes, self.cfg, self.train, self.seed = str(root), keyframes, cfg, train, seed
        self.epoch = 0
        self._frame_counts: dict[str, int] = {}
        self._videos: Optional[dict[str, list[str]]] = None
        self._last_video: tuple = (None, None)  # (path, open VideoSource) of the last video read

    def __len__(self) -> int:
        return len(self.keyframes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def frame_folder(self, video_id: str) -> str:
        return os.path.join(self.root, self.cfg.frames_dir, video_id)

    def location(self, video_id: str) -> str:
        """Where a video's clips come from: its frame folder, or its video file (a pattern when there is none)."""
        if self.cfg.source == "frames":
            return self.frame_folder(video_id)
        matches = self._video_files().get(video_id, [])
        return matches[0] if len(matches) == 1 else os.path.join(self.root, self.cfg.videos_dir, f"{video_id}.*")

    def _video_files(self) -> dict[str, list[str]]:
        """{video id: the files of ``videos_dir`` named <video id>.<extension>}, listed once per worker."""
        if self._videos is None:
            folder = os.path.join(self.root, self.cfg.videos_dir)
            self._videos = {}
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                self._videos.setdefault(os.path.splitext(name)[0], []).append(os.path.join(folder, name))
        return self._videos

    def _num_frames(self, video_id: str) -> int:
        """Frames of a video: the run of consecutive numbered files from 1 (counted once per worker)."""
        if video_id not in self._frame_counts:
            folder = self.frame_folder(video_id)
            names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            count = 0
            while self.cfg.frame_template.format(video_id=video_id, number=count + 1) in names:
                count += 1
            self._frame_counts[video_id] = count
        return self._frame_counts[video_id]

    def read_clip(self, keyframe: Keyframe) -> torch.Tensor:
        """uint8 (T, C, H, W) frames around the keyframe."""
        frames = self._read_video(keyframe) if self.cfg.source == "video" else self._read_frames(keyframe)
        return torch.from_numpy(frames).permute(0, 3, 1, 2)

    def _read_frames(self, keyframe: Keyframe) -> np.ndarray:
        folder, cfg = self.frame_folder(keyframe.video_id), self.cfg
        count = self._num_frames(keyframe.video_id)
        if count == 0:
            raise VideoReadError(folder, "has no frames named like "
                                 + cfg.frame_template.format(video_id=keyframe.video_id, number=1))
        center = keyframe_number(keyframe.timestamp, cfg)
        if not 1 <= center <= count:
            raise VideoReadError(folder, f"keyframe {keyframe.key} is frame {center}, but the folder holds frames "
                                         f"1-{count} (fps {cfg.fps}, first second {cfg.first_second})")
        numbers = clip_frame_numbers(center, cfg.clip_len, cfg.sampling_rate, count)
        source = open_video(VideoRecord(folder, num_frames=count), "frames",
                            frame_template=_numbered(cfg.frame_template, keyframe.video_id), first_frame_index=1)
        with source:
            return source.get_frames([n - 1 for n in numbers])

    def _open(self, path: str):
        """The video file opened for reading, kept open for the next keyframe: test keyframes come video by video,
        and opening indexes every packet of the file (63 ms for 5 minutes at 30 fps, 1.5 s for a 2-hour movie)."""
        cached_path, video = self._last_video
        if cached_path == path:
            return video
        self.close_video()
        video = open_video(path, self.cfg.video_backend)
        self._last_video = (path, video)
        _WITH_OPEN_VIDEO.add(self)
        return video

    def close_video(self) -> None:
        video = self._last_video[1]
        self._last_video = (None, None)
        if video is not None:
            video.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_last_video": (None, None)}  # an open file does not travel to a worker

    def _read_video(self, keyframe: Keyframe) -> np.ndarray:
        """The clip read from the video file by time: on the ``fps`` grid from its first frame, each tick shows
        the frame that FFmpeg's fps filter outputs there (``frames_at_ticks``), so the clip is the one the frames
        ``ffmpeg -r fps`` extracts would give, whatever the file's own frame rate, variable or not."""
        cfg, path = self.cfg, self.location(keyframe.video_id)
        matches = self._video_files().get(keyframe.video_id, [])
        if len(matches) != 1:
            raise VideoReadError(path, "no such video file" if not matches
                                 else "several files of this video: " + ", ".join(matches))
        video = self._open(path)
        starts = video.frame_times()
        frame_duration = 1 / video.fps if math.isfinite(video.fps) and video.fps > 0 else 0.0
        center = (keyframe.timestamp - cfg.first_second) * cfg.fps  # tick of the keyframe
        if not 0 <= center / cfg.fps <= starts[-1] + frame_duration:
            raise VideoReadError(path, f"keyframe {keyframe.key} is at {center / cfg.fps:.3f} s of the file "
                                       f"(first second {cfg.first_second}), which shows 0-"
                                       f"{starts[-1] + frame_duration:.3f} s")
        ticks = center + (np.arange(cfg.clip_len) - cfg.clip_len // 2) * cfg.sampling_rate
        return video.get_frames(frames_at_ticks(ticks, starts, cfg.fps))

    def __getitem__(self, index: int):
        keyframe = self.keyframes[index]
        try:
            clip = self.read_clip(keyframe)
        except (VideoReadError, OSError, ValueError) as error:
            return Failure(index, f"{self.location(keyframe.video_id)} ({keyframe.key})", str(error))
        if self.train:
            rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
            clip, boxes, kept = train_view(clip, keyframe.boxes, self.cfg, rng)
            labels, scores = keyframe.labels[kept], keyframe.scores[kept]
        else:
            clip, boxes = full_frame_view(clip, keyframe.boxes, self.cfg)
            labels, scores = keyframe.labels, keyframe.scores
        return {"video": clip.permute(1, 0, 2, 3).contiguous(), "boxes": torch.from_numpy(boxes),
                "labels": torch.from_numpy(labels), "scores": torch.from_numpy(scores), "index": index}


# Datasets holding an open video, closed before this process forks (DataLoader workers): FFmpeg state copied into a
# child cannot be used there, and even freeing it there can hang the child.
_WITH_OPEN_VIDEO: weakref.WeakSet = weakref.WeakSet()


def _close_videos_before_fork() -> None:
    for dataset in list(_WITH_OPEN_VIDEO):
        dataset.close_video()
    _WITH_OPEN_VIDEO.clear()


os.register_at_fork(before=_close_videos_before_fork)


def _numbered(template: str, video_id: str) -> str:
    """The frame template with the video id filled in and the number left as the one positional field that
    ``datasets.decode``'s frame folders format ("{video_id}_{number:06d}.jpg" → "abc_{:06d}.jpg")."""
    return template.replace("{video_id}", video_id).replace("{number", "{")


def collate_keyframes(items: list) -> dict:
    """Stack items into a batch: video uint8 (B, C, T, H, W) (the items must share a frame size: training crops do,
    test clips of one video do); ``rois`` float32 (K, 5) = [item index in the batch, x1, y1, x2, y2] pixels, the
    layout ``torchvision.ops.roi_align`` takes; labels (K, classes); scores (K,); ``keyframe`` (K,) the dataset
    index of each box's keyframe; ``failures``."""
    good = [item for item in items if not isinstance(item, Failure)]
    failures = [item for item in items if isinstance(item, Failure)]
    if not good:
        return {"video": None, "rois": None, "labels": None, "scores": None, "keyframe": None, "failures": failures}
    counts = [item["boxes"].shape[0] for item in good]
    batch_index = torch.repeat_interleave(torch.arange(len(good), dtype=torch.float32), torch.tensor(counts))
    boxes = torch.cat([item["boxes"] for item in good]).float().reshape(-1, 4)
    return {
        "video": torch.stack([item["video"] for item in good]),
        "rois": torch.cat([batch_index[:, None], boxes], dim=1),
        "labels": torch.cat([item["labels"] for item in good]),
        "scores": torch.cat([item["scores"] for item in good]),
        "keyframe": torch.repeat_interleave(torch.tensor([item["index"] for item in good]), torch.tensor(counts)),
        "failures": failures,
    }


def num_boxes(batch: dict) -> int:
    return 0 if batch["rois"] is None else int(batch["rois"].shape[0])

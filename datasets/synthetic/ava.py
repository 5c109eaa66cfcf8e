"""The built-in synthetic AVA dataset: AVA v2.2 action-detection files whose actions are about MOTION.

It exists so that the detection pipeline (frame reader, box handling, RoI head, frame-mAP) can be exercised
end to end in CI and in a CPU demo, on files laid out and formatted exactly like the real ones, in seconds.

Every "video" shows 1-3 actors (textured rectangles standing in for people) over a static noisy background.
At each annotated second an actor does exactly one motion and may also flash:

====  ===========  ==================================================================================
 id   name         what the actor does around the keyframe
====  ===========  ==================================================================================
  1   stand still  only the small drift every actor has (at most 3 % of the frame per second)
  2   move left    translates leftwards, 20-35 % of the frame's width per second
  3   move right   translates rightwards
  4   move up      translates upwards, 20-35 % of the frame's height per second
  5   move down    translates downwards
  6   approach     grows by x1.5-2.0 per second about its centre, as if coming closer (NOT EVALUATED)
  7   flash        its colours swing to bright and dark twice a second (fps / 4 times below 8 fps), on top
                   of any motion
====  ===========  ==================================================================================

Id 6 is used in the ground truth but left out of the label map, like the 20 of AVA's 80 actions that the
benchmark does not evaluate: a pipeline must train on what the CSV holds and evaluate what the label map lists.

Why a keyframe alone says nothing about the actions: every annotated second is its own short shot. The shot of
second s covers the times [s - 1/2, s + 1/2); in it an actor's box is placed at the keyframe (time s) by
generators that never see the action (position, size, and a look fixed for the whole video), and the action
only acts through ``t - s``: a displacement, a growth and a flash, all zero at ``t = s``. So the keyframe is
the same image whatever the actions (``render_frames`` of two plans that differ only in their actions gives
identical keyframes) while the frames a few steps either side show the motion. Even the range the positions
are drawn from is the same for every action: it keeps the keyframe box inside the frame, and a moving actor
may leave the frame partly towards the ends of its shot, as people do in films. The price is a cut between
consecutive shots (actors jump), which the annotation ignores, as AVA's ignores the cuts of its movies. A clip
that shows one shot only spans at most a second around its keyframe (frames kf - 4 .. kf + 3 at 8 fps);
longer clips still help, because actors often go on doing what they did (``keep_action``).

The time base is AVA's: frames are numbered from 1 as if extracted from second 900 of the movie at ``fps``
frames per second (AVA: 30; here 8 by default to keep the dataset light), so frame n shows the time
``900 + (n - 1) / fps`` and the keyframe of second s is frame ``(s - 900) * fps + 1``. Keyframes are seconds
902, 903, ... (AVA: 902..1798), and frames exist from second 900 to 2 s past the last keyframe, so every
keyframe has 2 s of frames on either side (frames ``kf - 2 * fps .. kf + 2 * fps - 1``).

Layout written by :func:`ensure_synthetic_ava` under ``ROOT``::

    frames/<video_id>/<video_id>_%06d.jpg            JPEG frames, H x W (64 x 80 by default: not square on
                                                      purpose), numbered from 1 as above
    videos/<video_id>.mp4                             only with ``videos=True``: the same frames as H.264 (with
                                                      B-frames), to read clips by timestamp
    annotations/ava_{train,val}_v2.2.csv             ground truth: video_id,timestamp,x1,y1,x2,y2,action_id,
                                                      person_id; one row per (box, action), normalized boxes
    annotations/ava_action_list_v2.2.pbtxt           label map: item { name: "..." id: N }, ids 1-5 and 7
    annotations/ava_{train,val}_excluded_timestamps_v2.2.csv   video_id,timestamp of keyframes to skip
    annotations/ava_{train,val}_predicted_person_boxes.csv     a simulated person detector:
                                                      video_id,timestamp,x1,y1,x2,y2,,score
    meta.json                                         generator version, spec, counts; written LAST: it marks
                                                      the dataset complete and ensure_synthetic_ava compares it

Video ids are ``ava-syn_NNN``: 11 characters like YouTube's, with a '-' and a '_' as real AVA ids may have, so
that code splitting frame names on the first '_' fails here rather than on the real data. The excluded
keyframes keep their ground-truth and detection rows: skipping them on both sides is the evaluator's job.

Everything is drawn from ``numpy`` generators seeded by ``(seed, video, stream[, second or frame])``, one
stream per concern (look, placement, actions, motion magnitudes, detector, noise), so changing the actions
moves nothing else, and equal specs give byte-identical files (the JPEG encoder is deterministic too).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.files import atomic_path, partial_path, write_text_atomic
from datasets.synthetic import folder
from datasets.video_io import write_video

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever the files generated for a given spec change

# ---- AVA's time base ------------------------------------------------------------------------------------------

AVA_FIRST_SECOND = 900  # frame 1 shows this second of the movie (AVA's frames start 15 minutes in)
FIRST_KEYFRAME = 902  # the first annotated second, as in AVA: it leaves 2 s of frames before it
TAIL_SECONDS = 2  # frames continue this long after the last keyframe, so it gets the same context

# ---- the actions -----------------------------------------------------------------------------------------------

ACTIONS: dict[int, str] = {
    1: "stand still",
    2: "move left",
    3: "move right",
    4: "move up",
    5: "move down",
    6: "approach",
    7: "flash",
}
STAND_STILL, MOVE_LEFT, MOVE_RIGHT, MOVE_UP, MOVE_DOWN, APPROACH, FLASH = range(1, 8)
MOTION_IDS = (STAND_STILL, MOVE_LEFT, MOVE_RIGHT, MOVE_UP, MOVE_DOWN, APPROACH)  # exactly one per box and second
NOT_EVALUATED_ID = APPROACH  # in the ground truth, not in the label map
EVALUATED_IDS = tuple(action for action in ACTIONS if action != NOT_EVALUATED_ID)
# Screen direction (dx, dy) of each motion; y grows downwards, so "up" is -1.
DIRECTIONS: dict[int, tuple[int, int]] = {STAND_STILL: (0, 0), MOVE_LEFT: (-1, 0), MOVE_RIGHT: (1, 0),
                                          MOVE_UP: (0, -1), MOVE_DOWN: (0, 1), APPROACH: (0, 0)}

# Motion magnitudes. The slowest move (20 % of the height per second) is over 5 times the fastest drift (3 % of
# the width), so "stand still" and the moves are far apart even a few frames from the keyframe.
MOVE_SPEED = (0.20, 0.35)  # fraction of the frame's width (left/right) or height (up/down) per second
DRIFT_SPEED = 0.03  # every actor drifts in a random direction, up to this fraction of the frame per second
APPROACH_GROWTH = (1.5, 2.0)  # size factor per second of "approach"
SIZE_WOBBLE = 0.05  # every other actor changes size by up to this log-factor per second: never perfectly rigid
FLASH_DEPTH = 0.7  # how far a flash pushes the colours towards white (then black): a fraction of the way
FLASH_HZ = 2.0  # flashes per second, lowered to fps / 4 at low frame rates so a cycle spans >= 4 frames

# ---- looks and placement (drawn without the actions) -------------------------------------------------------------

ACTOR_HEIGHT = (0.28, 0.42)  # fraction of the frame's height, per actor
ACTOR_ASPECT = (0.45, 0.70)  # width / height, per actor: upright like a person
SHOT_SCALE = 0.10  # each shot rescales an actor by a log-uniform factor within +-this (a change of framing)
MAX_KEYFRAME_IOU = 0.2  # actors are re-placed (a few tries) to overlap less than this at the keyframe
PATTERN_CELLS = (6, 4)  # (rows, columns) of an actor's texture, fixed to its box
PATTERNS = ("stripes", "checker", "noise")
MIN_COLOUR_DISTANCE = 0.4  # RGB distance of an actor's colours from the background's mean: always visible

# ---- the simulated person detector -------------------------------------------------------------------------------

TRUE_SCORES = (0.90, 1.00)  # scores of the detections of real actors: kept by any usual threshold (0.8, 0.9)
FALSE_SCORES = (0.30, 0.95)  # scores of false positives: about a fifth pass a 0.8 threshold
FALSE_MAX_IOU = 0.3  # a false positive overlaps every actor's box less than this: it is never a true hit

# Streams of the generators: (seed, video, stream[, second or frame]); splits use (seed, SPLIT_STREAM).
LOOK_STREAM, PLACEMENT_STREAM, ACTION_STREAM, MOTION_STREAM, DETECTOR_STREAM, NOISE_STREAM = 1, 2, 3, 4, 5, 6
BACKGROUND_STREAM = 7
SPLIT_STREAM = 100

VIDEO_ID_PREFIX = "ava-syn_"
VIDEO_ID = re.compile(r"ava-syn_\d{3}")
MAX_VIDEOS = 1000  # three digits in the video id keep it 11 characters long


# ---- the request -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticAVASpec:
    """What to generate; two datasets with equal specs (and generator version) are byte-identical."""

    seed: int = 0  # every random draw derives from it
    num_videos: int = 24  # videos in all, train and val
    num_val_videos: int = 6  # of which in the val split (chosen at random)
    seconds: int = 6  # annotated keyframe seconds per video: 902, 903, ..., 901 + seconds
    fps: int = 8  # frames per second of the frame folders (AVA: 30); frame numbers follow it
    height: int = 64  # frame height in pixels
    width: int = 80  # frame width; differs from the height so that swapped axes show
    actors: tuple[int, int] = (1, 3)  # (fewest, most) actors per video, inclusive; each is in every shot
    keep_action: float = 0.5  # chance an actor goes on doing what it did the second before (AVA actions last)
    flash_probability: float = 0.3  # chance an actor flashes in a second (when it does not keep its last state)
    frame_noise: float = 0.02  # standard deviation of per-frame pixel noise (in [0, 1] units): nothing is still
    jpeg_quality: int = 90  # quality of the frame JPEGs
    box_jitter: float = 0.04  # a detection moves each coordinate by at most this fraction of its box's size
    miss_rate: float = 0.05  # chance the detector misses an actor at a keyframe
    false_positives: float = 0.5  # mean number of false-positive detections per keyframe (Poisson)
    excluded_per_split: int = 2  # keyframes listed in each split's excluded-timestamps file
    # also write every video as videos/<video_id>.mp4 (H.264 with B-frames, crf 18, at fps, from the same rendered
    # frames), for reading clips by timestamp (data.source=video) as from users' video files
    videos: bool = False

    def __post_init__(self):
        if not 2 <= self.num_videos <= MAX_VIDEOS:
            raise ValueError(f"num_videos must be in 2..{MAX_VIDEOS}, got {self.num_videos}")
        if not 1 <= self.num_val_videos < self.num_videos:
            raise ValueError(f"num_val_videos must be in 1..num_videos - 1 (both splits need a video), "
                             f"got {self.num_val_videos} of {self.num_videos}")
        if self.seconds < 1:
            raise ValueError(f"seconds must be >= 1, got {self.seconds}")
        if not isinstance(self.fps, int) or self.fps < 4:
            raise ValueError(f"fps must be an integer >= 4 (a flash needs 4 frames a cycle), got {self.fps}")
        if self.height < 32 or self.width < 32:
            raise ValueError(f"frames must be at least 32 x 32 pixels, got {self.height} x {self.width}")
        low, high = self.actors
        if not 1 <= low <= high <= 4:
            raise ValueError(f"actors must be (fewest, most) with 1 <= fewest <= most <= 4, got {self.actors}")
        for name in ("keep_action", "flash_probability", "miss_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.box_jitter <= 0.2:
            raise ValueError(f"box_jitter must be in [0, 0.2] (a fraction of the box size), got {self.box_jitter}")
        if self.false_positives < 0 or self.frame_noise < 0:
            raise ValueError("false_positives and frame_noise must be >= 0")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        if self.videos and (self.height % 2 or self.width % 2):
            raise ValueError(f"H.264 videos need an even frame size, got {self.height} x {self.width}")
        if not 0 <= self.excluded_per_split <= self.num_val_videos * self.seconds:
            raise ValueError(f"excluded_per_split must be in 0..{self.num_val_videos * self.seconds} "
                             f"(the val split's keyframes), got {self.excluded_per_split}")

    @property
    def keyframe_seconds(self) -> range:
        """The annotated seconds of every video."""
        return range(FIRST_KEYFRAME, FIRST_KEYFRAME + self.seconds)

    @property
    def num_frames(self) -> int:
        """Frames per video: from second 900 to TAIL_SECONDS past the last keyframe."""
        return (FIRST_KEYFRAME - AVA_FIRST_SECOND + self.seconds - 1 + TAIL_SECONDS) * self.fps

    @property
    def num_shots(self) -> int:
        """Shots per video: one per second whose window [s - 1/2, s + 1/2) holds a frame, 900 included."""
        return int(_shot_of_frame(self.num_frames, self.fps)[0]) + 1


def keyframe_number(second: int, fps: int) -> int:
    """The 1-based number of the frame showing ``second`` exactly: AVA's keyframe of that second."""
    return (second - AVA_FIRST_SECOND) * fps + 1


def video_id(index: int) -> str:
    return f"{VIDEO_ID_PREFIX}{index:03d}"


def frame_name(video: str, number: int) -> str:
    return f"{video}_{number:06d}.jpg"


def _shot_of_frame(number, fps: int):
    """(shot, dt): the shot (seconds since 900) a frame belongs to and its time from that shot's keyframe, in
    seconds, in [-1/2, 1/2). Integer arithmetic, so a keyframe's dt is exactly 0."""
    k = np.asarray(number) - 1
    shot = (2 * k + fps) // (2 * fps)
    return shot, (k - shot * fps) / fps


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def split_videos(spec: SyntheticAVASpec) -> dict[str, list[int]]:
    """Video indices of each split, a random ``num_val_videos`` in val."""
    order = _rng(spec.seed, SPLIT_STREAM).permutation(spec.num_videos)
    return {"train": sorted(order[spec.num_val_videos:].tolist()), "val": sorted(order[:spec.num_val_videos].tolist())}


def excluded_keyframes(spec: SyntheticAVASpec, split: str) -> list[tuple[str, int]]:
    """(video_id, second) of the keyframes listed as excluded in ``split``, sorted."""
    keyframes = [(video_id(index), second) for index in split_videos(spec)[split] for second in spec.keyframe_seconds]
    count = min(spec.excluded_per_split, len(keyframes))
    picked = _rng(spec.seed, SPLIT_STREAM, 1 if split == "train" else 2).choice(len(keyframes), count, replace=False)
    return sorted(keyframes[i] for i in picked.tolist())


# ---- the plan of one video: who is where, doing what ---------------------------------------------------------------


@dataclass(frozen=True)
class ActorLook:
    """An actor's appearance for the whole video: two colours mixed by a pattern fixed to its box."""

    colours: np.ndarray  # (2, 3) float in [0, 1]
    pattern: np.ndarray  # PATTERN_CELLS float in [0, 1]: the weight of the second colour in each cell
    height: float  # base box height, pixels
    aspect: float  # box width / height


@dataclass(frozen=True, eq=False)
class VideoPlan:
    """Everything that decides a video's frames and annotations; arrays indexed (actor, shot[, xy]).

    The keyframe layout (``centre``, ``size``, ``looks``) and the actions (``motion``, ``flash``) come from
    separate generators; ``speed``, ``growth``, ``wobble`` and ``drift`` are drawn for every (actor, shot)
    whatever the action, and ``motion`` only picks which apply. Replacing ``motion`` or ``flash`` (e.g. with
    ``dataclasses.replace``) therefore changes the frames around keyframes and never a keyframe itself.
    """

    spec: SyntheticAVASpec
    index: int  # the video's index; its id is video_id(index)
    looks: tuple[ActorLook, ...]
    centre: np.ndarray  # (A, S, 2) box centre (x, y) at the shot's keyframe, pixels
    size: np.ndarray  # (A, S, 2) box (width, height) at the keyframe, pixels
    motion: np.ndarray  # (A, S) int: one of MOTION_IDS
    flash: np.ndarray  # (A, S) bool
    speed: np.ndarray  # (A, S) a move's speed, fraction of the frame dimension per second
    growth: np.ndarray  # (A, S) log size factor per second when approaching
    wobble: np.ndarray  # (A, S) log size factor per second otherwise
    drift: np.ndarray  # (A, S, 2) pixels per second, added to every motion

    @property
    def video_id(self) -> str:
        return video_id(self.index)

    @property
    def num_actors(self) -> int:
        return len(self.looks)

    def labels(self, actor: int, second: int) -> tuple[int, ...]:
        """The action ids of ``actor`` at ``second``, ascending: its motion, and FLASH when it flashes."""
        shot = second - AVA_FIRST_SECOND
        motion = int(self.motion[actor, shot])
        return (motion, FLASH) if self.flash[actor, shot] else (motion,)

    def velocity(self) -> np.ndarray:
        """(A, S, 2) pixels per second: the motion's direction at its speed, plus the drift."""
        direction = np.array([DIRECTIONS[int(m)] for m in self.motion.reshape(-1)], np.float64)
        direction = direction.reshape(*self.motion.shape, 2)
        extent = np.array([self.spec.width, self.spec.height], np.float64)
        return direction * self.speed[..., None] * extent + self.drift

    def log_growth(self) -> np.ndarray:
        """(A, S) log size factor per second."""
        return np.where(self.motion == APPROACH, self.growth, self.wobble)


def _colour_far_from(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    for _ in range(64):
        colour = rng.uniform(0.0, 1.0, 3)
        if np.linalg.norm(colour - avoid) >= MIN_COLOUR_DISTANCE:
            return colour
    return np.where(avoid < 0.5, 1.0, 0.0)  # the farthest corner of the colour cube is always far enough


def _pattern(rng: np.random.Generator) -> np.ndarray:
    rows, cols = PATTERN_CELLS
    kind = PATTERNS[int(rng.integers(len(PATTERNS)))]
    noise = rng.uniform(0.0, 1.0, PATTERN_CELLS)  # drawn for every kind, so the stream stays aligned
    if kind == "stripes":
        return np.repeat((np.arange(rows) % 2)[:, None], cols, axis=1).astype(np.float64)
    if kind == "checker":
        return ((np.arange(rows)[:, None] + np.arange(cols)[None]) % 2).astype(np.float64)
    return noise


def _look(rng: np.random.Generator, spec: SyntheticAVASpec, background_mean: np.ndarray) -> ActorLook:
    first = _colour_far_from(rng, background_mean)
    second = first
    for _ in range(64):  # a second colour that is also far from the first, so the texture shows
        second = _colour_far_from(rng, background_mean)
        if np.linalg.norm(second - first) >= 0.3:
            break
    return ActorLook(np.stack([first, second]), _pattern(rng), spec.height * rng.uniform(*ACTOR_HEIGHT),
                     rng.uniform(*ACTOR_ASPECT))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) x1,y1,x2,y2 box with each of (N, 4)."""
    if len(boxes) == 0:
        return np.zeros(0)
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def _corners(centre: np.ndarray, size: np.ndarray) -> np.ndarray:
    return np.concatenate([centre - size / 2, centre + size / 2], axis=-1)


def _place(rng: np.random.Generator, spec: SyntheticAVASpec, looks) -> tuple[np.ndarray, np.ndarray]:
    """(A, 2) centres and sizes of one shot's keyframe: each box inside the frame with a pixel to spare,
    uniform over those places, and re-drawn a few times while it overlaps an earlier actor too much."""
    centres, sizes = [], []
    extent = np.array([spec.width, spec.height], np.float64)
    for look in looks:
        scale = math.exp(rng.uniform(-SHOT_SCALE, SHOT_SCALE))
        size = np.array([look.height * look.aspect, look.height]) * scale
        placed = _corners(np.stack(centres), np.stack(sizes)) if centres else np.zeros((0, 4))
        for _ in range(20):
            centre = rng.uniform(size / 2 + 1, extent - size / 2 - 1)
            if (_iou(_corners(centre, size), placed) < MAX_KEYFRAME_IOU).all():
                break
        centres.append(centre)
        sizes.append(size)
    return np.stack(centres), np.stack(sizes)


def _actions(rng: np.random.Generator, spec: SyntheticAVASpec, num_actors: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, S) motions and flashes: a Markov chain per actor that keeps its state with ``keep_action`` and
    otherwise draws afresh (uniform motions, flashes with ``flash_probability``)."""
    shape = (num_actors, spec.num_shots)
    keep, fresh_motion = rng.uniform(size=shape), rng.integers(len(MOTION_IDS), size=shape)
    keep_flash, fresh_flash = rng.uniform(size=shape), rng.uniform(size=shape) < spec.flash_probability
    motion = np.array(MOTION_IDS)[fresh_motion]
    flash = fresh_flash.copy()
    for shot in range(1, spec.num_shots):
        motion[:, shot] = np.where(keep[:, shot] < spec.keep_action, motion[:, shot - 1], motion[:, shot])
        flash[:, shot] = np.where(keep_flash[:, shot] < spec.keep_action, flash[:, shot - 1], flash[:, shot])
    return motion, flash


def render_background(spec: SyntheticAVASpec, index: int) -> np.ndarray:
    """The static (H, W, 3) float background of video ``index`` in [0, 1]: smooth colour noise plus grain."""
    rng = _rng(spec.seed, index, BACKGROUND_STREAM)
    base = rng.uniform(0.2, 0.8, 3)
    cells = rng.integers(3, 9, size=2)  # (rows, columns) of the smooth noise
    grid = base + rng.uniform(-0.15, 0.15, (*cells, 3))
    rows = np.interp((np.arange(spec.height) + 0.5) * cells[0] / spec.height - 0.5, np.arange(cells[0]),
                     np.arange(cells[0]))
    cols = np.interp((np.arange(spec.width) + 0.5) * cells[1] / spec.width - 0.5, np.arange(cells[1]),
                     np.arange(cells[1]))
    row_low, col_low = np.floor(rows).astype(int), np.floor(cols).astype(int)
    row_high, col_high = np.minimum(row_low + 1, cells[0] - 1), np.minimum(col_low + 1, cells[1] - 1)
    fy, fx = (rows - row_low)[:, None, None], (cols - col_low)[None, :, None]
    smooth = ((grid[row_low][:, col_low] * (1 - fx) + grid[row_low][:, col_high] * fx) * (1 - fy)
              + (grid[row_high][:, col_low] * (1 - fx) + grid[row_high][:, col_high] * fx) * fy)
    grain = rng.normal(0.0, 0.04, (spec.height, spec.width, 3))
    return np.clip(smooth + grain, 0.0, 1.0)


def plan_video(spec: SyntheticAVASpec, index: int) -> VideoPlan:
    """The plan of video ``index``: deterministic in (spec, index)."""
    background_mean = render_background(spec, index).mean((0, 1))
    look_rng = _rng(spec.seed, index, LOOK_STREAM)
    num_actors = int(look_rng.integers(spec.actors[0], spec.actors[1] + 1))
    looks = tuple(_look(look_rng, spec, background_mean) for _ in range(num_actors))
    placed = [_place(_rng(spec.seed, index, PLACEMENT_STREAM, shot), spec, looks) for shot in range(spec.num_shots)]
    centre = np.stack([c for c, _ in placed], axis=1)
    size = np.stack([s for _, s in placed], axis=1)
    motion, flash = _actions(_rng(spec.seed, index, ACTION_STREAM), spec, num_actors)

    moves = _rng(spec.seed, index, MOTION_STREAM)
    shape = (num_actors, spec.num_shots)
    speed = moves.uniform(*MOVE_SPEED, shape)
    growth = np.log(moves.uniform(*APPROACH_GROWTH, shape))
    wobble = moves.uniform(-SIZE_WOBBLE, SIZE_WOBBLE, shape)
    heading = moves.uniform(0.0, 2 * math.pi, shape)
    drift = (DRIFT_SPEED * moves.uniform(0.0, 1.0, shape))[..., None] * np.stack(
        [np.cos(heading) * spec.width, np.sin(heading) * spec.height], axis=-1)
    return VideoPlan(spec, index, looks, centre, size, motion, flash, speed, growth, wobble, drift)


def actor_boxes(plan: VideoPlan, frame_numbers) -> np.ndarray:
    """(A, T, 4) x1, y1, x2, y2 in pixels of every actor in the given 1-based frames (they may leave the frame)."""
    shot, dt = _shot_of_frame(np.asarray(frame_numbers), plan.spec.fps)
    centre = plan.centre[:, shot] + plan.velocity()[:, shot] * dt[None, :, None]
    size = plan.size[:, shot] * np.exp(plan.log_growth()[:, shot] * dt[None])[..., None]
    return _corners(centre, size)


def actor_flash(plan: VideoPlan, frame_numbers) -> np.ndarray:
    """(A, T) the flash of every actor in the given frames, in [-FLASH_DEPTH, FLASH_DEPTH]: > 0 pushes its
    colours towards white, < 0 towards black; exactly 0 at keyframes."""
    shot, dt = _shot_of_frame(np.asarray(frame_numbers), plan.spec.fps)
    hz = min(FLASH_HZ, plan.spec.fps / 4)
    return np.where(plan.flash[:, shot], FLASH_DEPTH * np.sin(2 * math.pi * hz * dt)[None], 0.0)


def render_frames(plan: VideoPlan, frame_numbers=None) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames of the plan (all frames by default): what the JPEGs hold before encoding."""
    spec = plan.spec
    numbers = np.arange(1, spec.num_frames + 1) if frame_numbers is None else np.asarray(frame_numbers)
    # float32: the frames end as 8-bit values, and it halves the time of the per-pixel work
    canvas = np.repeat(render_background(spec, plan.index).astype(np.float32)[None], len(numbers), axis=0)
    boxes = actor_boxes(plan, numbers).astype(np.float32)
    flashes = actor_flash(plan, numbers).astype(np.float32)
    shots = _shot_of_frame(numbers, spec.fps)[0]
    for look, box, flash in zip(plan.looks, boxes, flashes):  # later actors in front
        # Each actor is painted shot by shot, inside the rectangle its box sweeps in that shot: a small part of
        # the frame, and outside it the actor's coverage is exactly 0, so the result is the same.
        for shot in np.unique(shots).tolist():
            at = np.flatnonzero(shots == shot)
            top = max(int(math.floor(box[at, 1].min())) - 1, 0)
            bottom = min(int(math.ceil(box[at, 3].max())) + 1, spec.height)
            left = max(int(math.floor(box[at, 0].min())) - 1, 0)
            right = min(int(math.ceil(box[at, 2].max())) + 1, spec.width)
            if top >= bottom or left >= right:
                continue
            window = canvas[at, top:bottom, left:right]
            _paint_actor(window, top, left, look, box[at], flash[at])
            canvas[at, top:bottom, left:right] = window
    if spec.frame_noise > 0:
        for t, number in enumerate(numbers.tolist()):  # one generator per frame: any subset renders the same
            noise = _rng(spec.seed, plan.index, NOISE_STREAM, number).normal(0.0, spec.frame_noise, canvas.shape[1:])
            canvas[t] += noise.astype(np.float32)
    return np.clip(np.rint(canvas * np.float32(255.0)), 0, 255).astype(np.uint8)


def _paint_actor(window: np.ndarray, top: int, left: int, look: ActorLook, box: np.ndarray, flash: np.ndarray):
    """Alpha-blend an actor over ``window`` (T, h, w, 3) in place: the frame's rows from ``top`` and columns from
    ``left``, with the actor's (T, 4) pixel boxes and (T,) flashes."""
    ys = np.arange(top, top + window.shape[1], dtype=np.float32) + 0.5  # pixel centres
    xs = np.arange(left, left + window.shape[2], dtype=np.float32) + 0.5
    x1, y1, x2, y2 = (box[:, i, None] for i in range(4))
    width, height = x2 - x1, y2 - y1
    # signed distance to the box in pixels: a one-pixel antialiased edge, exact at the box's border
    out_x, out_y = np.abs(xs - (x1 + x2) / 2) - width / 2, np.abs(ys - (y1 + y2) / 2) - height / 2
    coverage = np.clip(0.5 - np.maximum(out_y[:, :, None], out_x[:, None, :]), 0.0, 1.0)
    rows, cols = PATTERN_CELLS
    row = np.clip(np.floor((ys - y1) / height * rows), 0, rows - 1).astype(np.intp)
    col = np.clip(np.floor((xs - x1) / width * cols), 0, cols - 1).astype(np.intp)
    weight = look.pattern.astype(np.float32)[row[:, :, None], col[:, None, :]]  # (T, h, w)
    # the flash acts on the two colours of each frame, before they are spread over the pixels
    f = flash[:, None, None]
    base = look.colours.astype(np.float32)[None]  # (1, 2, 3)
    tinted = np.where(f >= 0, base + f * (1.0 - base), base * (1.0 + f))  # (T, 2, 3)
    first, step = tinted[:, None, None, 0], (tinted[:, 1] - tinted[:, 0])[:, None, None]
    colour = first + weight[..., None] * step
    window += coverage[..., None] * (colour - window)


# ---- annotations --------------------------------------------------------------------------------------------------


def _normalized(box: np.ndarray, spec: SyntheticAVASpec) -> np.ndarray:
    return np.clip(box / np.array([spec.width, spec.height, spec.width, spec.height]), 0.0, 1.0)


def _box_text(box: np.ndarray) -> str:
    return ",".join(f"{value:.3f}" for value in box.tolist())


def groundtruth_rows(plan: VideoPlan) -> list[str]:
    """The ground-truth CSV lines of one video: per keyframe, per actor, one line per action id."""
    spec, lines = plan.spec, []
    for second in spec.keyframe_seconds:
        boxes = actor_boxes(plan, [keyframe_number(second, spec.fps)])[:, 0]
        for actor in range(plan.num_actors):
            box = _box_text(_normalized(boxes[actor], spec))
            lines += [f"{plan.video_id},{second:04d},{box},{action},{actor}" for action in plan.labels(actor, second)]
    return lines


@dataclass(frozen=True)
class Detections:
    """The simulated detector's output on one video."""

    rows: list[str]  # detections CSV lines
    missed: frozenset[tuple[int, int]]  # (second, person_id) of the actors it missed


def detect(plan: VideoPlan) -> Detections:
    """What a good person detector would give: every actor's keyframe box, each coordinate moved by up to
    ``box_jitter`` of the box size, scored in TRUE_SCORES, unless missed (``miss_rate``); plus a Poisson number
    of person-sized false positives away from every actor, scored in FALSE_SCORES. Rows of a keyframe are
    shuffled so that their order says nothing."""
    spec = plan.spec
    rng = _rng(spec.seed, plan.index, DETECTOR_STREAM)
    extent = np.array([spec.width, spec.height], np.float64)
    rows, missed = [], set()
    for second in spec.keyframe_seconds:
        truth = actor_boxes(plan, [keyframe_number(second, spec.fps)])[:, 0]
        found = []
        for actor, box in enumerate(truth):
            miss = rng.uniform() < spec.miss_rate
            offsets = rng.uniform(-spec.box_jitter, spec.box_jitter, 4)
            score = rng.uniform(*TRUE_SCORES)
            if miss:
                missed.add((second, actor))
                continue
            size = np.tile(box[2:] - box[:2], 2)
            found.append((box + offsets * size, score))
        for _ in range(int(rng.poisson(spec.false_positives))):
            for _ in range(20):
                height = spec.height * rng.uniform(0.2, 0.45)
                size = np.array([height * rng.uniform(*ACTOR_ASPECT), height])
                box = _corners(rng.uniform(size / 2, extent - size / 2), size)
                if (_iou(box, truth) < FALSE_MAX_IOU).all():
                    found.append((box, rng.uniform(*FALSE_SCORES)))
                    break
        for position in rng.permutation(len(found)).tolist():
            box, score = found[position]
            rows.append(f"{plan.video_id},{second:04d},{_box_text(_normalized(box, spec))},,{score:.3f}")
    return Detections(rows, frozenset(missed))


def label_map_text() -> str:
    """The evaluated actions in the ``item { name: ... id: ... }`` layout of AVA's ActivityNet label maps."""
    return "".join(f'item {{\n  name: "{ACTIONS[action]}"\n  id: {action}\n}}\n' for action in EVALUATED_IDS)


# ---- the dataset on disk ------------------------------------------------------------------------------------------

META = folder.MARKER
ANNOTATIONS = {
    "train_csv": "ava_train_v2.2.csv",
    "val_csv": "ava_val_v2.2.csv",
    "label_map": "ava_action_list_v2.2.pbtxt",
    "train_excluded": "ava_train_excluded_timestamps_v2.2.csv",
    "val_excluded": "ava_val_excluded_timestamps_v2.2.csv",
    "train_detections": "ava_train_predicted_person_boxes.csv",
    "val_detections": "ava_val_predicted_person_boxes.csv",
}


@dataclass(frozen=True)
class SyntheticAVAPaths:
    """Where the files of a generated dataset are, and whether this call generated them."""

    root: Path
    frames_dir: Path  # <root>/frames: <video_id>/<video_id>_%06d.jpg
    videos_dir: Path  # <root>/videos: <video_id>.mp4 (spec.videos)
    annotations_dir: Path
    train_csv: Path
    val_csv: Path
    label_map: Path
    train_excluded: Path
    val_excluded: Path
    train_detections: Path
    val_detections: Path
    meta: Path  # the completion marker
    generated: bool = False  # False when an existing complete dataset was reused
    seconds: float = 0.0  # time spent generating

    def frame_path(self, video: str, number: int) -> Path:
        """The JPEG of 1-based frame ``number`` of ``video``."""
        return self.frames_dir / video / frame_name(video, number)

    def video_path(self, video: str) -> Path:
        return self.videos_dir / f"{video}.mp4"

    def split(self, name: str) -> dict[str, Path]:
        """The ground truth, detections and excluded timestamps of split ``name`` ("train" or "val")."""
        if name not in ("train", "val"):
            raise ValueError(f"unknown split {name!r}; expected 'train' or 'val'")
        return {kind: getattr(self, f"{name}_{kind}") for kind in ("csv", "detections", "excluded")}


def dataset_paths(root: str | os.PathLike) -> SyntheticAVAPaths:
    root = Path(root)
    annotations = root / "annotations"
    return SyntheticAVAPaths(root=root, frames_dir=root / "frames", videos_dir=root / "videos",
                             annotations_dir=annotations,
                             meta=root / META, **{key: annotations / name for key, name in ANNOTATIONS.items()})


def _write_video(paths: SyntheticAVAPaths, plan: VideoPlan) -> None:
    frames = render_frames(plan)
    frames_dir = paths.frames_dir / plan.video_id
    frames_dir.mkdir(parents=True, exist_ok=True)
    for number, frame in enumerate(frames, 1):
        with atomic_path(frames_dir / frame_name(plan.video_id, number), fsync=False) as tmp:
            Image.fromarray(frame).save(tmp, format="JPEG", quality=plan.spec.jpeg_quality)
    if plan.spec.videos:
        paths.videos_dir.mkdir(exist_ok=True)
        write_video(str(paths.video_path(plan.video_id)), frames, plan.spec.fps, crf=18, gop=2 * plan.spec.fps)


def _meta(spec: SyntheticAVASpec, splits: dict[str, list[int]], counts: dict) -> dict:
    """The completion marker's content: everything that identifies the dataset, nothing run-dependent."""
    return {
        "generator_version": GENERATOR_VERSION,
        "spec": folder.spec_json(spec),
        "layout": "frames/<video_id>/<video_id>_%06d.jpg, 1-based; frame n shows second 900 + (n - 1) / fps",
        "fps": spec.fps,
        "first_second": AVA_FIRST_SECOND,
        "keyframe_seconds": [spec.keyframe_seconds.start, spec.keyframe_seconds.stop - 1],
        "frames_per_video": spec.num_frames,
        "frame_size": [spec.height, spec.width],
        "actions": {str(action): name for action, name in ACTIONS.items()},
        "evaluated_ids": list(EVALUATED_IDS),
        "videos": {name: [video_id(index) for index in indices] for name, indices in splits.items()},
        "counts": counts,
    }


def _expected_files(paths: SyntheticAVAPaths, spec: SyntheticAVASpec) -> list[Path]:
    files = [paths.root / "annotations" / name for name in ANNOTATIONS.values()]
    for index in range(spec.num_videos):
        files += [paths.frame_path(video_id(index), n) for n in range(1, spec.num_frames + 1)]
        files += [paths.video_path(video_id(index))] if spec.videos else []
    return files


def is_complete(root: str | os.PathLike, spec: SyntheticAVASpec) -> bool:
    """Whether ``root`` holds a finished dataset of exactly ``spec`` by this generator version, every file there."""
    paths = dataset_paths(root)
    return folder.is_complete(paths.root, GENERATOR_VERSION, spec, _expected_files(paths, spec))


def _clear_previous_output(paths: SyntheticAVAPaths) -> None:
    """Invalidate, then delete what an earlier (maybe partial or different) generation left.

    Only files this generator writes, or their temporary names, are removed: never anything else in ``root``.
    """
    folder.invalidate(paths.root)
    for name in (META, *(f"annotations/{name}" for name in ANNOTATIONS.values())):
        for path in (paths.root / name, partial_path(paths.root / name)):
            path.unlink(missing_ok=True)
    folder.remove_matching(paths.videos_dir, re.compile(rf"{VIDEO_ID.pattern}(\.partial)?\.mp4"),
                           remove_if_empty=False)
    if not paths.frames_dir.is_dir():
        return
    for frames in paths.frames_dir.iterdir():
        if frames.is_dir() and VIDEO_ID.fullmatch(frames.name):
            folder.remove_matching(frames, re.compile(rf"\.?{re.escape(frames.name)}_\d{{6}}\.jpg(\.partial)?"))


def make_synthetic_ava(root: str | os.PathLike, spec: SyntheticAVASpec | None = None) -> SyntheticAVAPaths:
    """(Re)generate the dataset of ``spec`` under ``root``, whatever is there; returns its paths."""
    spec = spec or SyntheticAVASpec()
    start = time.perf_counter()
    paths = dataset_paths(root)
    log.info("generating a synthetic AVA dataset into %s ... (%d videos x %d keyframes, %d frames of %dx%d at "
             "%d fps)", paths.root, spec.num_videos, spec.seconds, spec.num_frames, spec.height, spec.width, spec.fps)
    paths.root.mkdir(parents=True, exist_ok=True)
    _clear_previous_output(paths)
    paths.annotations_dir.mkdir(exist_ok=True)

    splits = split_videos(spec)
    counts: dict = {"videos": {}, "keyframes": {}, "boxes": {}, "rows": {}, "detections": {}, "missed": {},
                    "actions": {}}
    for name, indices in splits.items():
        truth, detections, missed, boxes = [], [], 0, 0
        for index in indices:
            plan = plan_video(spec, index)
            _write_video(paths, plan)
            truth += groundtruth_rows(plan)
            found = detect(plan)
            detections += found.rows
            missed += len(found.missed)
            boxes += plan.num_actors * spec.seconds
        folder.write_lines(getattr(paths, f"{name}_csv"), truth)
        folder.write_lines(getattr(paths, f"{name}_detections"), detections)
        folder.write_lines(getattr(paths, f"{name}_excluded"),
                     [f"{video},{second:04d}" for video, second in excluded_keyframes(spec, name)])
        actions = [int(line.rsplit(",", 2)[1]) for line in truth]
        counts["videos"][name] = len(indices)
        counts["keyframes"][name] = len(indices) * spec.seconds
        counts["boxes"][name] = boxes
        counts["rows"][name] = len(truth)
        counts["detections"][name] = len(detections)
        counts["missed"][name] = missed
        counts["actions"][name] = {str(action): actions.count(action) for action in ACTIONS}
    write_text_atomic(paths.label_map, label_map_text(), fsync=False)
    folder.write_marker(paths.root, _meta(spec, splits, counts))
    seconds = time.perf_counter() - start
    log.info("synthetic AVA dataset done in %.1f s (%d train, %d val videos in %s)", seconds,
             len(splits["train"]), len(splits["val"]), paths.root)
    return dataclasses.replace(paths, generated=True, seconds=seconds)


def ensure_synthetic_ava(root: str | os.PathLike, spec: SyntheticAVASpec | None = None,
                         **params) -> SyntheticAVAPaths:
    """The paths of the dataset of ``spec`` under ``root``, generating it unless it is there complete already.

    ``params`` override fields of ``spec`` (or of the default spec), e.g. ``ensure_synthetic_ava(d, seed=3)``.
    A folder without the marker, or whose marker names another spec or generator version, is regenerated;
    ``generated`` in the result tells which happened.
    """
    spec = dataclasses.replace(spec or SyntheticAVASpec(), **params)
    if is_complete(root, spec):
        return dataset_paths(root)
    return make_synthetic_ava(root, spec)

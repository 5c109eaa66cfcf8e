"""The built-in synthetic video dataset: real H.264 mp4 files whose labels are about MOTION, not appearance.

Like Something-Something v2, a class is what the main object *does* over the clip, so no single frame tells
it: every clip shows one large "target" object on a static background with 1-3 smaller distractors drifting
about at random, and the label is the target's motion primitive. ``CLASS_NAMES`` is the fixed, ordered list;
``num_classes = C`` uses its first C entries (label i = ``CLASS_NAMES[i]``):

====  ========================  =====================================================================
 id   name                      what the target does (time-reversed, it is the class in brackets)
====  ========================  =====================================================================
  0   move_left                 translates leftwards, 25-45 % of the frame (move_right)
  1   move_right                translates rightwards (move_left)
  2   move_up                   translates upwards (move_down)
  3   move_down                 translates downwards (move_up)
  4   rotate_clockwise          spins in place, 90-270 degrees (rotate_counterclockwise)
  5   rotate_counterclockwise   (rotate_clockwise)
  6   approach                  grows by x1.6-2.2, as if coming closer (recede)
  7   recede                    shrinks by the same factor (approach)
  8   appear                    fades in from invisible (disappear)
  9   disappear                 fades out to invisible (appear)
 10   speed_up                  starts at rest and accelerates, any direction (slow_down)
 11   slow_down                 decelerates to rest, any direction (speed_up)
 12   orbit_clockwise           circles around a point, half to one turn (orbit_counterclockwise)
 13   orbit_counterclockwise    (orbit_clockwise)
 14   bounce                    goes out along any direction and comes back (bounce)
 15   shake                     oscillates quickly with a small amplitude (shake)
====  ========================  =====================================================================

Why a single frame says (almost) nothing: appearance (shape, colours, texture, background, distractors) is
drawn from generators that never see the label, and every motion is written as an offset from the clip's
*middle* instant, where size and angle follow the same distribution in every class and the position nearly so
(uniform over the places that keep the whole path in view, so a little narrower for long paths). Every class
also carries small nuisance motion (slow drift, spin, size wobble): "still" aspects are never perfectly still.
What remains: the ends of a clip are biased (a leftward clip starts right of its middle, an approaching target
starts small), and a half-transparent target says "appear or disappear" but not which. A nearest-class-mean
probe on the target's position and size is at chance on the middle or a random frame and reaches about twice
chance on the first or last frame (28 % for 8 classes), where motion statistics separate the directions ~100 %.

Layout written by :func:`make_synthetic_dataset` under ``DIR``::

    videos/<class_name>/<index:06d>.mp4   H.264, yuv420p, S x S, `frames` frames at `fps`
    train.csv, val.csv                    VideoMAE lists: "videos/<class>/<index>.mp4 <label>" per line,
                                          paths relative to DIR (the loader takes DIR as its data root)
    labels.txt                            line i = name of label i
    meta.json                             generator version, spec and counts; written LAST: it marks the
                                          dataset complete, and ensure_synthetic_dataset compares it

Clip ``index`` gets label ``index % num_classes`` (balanced classes) and draws everything from its own
``numpy`` generators seeded by ``(seed, index, stream)``, so clips can be rendered in any order, in any
process: the same seed gives the same frames, list files and (on Linux/glibc: see "Reproducible encoding"
below) the same mp4 bytes, whatever the number of workers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import math
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.files import partial_path
from datasets.synthetic import folder
from datasets.video_io import write_video

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever the files generated for a given spec change

CLASS_NAMES: tuple[str, ...] = (
    "move_left",
    "move_right",
    "move_up",
    "move_down",
    "rotate_clockwise",
    "rotate_counterclockwise",
    "approach",
    "recede",
    "appear",
    "disappear",
    "speed_up",
    "slow_down",
    "orbit_clockwise",
    "orbit_counterclockwise",
    "bounce",
    "shake",
)

# x264 quality: near-lossless, so that stripes and checkers of a few pixels survive at 64 px (files stay tiny).
VIDEO_CRF = 18
MIN_FRAMES = 4  # fewer frames cannot show a rotation or an oscillation unambiguously
# decord 0.6 fails (or returns 4-6 "channels") on frames 16, 24, 48 or 72 pixels wide; every other even
# width from 16 to 528 reads back correctly.
DECORD_UNREADABLE_SIZES = frozenset({16, 24, 48, 72})

# Shapes the target may take: none is rotation-invariant, so a spin is always visible even without texture.
TARGET_SHAPES = ("square", "triangle", "cross", "ellipse", "pacman", "half_disc", "ring_gap", "diamond")
DISTRACTOR_SHAPES = TARGET_SHAPES + ("circle", "ring")
TEXTURES = ("solid", "stripes", "checker", "noise")
BACKGROUNDS = ("solid", "gradient", "noise", "clutter")

# Sizes, as fractions of the frame side. The target is larger than any distractor even at its smallest (the end
# of "recede": 0.11 / sqrt(2.2) x 0.95 = 0.07), so "what the big object does" is well defined.
TARGET_RADIUS = (0.11, 0.22)  # at the middle of the clip, log-uniform
DISTRACTOR_RADIUS = (0.035, 0.065)
CENTRE_BOUNDS = (0.08, 0.92)  # the target's centre stays inside this band during the whole clip

# Streams of the per-clip generators: (seed, index, stream). The split uses (seed, label, SPLIT_STREAM).
BACKGROUND_STREAM, TARGET_LOOK_STREAM, TARGET_MOTION_STREAM, DISTRACTOR_STREAM = 1, 2, 3, 4
SPLIT_STREAM = 100


# ---- the request ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; two datasets with equal specs (and generator version) are identical."""

    num_videos: int = 300
    num_classes: int = 10
    frames: int = 32
    size: int = 64
    fps: int = 25
    seed: int = 0
    val_fraction: float = 0.2

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)} (the classes available: "
                             f"{', '.join(CLASS_NAMES)}), got {self.num_classes}")
        if self.num_videos < self.num_classes:
            raise ValueError(f"num_videos ({self.num_videos}) must be >= num_classes ({self.num_classes}) "
                             "so that every class has a video")
        if self.frames < MIN_FRAMES:
            raise ValueError(f"frames must be >= {MIN_FRAMES}, got {self.frames}")
        if self.size < 32 or self.size % 2 or self.size in DECORD_UNREADABLE_SIZES:
            raise ValueError(f"size must be even (H.264 in yuv420p), >= 32 and not one of "
                             f"{sorted(DECORD_UNREADABLE_SIZES)} (decord misreads those widths), got {self.size}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES[: self.num_classes]


def label_of(spec: SyntheticSpec, index: int) -> int:
    """Round-robin labels: classes are balanced (they differ by at most one video)."""
    return index % spec.num_classes


def relative_path(spec: SyntheticSpec, index: int) -> str:
    return f"videos/{spec.class_names[label_of(spec, index)]}/{index:06d}.mp4"


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


# ---- geometry: shapes as signed distances in the object's own frame --------------------------------------------


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (ys, xs), each (1, S, S) float32 in pixels; y grows downwards."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys[None], xs[None]


def _wedge_distance(u: np.ndarray, v: np.ndarray, half_angle: float) -> np.ndarray:
    """Signed distance to the wedge |atan2(v, u)| < half_angle (< 90 degrees), opening towards +u."""
    c, s = math.cos(half_angle), math.sin(half_angle)
    return np.maximum(v * c - u * s, -v * c - u * s)


def _ellipse_distance(u: np.ndarray, v: np.ndarray, minor: float) -> np.ndarray:
    """Approximate signed distance to the ellipse with semi-axes (1, minor): level value over its gradient."""
    q = np.sqrt(u * u + (v / minor) ** 2)
    gradient = np.sqrt(u * u + v * v / minor**4) / np.maximum(q, 1e-6)
    return (q - 1.0) / np.maximum(gradient, 1e-6)


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) to ``shape`` of unit radius, in radius units; u, v any shape."""
    rho = np.sqrt(u * u + v * v)
    if shape == "circle":
        return rho - 1.0
    if shape == "ring":
        return np.abs(rho - 0.72) - 0.28
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == "diamond":
        return (np.abs(u) + np.abs(v) - 1.05) * np.float32(1 / math.sqrt(2))
    if shape == "triangle":  # equilateral, a vertex towards +u; inradius 0.55 (circumradius 1.1)
        return np.maximum(np.maximum(-u, 0.5 * u + 0.866 * v), 0.5 * u - 0.866 * v) - 0.55
    if shape == "cross":
        arm_x = np.maximum(np.abs(u) - 0.95, np.abs(v) - 0.3)
        arm_y = np.maximum(np.abs(u) - 0.3, np.abs(v) - 0.95)
        return np.minimum(arm_x, arm_y)
    if shape == "ellipse":
        return _ellipse_distance(u, v, 0.5)
    if shape == "pacman":  # a disc with a mouth towards +u
        return np.maximum(rho - 1.0, -_wedge_distance(u, v, math.radians(35)))
    if shape == "half_disc":  # flat side on the -u side, centred on its middle
        shifted = u + 0.4
        return np.maximum(np.sqrt(shifted * shifted + v * v) - 1.05, -shifted)
    if shape == "ring_gap":  # a "C": a ring with a gap towards +u
        return np.maximum(np.abs(rho - 0.72) - 0.28, -_wedge_distance(u, v, math.radians(40)))
    raise ValueError(f"unknown shape {shape!r}")


# ---- appearance ------------------------------------------------------------------------------------------------


@dataclass
class Texture:
    """A two-colour pattern fixed to the object (it moves, turns and scales with it)."""

    kind: str
    colour: np.ndarray  # (3,) float32 in [0, 1]
    second_colour: np.ndarray  # (3,) float32, used by all but "solid"
    period: float = 0.5  # in object radii
    angle: float = 0.0  # stripe orientation, radians
    noise: np.ndarray | None = None  # (n, n) float32 in [0, 1] for "noise"


def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None, min_distance: float = 0.3
                   ) -> np.ndarray:
    """A uniform RGB colour at least ``min_distance`` (Euclidean, in [0,1]^3) from ``avoid``: keeps objects visible."""
    for _ in range(32):
        colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        if avoid is None or np.linalg.norm(colour - avoid) >= min_distance:
            return colour
    return (1.0 - avoid).astype(np.float32)  # the complement is far from anything but mid-grey


def _random_texture(rng: np.random.Generator, avoid: np.ndarray) -> Texture:
    colour = _random_colour(rng, avoid)
    return Texture(
        kind=str(rng.choice(TEXTURES)),
        colour=colour,
        second_colour=_random_colour(rng, colour, 0.35),
        period=float(rng.uniform(0.35, 0.7)),
        angle=float(rng.uniform(0.0, math.pi)),
        noise=rng.uniform(0.0, 1.0, (5, 5)).astype(np.float32),
    )


def _texture_pattern(texture: Texture, u: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """Mixing weight of the second colour at object coordinates (u, v), in [0, 1]; None for a solid fill."""
    if texture.kind == "solid":
        return None
    if texture.kind == "stripes":
        across = u * math.cos(texture.angle) + v * math.sin(texture.angle)
        # a clipped sine: sharp stripes with a one-pixel-ish ramp instead of aliased steps
        return 0.5 + 0.5 * np.clip(3.0 * np.sin(across * np.float32(2 * math.pi / texture.period)), -1.0, 1.0)
    if texture.kind == "checker":
        cells = np.floor(u / texture.period) + np.floor(v / texture.period)
        return (cells % 2.0).astype(np.float32)
    if texture.kind == "noise":
        n = texture.noise.shape[0]
        cols = np.clip(((u + 1.1) * (n / 2.2)).astype(np.int64), 0, n - 1)
        rows = np.clip(((v + 1.1) * (n / 2.2)).astype(np.int64), 0, n - 1)
        return texture.noise[rows, cols]
    raise ValueError(f"unknown texture {texture.kind!r}")


# ---- objects over time ------------------------------------------------------------------------------------------


@dataclass
class Track:
    """One object's shape, texture and per-frame pose; every per-frame array is (T,) float32, pixels/radians."""

    shape: str
    texture: Texture
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    angle: np.ndarray  # increasing angle turns the object clockwise on screen (y points down)
    opacity: np.ndarray


def _render_track(track: Track, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (T, S, S) float32 in [0, 1] and colour (T, S, S, 3) (or (3,) if solid) of one object."""
    ys, xs = _pixel_grid(size)
    cx, cy, radius, angle = (a[:, None, None] for a in (track.cx, track.cy, track.radius, track.angle))
    dx, dy = (xs - cx) / radius, (ys - cy) / radius
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, cos * dy - sin * dx  # screen -> object frame (rotate by -angle)
    distance_px = _shape_distance(track.shape, u, v) * radius
    coverage = np.clip(0.5 - distance_px, 0.0, 1.0) * track.opacity[:, None, None]  # 1-pixel antialiased edge
    pattern = _texture_pattern(track.texture, u, v)
    if pattern is None:
        return coverage, track.texture.colour
    colour = track.texture.colour + pattern[..., None] * (track.texture.second_colour - track.texture.colour)
    return coverage, colour


def _paint(canvas: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend an object over ``canvas`` (T, S, S, 3) in place."""
    canvas += coverage[..., None] * (colour - canvas)


def _static_track(shape: str, texture: Texture, cx: float, cy: float, radius: float, angle: float) -> Track:
    def one(value: float) -> np.ndarray:
        return np.array([value], np.float32)

    return Track(shape, texture, one(cx), one(cy), one(radius), one(angle), one(1.0))


# ---- backgrounds (static: only objects move) ----------------------------------------------------------------------


def _upsample_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """(n, n, C) -> (S, S, C), bilinear with edge clamping."""
    n = grid.shape[0]
    pos = np.clip((np.arange(size, dtype=np.float32) + 0.5) * (n / size) - 0.5, 0, n - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, n - 1)
    frac = (pos - low)[:, None, None]
    rows = grid[low] * (1 - frac) + grid[high] * frac  # (S, n, C)
    frac = frac.reshape(1, size, 1)
    return rows[:, low] * (1 - frac) + rows[:, high] * frac


def _render_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A static (S, S, 3) float32 background in [0, 1]: solid, gradient, smooth noise or still clutter."""
    kind = str(rng.choice(BACKGROUNDS))
    base = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    ys, xs = _pixel_grid(size)
    if kind == "gradient":
        other = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        direction = rng.uniform(0.0, 2 * math.pi)
        ramp = ((xs[0] - size / 2) * math.cos(direction) + (ys[0] - size / 2) * math.sin(direction)) / size + 0.5
        return base + np.clip(ramp, 0.0, 1.0)[..., None] * (other - base)
    if kind == "noise":
        cells = int(rng.integers(4, 17))
        grid = base + rng.uniform(-0.3, 0.3, (cells, cells, 3)).astype(np.float32)
        return np.clip(_upsample_bilinear(grid, size), 0.0, 1.0)
    canvas = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind == "clutter":
        _paint_clutter(canvas, rng, base, size)
    return canvas


def _paint_clutter(canvas: np.ndarray, rng: np.random.Generator, base: np.ndarray, size: int) -> None:
    """Small, dim, motionless shapes: texture the model must learn to ignore because it never moves."""
    for _ in range(int(rng.integers(5, 13))):
        colour = (base + 0.5 * (rng.uniform(0.0, 1.0, 3) - base)).astype(np.float32)
        texture = Texture("solid", colour, colour)
        track = _static_track(str(rng.choice(DISTRACTOR_SHAPES)), texture, *rng.uniform(0, size, 2),
                              radius=size * float(rng.uniform(0.03, 0.07)), angle=rng.uniform(0, 2 * math.pi))
        coverage, colour = _render_track(track, size)
        _paint(canvas[None], coverage, colour)


# ---- the target's motion: one function per class ----------------------------------------------------------------


@dataclass
class Motion:
    """The target's motion relative to the middle of the clip (all zero at tau = 0); arrays (T,) / (T, 2).

    offset: pixels (x, y); spin: radians; log_scale: log of the radius factor; opacity: in [0, 1].
    """

    offset: np.ndarray
    spin: np.ndarray
    log_scale: np.ndarray
    opacity: np.ndarray


def _unit(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)], np.float32)


def _calm_motion(rng: np.random.Generator, tau: np.ndarray, size: int) -> Motion:
    """Nuisance motion every class starts from: a slow drift, a little spin, a slight size change."""
    drift = _unit(rng.uniform(0, 2 * math.pi)) * size * rng.uniform(0.0, 0.06)
    return Motion(
        offset=tau[:, None] * drift,
        spin=tau * np.float32(rng.uniform(-0.3, 0.3)),
        log_scale=tau * np.float32(rng.uniform(-0.1, 0.1)),
        opacity=np.ones_like(tau),
    )


def _translate(direction: float) -> Callable:
    def motion(rng, tau, size):
        heading = direction + rng.uniform(-1, 1) * math.radians(15)
        m = _calm_motion(rng, tau, size)
        m.offset = tau[:, None] * _unit(heading) * size * rng.uniform(0.25, 0.45)
        return m

    return motion


def _rotate(sense: int) -> Callable:
    def motion(rng, tau, size):
        m = _calm_motion(rng, tau, size)
        # at most 30 degrees a frame: a 4-fold symmetric shape must never seem to turn the other way
        total = min(rng.uniform(0.5, 1.5) * math.pi, (len(tau) - 1) * math.pi / 6)
        m.spin = tau * np.float32(sense * total)
        return m

    return motion


def _scale(sense: int) -> Callable:
    def motion(rng, tau, size):
        m = _calm_motion(rng, tau, size)
        m.log_scale = tau * np.float32(sense * math.log(rng.uniform(1.6, 2.2)))
        return m

    return motion


def _fade(fade_in: bool) -> Callable:
    def motion(rng, tau, size):
        m = _calm_motion(rng, tau, size)
        width = rng.uniform(0.25, 0.5)
        centre = rng.uniform(-0.5 + width / 2, 0.5 - width / 2)  # symmetric: the middle frame can't tell in/out
        ramp = np.clip((tau - (centre - width / 2)) / width, 0.0, 1.0).astype(np.float32)
        m.opacity = ramp if fade_in else 1.0 - ramp
        return m

    return motion


def _accelerate(speeding_up: bool) -> Callable:
    def motion(rng, tau, size):
        m = _calm_motion(rng, tau, size)
        # speed_up: at rest at the start, g'(-1/2) = 0; slow_down is its time reversal, at rest at the end
        progress = tau * tau + tau if speeding_up else tau - tau * tau
        m.offset = progress[:, None] * _unit(rng.uniform(0, 2 * math.pi)) * size * rng.uniform(0.3, 0.5)
        return m

    return motion


def _orbit(sense: int) -> Callable:
    def motion(rng, tau, size):
        m = _calm_motion(rng, tau, size)
        radius = size * rng.uniform(0.1, 0.18)
        phase = rng.uniform(0, 2 * math.pi)
        swept = phase + sense * rng.uniform(1.0, 2.0) * math.pi * tau
        m.offset = radius * (np.stack([np.cos(swept), np.sin(swept)], 1) - _unit(phase))
        return m

    return motion


def _bounce(rng, tau, size):
    m = _calm_motion(rng, tau, size)
    turn = rng.uniform(-0.15, 0.15)  # when it comes back
    out_and_back = np.abs(turn) - np.abs(tau - turn)
    m.offset = out_and_back[:, None] * _unit(rng.uniform(0, 2 * math.pi)) * size * rng.uniform(0.4, 0.6)
    return m


def _shake(rng, tau, size):
    m = _calm_motion(rng, tau, size)
    cycles = min(rng.uniform(2.5, 4.0), (len(tau) - 1) / 4)  # >= 4 frames a cycle: no aliasing
    phase = rng.uniform(0, 2 * math.pi)
    wave = np.sin(2 * math.pi * cycles * tau + phase) - math.sin(phase)
    m.offset = wave[:, None].astype(np.float32) * _unit(rng.uniform(0, 2 * math.pi)) * size * rng.uniform(0.05, 0.09)
    return m


# Screen angles: 0 = right, pi/2 = down (y grows downwards), so "up" is -pi/2 and +1 spins clockwise.
MOTIONS: dict[str, Callable[[np.random.Generator, np.ndarray, int], Motion]] = {
    "move_left": _translate(math.pi),
    "move_right": _translate(0.0),
    "move_up": _translate(-math.pi / 2),
    "move_down": _translate(math.pi / 2),
    "rotate_clockwise": _rotate(+1),
    "rotate_counterclockwise": _rotate(-1),
    "approach": _scale(+1),
    "recede": _scale(-1),
    "appear": _fade(True),
    "disappear": _fade(False),
    "speed_up": _accelerate(True),
    "slow_down": _accelerate(False),
    "orbit_clockwise": _orbit(+1),
    "orbit_counterclockwise": _orbit(-1),
    "bounce": _bounce,
    "shake": _shake,
}
assert tuple(MOTIONS) == CLASS_NAMES


def _clip_time(frames: int) -> np.ndarray:
    """tau: (T,) float32 from -1/2 (first frame) to +1/2 (last frame); 0 is the middle of the clip."""
    return np.linspace(-0.5, 0.5, frames, dtype=np.float32)


def _centre_at_middle(rng: np.random.Generator, offset: np.ndarray, size: int) -> np.ndarray:
    """(2,) centre at tau = 0, uniform over the places that keep the whole path inside CENTRE_BOUNDS."""
    low = CENTRE_BOUNDS[0] * size - offset.min(0)
    high = CENTRE_BOUNDS[1] * size - offset.max(0)
    centre = np.where(low <= high, rng.uniform(np.minimum(low, high), np.maximum(low, high)), (low + high) / 2)
    return centre.astype(np.float32)


def _target_track(spec: SyntheticSpec, index: int, background_mean: np.ndarray) -> Track:
    look = _rng(spec.seed, index, TARGET_LOOK_STREAM)
    shape = str(look.choice(TARGET_SHAPES))
    texture = _random_texture(look, background_mean)
    radius = spec.size * math.exp(look.uniform(*np.log(TARGET_RADIUS)))
    angle = look.uniform(0, 2 * math.pi)

    moves = _rng(spec.seed, index, TARGET_MOTION_STREAM)
    motion = MOTIONS[spec.class_names[label_of(spec, index)]](moves, _clip_time(spec.frames), spec.size)
    centre = _centre_at_middle(moves, motion.offset, spec.size)
    path = centre + motion.offset
    return Track(shape, texture, path[:, 0], path[:, 1], (radius * np.exp(motion.log_scale)).astype(np.float32),
                 (angle + motion.spin).astype(np.float32), motion.opacity.astype(np.float32))


def _distractor_track(rng: np.random.Generator, spec: SyntheticSpec, background_mean: np.ndarray) -> Track:
    """A small object wandering on a smooth random path, independent of the label (it may leave the frame)."""
    tau = _clip_time(spec.frames)
    heading = rng.uniform(0, 2 * math.pi) + rng.uniform(-0.5, 0.5) * math.pi * tau  # slowly turning
    speed = spec.size * rng.uniform(0.0, 0.6)  # pixels per clip
    step = speed / (spec.frames - 1)
    velocity = np.stack([np.cos(heading), np.sin(heading)], 1) * step
    path = rng.uniform(0, spec.size, 2) + np.cumsum(velocity, 0) - velocity[0]
    spin = rng.uniform(0, 2 * math.pi) + rng.uniform(-math.pi, math.pi) * tau
    radius = np.full_like(tau, spec.size * rng.uniform(*DISTRACTOR_RADIUS))
    return Track(str(rng.choice(DISTRACTOR_SHAPES)), _random_texture(rng, background_mean),
                 path[:, 0].astype(np.float32), path[:, 1].astype(np.float32), radius, spin.astype(np.float32),
                 np.ones_like(tau))


# ---- one clip ------------------------------------------------------------------------------------------------------


@dataclass
class RenderedClip:
    """A clip with the layers it was built from (the tests use them to measure what frames reveal)."""

    frames: np.ndarray  # (T, S, S, 3) uint8 RGB
    label: int
    target_coverage: np.ndarray  # (T, S, S) float32 in [0, 1]: the target's coverage before any occlusion
    background: np.ndarray  # (S, S, 3) uint8: the static background under the objects


def render_clip_layers(spec: SyntheticSpec, index: int) -> RenderedClip:
    """Render clip ``index`` of ``spec`` (deterministic in (spec, index)) with its layers."""
    background = _render_background(_rng(spec.seed, index, BACKGROUND_STREAM), spec.size)
    background_mean = background.mean((0, 1))
    target = _target_track(spec, index, background_mean)
    distractor_rng = _rng(spec.seed, index, DISTRACTOR_STREAM)
    distractors = [_distractor_track(distractor_rng, spec, background_mean)
                   for _ in range(int(distractor_rng.integers(1, 4)))]
    above_target = distractor_rng.uniform(size=len(distractors)) < 0.5  # random depth order: occlusions both ways

    canvas = np.repeat(background[None], spec.frames, axis=0)
    for track in [d for d, above in zip(distractors, above_target) if not above]:
        _paint(canvas, *_render_track(track, spec.size))
    target_coverage, target_colour = _render_track(target, spec.size)
    _paint(canvas, target_coverage, target_colour)
    for track in [d for d, above in zip(distractors, above_target) if above]:
        _paint(canvas, *_render_track(track, spec.size))
    return RenderedClip(_to_uint8(canvas), label_of(spec, index), target_coverage, _to_uint8(background))


def render_clip(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, int]:
    """Frames (T, S, S, 3) uint8 RGB and label of clip ``index``: what its mp4 file encodes (lossily, CRF 18)."""
    clip = render_clip_layers(spec, index)
    return clip.frames, clip.label


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


# ---- the dataset on disk ---------------------------------------------------------------------------------------


# Reproducible encoding. x264 reads some uninitialised heap memory when it encodes frames this small (seen up
# to 112 px): the same frames give different bitstreams, and different decoded pixels, from process to process,
# and the MALLOC_PERTURB_ setting changes them. So clips are only ever encoded in worker processes that
#   * fill every fresh heap allocation with a fixed byte (glibc's M_PERTURB), so what x264 reads is always the same;
#   * run on one CPU each, so x264's automatic thread count (hence its output) is 1 on any machine.
# The caller's process is left alone. Elsewhere than glibc/Linux the files are valid but may differ between runs.
M_PERTURB = -6  # glibc's mallopt parameter number
PERTURB_BYTE = 0x5A


def _fill_fresh_heap_memory() -> None:
    try:
        ctypes.CDLL(None).mallopt(M_PERTURB, PERTURB_BYTE)
    except (AttributeError, OSError):  # no glibc: nothing to do
        pass


def _pin_to_one_cpu(slot: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {allowed[slot % len(allowed)]})


def _init_encoder_process(counter) -> None:
    """Pool initializer: the two settings above; ``counter`` hands each worker its own CPU, round robin."""
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    _pin_to_one_cpu(slot)
    _fill_fresh_heap_memory()


def _write_clip(job: tuple[SyntheticSpec, str, int]) -> int:
    """Render and encode one clip (a pool task: top-level and picklable). Returns its index."""
    spec, out_dir, index = job
    frames, _ = render_clip(spec, index)
    write_video(os.path.join(out_dir, relative_path(spec, index)), frames, spec.fps, crf=VIDEO_CRF)
    return index


PROGRESS_STEPS = 4  # a progress line at every quarter: generating 1500 clips takes long enough to look stuck


def _write_all_clips(spec: SyntheticSpec, out_dir: Path, workers: int, start: float | None = None) -> None:
    """Encode every clip in ``workers`` fresh processes (even for 1: see above why never in this one).

    Logs a progress line each time another 1/PROGRESS_STEPS of the clips is written (``start``: the
    ``time.perf_counter()`` the elapsed times count from). Logging never changes what is written.
    """
    start = time.perf_counter() if start is None else start
    jobs = [(spec, str(out_dir), index) for index in range(spec.num_videos)]
    total = len(jobs)
    next_step = 1
    # spawn, not fork: the caller may hold torch/OpenMP threads, which a forked child can deadlock on
    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)
    chunksize = max(1, total // (workers * 8))
    with context.Pool(workers, initializer=_init_encoder_process, initargs=(counter,)) as pool:
        for done, _ in enumerate(pool.imap_unordered(_write_clip, jobs, chunksize=chunksize), 1):
            if done < total and done * PROGRESS_STEPS >= next_step * total:  # the end is the caller's "done" line
                log.info("%d/%d synthetic videos written (%.1f s)", done, total, time.perf_counter() - start)
                next_step = done * PROGRESS_STEPS // total + 1


def split_indices(spec: SyntheticSpec) -> dict[str, list[int]]:
    """Stratified split: round(val_fraction * n_c) videos of each class go to val, at least one stays in train."""
    splits: dict[str, list[int]] = {"train": [], "val": []}
    for label in range(spec.num_classes):
        members = np.arange(label, spec.num_videos, spec.num_classes)
        num_val = min(int(round(spec.val_fraction * len(members))), len(members) - 1)
        shuffled = _rng(spec.seed, label, SPLIT_STREAM).permutation(members)
        splits["val"] += shuffled[:num_val].tolist()
        splits["train"] += shuffled[num_val:].tolist()
    return {name: sorted(indices) for name, indices in splits.items()}


def _list_lines(spec: SyntheticSpec, indices: list[int]) -> list[str]:
    return [f"{relative_path(spec, index)} {label_of(spec, index)}" for index in indices]


def _meta(spec: SyntheticSpec, splits: dict[str, list[int]]) -> dict:
    """The completion marker's content: everything that identifies the dataset, nothing run-dependent."""
    per_class = {
        name: {cls: sum(1 for i in indices if label_of(spec, i) == label) for label, cls in enumerate(spec.class_names)}
        for name, indices in splits.items()
    }
    return {
        "generator_version": GENERATOR_VERSION,
        "spec": folder.spec_json(spec),
        "class_names": list(spec.class_names),
        "layout": "videos/<class_name>/<index:06d>.mp4; lists: '<relative path> <label>'",
        "crf": VIDEO_CRF,
        "counts": {name: len(indices) for name, indices in splits.items()},
        "per_class": per_class,
    }


LISTS = ("train.csv", "val.csv", "labels.txt")  # what the marker vouches for besides the videos

# A finished video, its temporary name while written (datasets.files.partial_path with keep_suffix), and the
# temporary name earlier versions used, so that a killed older generation is cleared too.
_OUR_VIDEO = re.compile(r"\d{6}(\.partial|\.mp4\.partial)?\.mp4")


def _clear_previous_output(out_dir: Path) -> None:
    """Invalidate, then delete what an earlier (maybe partial or different) generation left.

    Only files this generator writes are removed, never anything else a user may have put in ``out_dir``.
    """
    folder.invalidate(out_dir)
    for name in LISTS:
        for path in (out_dir / name, partial_path(out_dir / name), out_dir / f"{name}.partial"):  # last: older name
            path.unlink(missing_ok=True)
    for class_name in CLASS_NAMES:
        folder.remove_matching(out_dir / "videos" / class_name, _OUR_VIDEO)


def _summary(out_dir: Path, meta: dict, seconds: float, generated: bool) -> dict:
    return {
        **meta,
        "out_dir": str(out_dir),
        "videos_dir": str(out_dir / "videos"),
        "train_list": str(out_dir / "train.csv"),
        "val_list": str(out_dir / "val.csv"),
        "labels_file": str(out_dir / "labels.txt"),
        "seconds": seconds,
        "generated": generated,
    }


def default_workers() -> int:
    return os.cpu_count() or 1


def make_synthetic_dataset(out_dir: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(),
                           workers: int | None = None) -> dict:
    """(Re)generate the dataset of ``spec`` under ``out_dir``; returns a summary (counts, paths, seconds).

    ``workers`` processes render and encode clips (default: the number of CPUs). They are always separate,
    spawned processes (see "Reproducible encoding"), so a calling script needs the usual
    ``if __name__ == "__main__":`` guard. The result does not depend on ``workers``.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    workers = max(1, min(workers or default_workers(), spec.num_videos))
    log.info("generating %d synthetic videos into %s ... (%d classes, %d frames of %dx%d, %d worker process(es))",
             spec.num_videos, out_dir, spec.num_classes, spec.frames, spec.size, spec.size, workers)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous_output(out_dir)
    for class_name in spec.class_names:
        (out_dir / "videos" / class_name).mkdir(parents=True, exist_ok=True)

    _write_all_clips(spec, out_dir, workers, start)
    splits = split_indices(spec)
    folder.write_lines(out_dir / "labels.txt", spec.class_names)
    for name, indices in splits.items():
        folder.write_lines(out_dir / f"{name}.csv", _list_lines(spec, indices))
    meta = _meta(spec, splits)
    folder.write_marker(out_dir, meta)
    seconds = time.perf_counter() - start
    log.info("synthetic dataset done in %.1f s (%d train, %d val videos in %s)", seconds, len(splits["train"]),
             len(splits["val"]), out_dir)
    return _summary(out_dir, meta, seconds, generated=True)


def is_complete(out_dir: str | os.PathLike, spec: SyntheticSpec) -> bool:
    """Whether ``out_dir`` holds a finished dataset generated for exactly ``spec`` by this generator version."""
    out_dir = Path(out_dir)
    return folder.is_complete(out_dir, GENERATOR_VERSION, spec, [out_dir / name for name in LISTS])


def ensure_synthetic_dataset(out_dir: str | os.PathLike, spec: SyntheticSpec | None = None,
                             workers: int | None = None, **params) -> dict:
    """Return at once if ``out_dir`` already holds the dataset of ``spec``, else generate it; returns the summary.

    ``params`` override fields of ``spec`` (or of the default spec), e.g. ``ensure_synthetic_dataset(d, seed=3)``.
    The summary's ``generated`` tells which happened.
    """
    spec = dataclasses.replace(spec or SyntheticSpec(), **params)
    out_dir = Path(out_dir)
    if is_complete(out_dir, spec):
        return _summary(out_dir, folder.read_marker(out_dir), 0.0, generated=False)
    return make_synthetic_dataset(out_dir, spec, workers)

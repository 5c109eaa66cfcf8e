"""Which frames of a decoded video make up a clip: pure index arithmetic, no decoding.

Every function returns ints in ``[0, num_frames)``. Training samplers draw from an explicit
``random.Random`` so a clip is reproducible from a seed; evaluation samplers are deterministic.

Two families:

* dense sampling (Kinetics-style, VideoMAE / MAE-ST pre-training and fine-tuning): ``clip_len`` frames
  at a fixed stride ``rate``. The clip *spans* ``(clip_len - 1) * rate + 1`` frames — the nominal
  ``clip_len * rate`` minus the unused tail after the last sample — and a video at least that long never
  needs padding.
* segment sampling (TSN, used for Something-Something v2): the video is cut into ``num_segments`` equal
  parts and one frame is taken from each, so the clip always covers the whole video.

A decoder should decode :func:`union_indices` of all clips it needs from one video (repeated sampling,
multi-view testing) once and cut every clip from that buffer.
"""

from __future__ import annotations

import random
from typing import Literal, Optional

# What to do when a video is shorter than the clip's span: wrap around to the first frame ("loop"),
# or hold the last frame ("repeat_last", as VideoMAE and SlowFast pad).
ShortPolicy = Literal["loop", "repeat_last"]


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_short(short: str) -> None:
    if short not in ("loop", "repeat_last"):
        raise ValueError(f"short must be 'loop' or 'repeat_last', got {short!r}")


# --------------------------------------------------------------------------
# Dense (strided) sampling
# --------------------------------------------------------------------------


def clip_span(clip_len: int, rate: int) -> int:
    """Number of consecutive frames a clip of ``clip_len`` samples at stride ``rate`` covers."""
    _check_positive(clip_len=clip_len, rate=rate)
    return (clip_len - 1) * rate + 1


def _strided(num_frames: int, start: int, clip_len: int, rate: int, short: ShortPolicy) -> list[int]:
    """``clip_len`` indices from ``start`` at stride ``rate``, folded into the video per ``short``.

    Folding only changes anything when the clip runs past the last frame, i.e. for short videos.
    """
    raw = [start + i * rate for i in range(clip_len)]
    if short == "loop":
        return [index % num_frames for index in raw]
    return [min(index, num_frames - 1) for index in raw]


def _centre_start(num_frames: int, span: int) -> int:
    """Start of the clip whose span is centred in the video (0 when the video is too short)."""
    return max(num_frames - span, 0) // 2


def dense_indices(num_frames: int, clip_len: int, rate: int, rng: Optional[random.Random] = None,
                  short: ShortPolicy = "loop") -> list[int]:
    """``clip_len`` frame indices at stride ``rate``.

    With ``rng`` (training) the start is uniform over every position where the clip fits,
    ``[0, num_frames - span]``; without it (validation) the clip is centred. A video shorter than the
    span starts at 0 in both modes and wraps (``short="loop"``: ``i * rate % num_frames``) or holds its last
    frame (``short="repeat_last"``), so the result always has ``clip_len`` entries.
    """
    _check_positive(num_frames=num_frames, clip_len=clip_len, rate=rate)
    _check_short(short)
    span = clip_span(clip_len, rate)
    if num_frames < span:
        start = 0
    elif rng is None:
        start = _centre_start(num_frames, span)
    else:
        start = rng.randint(0, num_frames - span)  # inclusive bounds: the last fitting start is allowed
    return _strided(num_frames, start, clip_len, rate, short)


def repeated_dense_indices(num_frames: int, clip_len: int, rate: int, repeats: int, rng: random.Random,
                           short: ShortPolicy = "loop", max_distance: Optional[int] = None) -> list[list[int]]:
    """MAE-ST repeated sampling: ``repeats`` clips with independent random starts in one video.

    The video is decoded once (see :func:`union_indices`) and yields ``repeats`` training samples, which
    amortizes the decoding cost that dominates video data loading. With ``max_distance`` (VIMPAC's bounded
    distance between the two clips of a video) the first start is uniform and every other one uniform among the
    fitting starts at most ``max_distance`` frames from it.
    """
    _check_positive(repeats=repeats)
    if rng is None:
        raise ValueError("repeated sampling is a training sampler: pass an rng")
    if max_distance is None:
        return [dense_indices(num_frames, clip_len, rate, rng, short) for _ in range(repeats)]
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0 or None, got {max_distance!r}")
    first = dense_indices(num_frames, clip_len, rate, rng, short)
    last_start = max(num_frames - clip_span(clip_len, rate), 0)
    low, high = max(first[0] - max_distance, 0), min(first[0] + max_distance, last_start)
    others = [_strided(num_frames, rng.randint(low, high), clip_len, rate, short) for _ in range(repeats - 1)]
    return [first, *others]


def _spaced_starts(num_frames: int, span: int, num_views: int) -> list[int]:
    """Starts of ``num_views`` clips spread evenly from the first to the last position where a clip fits.

    ``start_k = round(k * (num_frames - span) / (num_views - 1))`` (round half up, in integers so it is
    exact), as VideoMAE and SlowFast space their test clips; one view is the centre clip, and a video
    shorter than the span puts every view at 0.
    """
    room = num_frames - span
    if room <= 0:
        return [0] * num_views
    if num_views == 1:
        return [_centre_start(num_frames, span)]
    denominator = num_views - 1
    return [(2 * k * room + denominator) // (2 * denominator) for k in range(num_views)]


def multiview_temporal_indices(num_frames: int, clip_len: int, rate: int, num_views: int,
                               short: ShortPolicy = "loop") -> list[list[int]]:
    """``num_views`` deterministic dense clips for multi-view testing, evenly spaced across the video.

    With more than one view the first clip starts at frame 0 and the last one ends on the last frame;
    with one view it is the centre clip (the same as :func:`dense_indices` without an rng). On a video
    shorter than the span all views are the same clip.
    """
    _check_positive(num_frames=num_frames, clip_len=clip_len, rate=rate, num_views=num_views)
    _check_short(short)
    span = clip_span(clip_len, rate)
    return [_strided(num_frames, start, clip_len, rate, short)
            for start in _spaced_starts(num_frames, span, num_views)]


# --------------------------------------------------------------------------
# Segment (TSN) sampling
# --------------------------------------------------------------------------


def _segment_positions(num_frames: int, num_segments: int, offsets: list[float]) -> list[int]:
    """Frame at relative position ``offsets[i]`` in [0, 1) of segment ``i``.

    Segment ``i`` is the frames ``[i * num_frames // num_segments, (i + 1) * num_frames // num_segments)``:
    the segments are disjoint, cover every frame and differ in length by at most one (VideoMAE's
    segments of ``num_frames // num_segments`` frames drop the tail of the video instead). When
    ``num_frames < num_segments`` some segments are empty and take the frame where they would start,
    so indices repeat but stay sorted and still cover the video.
    """
    positions = []
    for i, offset in enumerate(offsets):
        start, stop = i * num_frames // num_segments, (i + 1) * num_frames // num_segments
        positions.append(start + int(offset * (stop - start)))  # start itself for an empty segment
    return positions


def segment_indices(num_frames: int, num_segments: int, rng: Optional[random.Random] = None) -> list[int]:
    """TSN sampling: one frame from each of ``num_segments`` equal segments (sorted, non-decreasing).

    Training (``rng`` given) picks a uniform frame inside each segment; evaluation takes each segment's
    middle frame (VideoMAE's SSv2 test takes ``int((i + 0.5) * num_frames / num_segments)``, which is
    the same frame or, for segments of uneven length, one off).
    Works for any ``num_frames >= 1``: a video with fewer frames than segments repeats frames (see
    :func:`_segment_positions`).
    """
    _check_positive(num_frames=num_frames, num_segments=num_segments)
    if rng is None:
        offsets = [0.5] * num_segments
    else:
        offsets = [rng.random() for _ in range(num_segments)]
    return _segment_positions(num_frames, num_segments, offsets)


def multiview_segment_indices(num_frames: int, num_segments: int, num_views: int) -> list[list[int]]:
    """``num_views`` deterministic TSN clips: view ``k`` takes relative position ``(k + 0.5) / num_views``
    in every segment.

    One view is the segment centres (the same as :func:`segment_indices` without an rng); more views
    split each segment evenly. (VideoMAE's two SSv2 test views use positions 0 and 1/2 instead; ours
    are symmetric, 1/4 and 3/4.)
    """
    _check_positive(num_frames=num_frames, num_segments=num_segments, num_views=num_views)
    return [_segment_positions(num_frames, num_segments, [(k + 0.5) / num_views] * num_segments)
            for k in range(num_views)]


# --------------------------------------------------------------------------
# Decoding several clips at once
# --------------------------------------------------------------------------


def union_indices(clips: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """The frames to decode for several clips of one video, and where each clip finds its frames.

    Returns ``(frames, positions)``: ``frames`` is the sorted list of distinct indices over all clips, and
    ``positions[c][i]`` is the position in ``frames`` of ``clips[c][i]``, so a decoded buffer ``buf`` of
    ``len(frames)`` frames gives clip ``c`` as ``buf[positions[c]]``.
    """
    frames = sorted({index for clip in clips for index in clip})
    where = {index: position for position, index in enumerate(frames)}
    return frames, [[where[index] for index in clip] for clip in clips]

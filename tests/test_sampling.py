"""Frame index sampling: lengths, strides, bounds, determinism and the short-video policies."""

import random

import pytest

from datasets.sampling import (
    clip_span,
    dense_indices,
    multiview_segment_indices,
    multiview_temporal_indices,
    repeated_dense_indices,
    segment_indices,
    union_indices,
)


def _strides(clip):
    return {b - a for a, b in zip(clip, clip[1:])}


# --------------------------------------------------------------------------
# Dense sampling
# --------------------------------------------------------------------------


def test_clip_span():
    assert clip_span(16, 4) == 61
    assert clip_span(1, 8) == 1


@pytest.mark.parametrize("num_frames,clip_len,rate", [(300, 16, 4), (61, 16, 4), (100, 8, 1), (10, 1, 3)])
def test_dense_training_clip_has_exact_stride_inside_the_video(num_frames, clip_len, rate):
    for seed in range(50):
        clip = dense_indices(num_frames, clip_len, rate, random.Random(seed))
        assert len(clip) == clip_len
        assert clip_len == 1 or _strides(clip) == {rate}
        assert 0 <= clip[0] and clip[-1] < num_frames


def test_dense_training_start_covers_every_fitting_position():
    num_frames, clip_len, rate = 20, 4, 3  # span 10: starts 0..10
    rng = random.Random(0)
    starts = {dense_indices(num_frames, clip_len, rate, rng)[0] for _ in range(500)}
    assert starts == set(range(num_frames - clip_span(clip_len, rate) + 1))


def test_dense_validation_is_the_centred_clip():
    num_frames, clip_len, rate = 100, 16, 2  # span 31, room 69
    clip = dense_indices(num_frames, clip_len, rate)
    assert clip == dense_indices(num_frames, clip_len, rate)
    assert clip[0] == 69 // 2
    assert abs(clip[0] - (num_frames - 1 - clip[-1])) <= 1  # equal margins on both sides
    assert _strides(clip) == {rate}


def test_dense_is_reproducible_from_a_seed():
    a = [dense_indices(300, 16, 4, random.Random(7)) for _ in range(2)]
    assert a[0] == a[1]


@pytest.mark.parametrize("rng", [None, random.Random(0)])
def test_short_video_loops_or_repeats_last(rng):
    # 5 frames, span 7: the clip starts at 0 in training and in validation alike
    assert dense_indices(5, 4, 2, rng, short="loop") == [0, 2, 4, 1]
    assert dense_indices(5, 4, 2, rng, short="repeat_last") == [0, 2, 4, 4]
    assert dense_indices(1, 3, 5, rng) == [0, 0, 0]


def test_video_exactly_one_span_long_needs_no_padding():
    assert dense_indices(7, 4, 2, random.Random(0)) == [0, 2, 4, 6]
    assert dense_indices(7, 4, 2, short="repeat_last") == [0, 2, 4, 6]


@pytest.mark.parametrize("kwargs", [dict(num_frames=0), dict(clip_len=0), dict(rate=0), dict(short="pad")])
def test_dense_rejects_bad_arguments(kwargs):
    args = dict(num_frames=10, clip_len=4, rate=2) | kwargs
    with pytest.raises(ValueError):
        dense_indices(**args)


# --------------------------------------------------------------------------
# Segment (TSN) sampling
# --------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames,num_segments", [(48, 16), (50, 16), (16, 16), (100, 8)])
def test_segment_training_takes_one_frame_per_segment(num_frames, num_segments):
    for seed in range(30):
        clip = segment_indices(num_frames, num_segments, random.Random(seed))
        assert len(clip) == num_segments
        assert len(set(clip)) == num_segments  # no frame is picked twice
        for i, index in enumerate(clip):
            assert i * num_frames // num_segments <= index < (i + 1) * num_frames // num_segments


def test_segment_training_reaches_both_ends_of_a_segment():
    rng = random.Random(0)
    firsts = {segment_indices(40, 4, rng)[0] for _ in range(300)}
    assert firsts == set(range(10))


def test_segment_evaluation_takes_segment_centres():
    assert segment_indices(40, 4) == [5, 15, 25, 35]
    assert segment_indices(10, 4) == [1, 3, 6, 8]  # middles of [0, 2), [2, 5), [5, 7), [7, 10)
    assert segment_indices(40, 4) == segment_indices(40, 4)


@pytest.mark.parametrize("rng", [None, random.Random(3)])
def test_segment_sampling_repeats_frames_of_a_short_video(rng):
    clip = segment_indices(3, 8, rng)
    assert len(clip) == 8
    assert clip == sorted(clip) and all(0 <= i < 3 for i in clip)
    assert set(clip) == {0, 1, 2}  # the segments still cover the whole video
    assert segment_indices(1, 4, rng) == [0, 0, 0, 0]


# --------------------------------------------------------------------------
# Multi-view testing
# --------------------------------------------------------------------------


def test_one_temporal_view_is_the_centre_clip():
    assert multiview_temporal_indices(100, 16, 2, 1) == [dense_indices(100, 16, 2)]


def test_temporal_views_are_evenly_spaced_from_first_to_last_frame():
    num_frames, clip_len, rate, views = 300, 16, 4, 5  # span 61, room 239
    clips = multiview_temporal_indices(num_frames, clip_len, rate, views)
    assert len(clips) == views
    assert clips[0][0] == 0 and clips[-1][-1] == num_frames - 1
    starts = [clip[0] for clip in clips]
    assert starts == [round(k * 239 / 4 + 1e-9) for k in range(views)]  # 0, 60 (59.75), 120 (119.5), 179, 239
    assert starts == [0, 60, 120, 179, 239]
    for clip in clips:
        assert len(clip) == clip_len and _strides(clip) == {rate}


def test_temporal_views_of_a_short_video_are_all_the_padded_clip():
    clips = multiview_temporal_indices(5, 4, 2, 3, short="repeat_last")
    assert clips == [[0, 2, 4, 4]] * 3


def test_segment_views_split_each_segment():
    assert multiview_segment_indices(40, 4, 1) == [segment_indices(40, 4)]
    views = multiview_segment_indices(40, 4, 2)
    assert views == [[2, 12, 22, 32], [7, 17, 27, 37]]  # positions 1/4 and 3/4 of each 10-frame segment
    for view in multiview_segment_indices(45, 5, 3):
        assert all(i * 9 <= index < (i + 1) * 9 for i, index in enumerate(view))


# --------------------------------------------------------------------------
# Repeated sampling and the decode-once union
# --------------------------------------------------------------------------


def test_repeated_sampling_draws_independent_clips():
    clips = repeated_dense_indices(300, 16, 4, 4, random.Random(0))
    assert len(clips) == 4
    assert len({clip[0] for clip in clips}) > 1
    for clip in clips:
        assert len(clip) == 16 and _strides(clip) == {4} and clip[-1] < 300
    # the same as drawing the clips one after another from the same rng: nothing shared between them
    rng = random.Random(0)
    assert clips == [dense_indices(300, 16, 4, rng) for _ in range(4)]


def test_repeated_sampling_needs_an_rng():
    with pytest.raises(ValueError):
        repeated_dense_indices(300, 16, 4, 2, None)


@pytest.mark.parametrize("clips", [
    repeated_dense_indices(120, 8, 4, 3, random.Random(1)),
    multiview_temporal_indices(50, 8, 8, 4),
    [dense_indices(5, 4, 2), segment_indices(3, 8)],
])
def test_union_reconstructs_every_clip(clips):
    frames, positions = union_indices(clips)
    assert frames == sorted(set(frames))
    assert set(frames) == {i for clip in clips for i in clip}
    assert len(positions) == len(clips)
    for clip, where in zip(clips, positions):
        assert [frames[p] for p in where] == clip

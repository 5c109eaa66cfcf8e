"""AVA keyframes: grouping of CSV rows into boxes with multi-hot targets, the clip around a keyframe in AVA's time base,
boxes that stay on the same pixels through resize, crop and flip, frame folders, and the collate."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.ava.dataset import (
    AVAClipConfig,
    AVAKeyframes,
    Keyframe,
    clip_frame_numbers,
    collate_keyframes,
    crop_boxes,
    full_frame_view,
    group_keyframes,
    jitter_boxes,
    keyframe_number,
    train_view,
)
from datasets.ava.files import BoxTable
from datasets.video_dataset import Failure


def table(rows, scores=None) -> BoxTable:
    """rows: (video, timestamp, x1, y1, x2, y2, action)."""
    n = len(rows)
    return BoxTable(video_id=np.array([r[0] for r in rows], dtype=object),
                    timestamp=np.array([r[1] for r in rows], dtype=np.int64),
                    boxes=np.array([r[2:6] for r in rows], dtype=np.float32).reshape(n, 4),
                    action=np.array([r[6] for r in rows], dtype=np.int64),
                    person_id=np.full(n, -1, dtype=np.int64),
                    score=np.full(n, np.nan, dtype=np.float32) if scores is None else np.array(scores, np.float32),
                    source="test.csv")


def test_rows_of_one_box_become_one_multi_hot_target_and_exclusions_drop_keyframes():
    rows = [("b", 903, .1, .1, .5, .9, 4), ("a", 902, .1, .2, .3, .4, 1), ("a", 902, .1, .2, .3, .4, 3),
            ("a", 902, .5, .5, .9, .9, 2), ("c", 905, .1, .1, .2, .2, 1)]
    keyframes = group_keyframes(table(rows), num_classes=5, excluded={"c,0905"})
    assert [k.key for k in keyframes] == ["a,0902", "b,0903"]
    first = keyframes[0]
    assert first.boxes.shape == (2, 4)
    by_box = {tuple(round(float(v), 2) for v in box): labels for box, labels in zip(first.boxes, first.labels)}
    assert by_box[(.1, .2, .3, .4)].tolist() == [1, 0, 1, 0, 0]
    assert by_box[(.5, .5, .9, .9)].tolist() == [0, 1, 0, 0, 0]
    assert first.scores.tolist() == [1.0, 1.0]


def test_detections_keep_their_scores_and_have_no_targets():
    keyframes = group_keyframes(table([("a", 902, .1, .1, .4, .4, -1), ("a", 902, .5, .5, .8, .8, -1)],
                                      scores=[0.9, 0.85]), num_classes=3)
    assert keyframes[0].scores.tolist() == pytest.approx([0.9, 0.85])
    assert not keyframes[0].labels.any()


def test_an_action_beyond_the_target_columns_is_an_error():
    with pytest.raises(ValueError, match="action id 9 is beyond num_classes=5"):
        group_keyframes(table([("a", 902, .1, .1, .4, .4, 9)]), num_classes=5)


def test_the_clip_is_centred_on_the_keyframe_in_avas_time_base_and_clamped():
    assert keyframe_number(902, AVAClipConfig()) == 61  # (902 - 900) * 30 + 1
    numbers = clip_frame_numbers(100, 16, 4, 1000)
    assert numbers[0] == 68 and numbers[-1] == 128 and numbers[8] == 100  # center - 32 ... center + 28
    assert clip_frame_numbers(5, 4, 4, 1000) == [1, 1, 5, 9]
    assert clip_frame_numbers(95, 4, 4, 100) == [87, 91, 95, 99]
    assert clip_frame_numbers(99, 4, 4, 100) == [91, 95, 99, 100]


def box_clip(box, height=120, width=180, frames=2) -> torch.Tensor:
    """Black frames with a white rectangle over the normalized ``box``: (T, C, H, W) uint8."""
    clip = torch.zeros(frames, 3, height, width, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    clip[:, :, round(y1 * height):round(y2 * height), round(x1 * width):round(x2 * width)] = 255
    return clip


def assert_box_on_the_white_pixels(clip: torch.Tensor, box: np.ndarray, margin: float = 3.0) -> None:
    frame = clip[0, 0].float()
    x1, y1, x2, y2 = box.tolist()
    inside = frame[int(y1 + margin):int(y2 - margin), int(x1 + margin):int(x2 - margin)]
    assert inside.numel() > 0 and inside.min() > 200, "the box's interior is not on the white rectangle"
    outside = frame.clone()
    outside[max(int(y1 - margin), 0):int(y2 + margin) + 1, max(int(x1 - margin), 0):int(x2 + margin) + 1] = 0
    assert outside.max() < 50, "white pixels lie outside the transformed box"


@pytest.mark.parametrize("seed", range(8))
def test_training_views_keep_each_box_on_its_pixels(seed):
    cfg = AVAClipConfig(train_short_side=96, crop=80)
    box = np.array([[0.30, 0.25, 0.60, 0.75]], dtype=np.float32)
    clip, pixels, kept = train_view(box_clip(box[0]), box, cfg, random.Random(seed))
    assert clip.shape[-2:] == (80, 80)
    if kept[0]:
        assert_box_on_the_white_pixels(clip, pixels[0])
    else:  # the crop missed the box: no white may be left
        assert clip.max() < 50


def test_flipped_views_happen_and_keep_boxes_on_their_pixels():
    cfg = AVAClipConfig(train_short_side=96, crop=96)  # the crop is the whole height: only the left offset varies
    box = np.array([[0.05, 0.25, 0.25, 0.75]], dtype=np.float32)
    lefts = set()
    for seed in range(20):
        clip, pixels, kept = train_view(box_clip(box[0], height=96, width=96), box, cfg, random.Random(seed))
        assert kept[0]
        assert_box_on_the_white_pixels(clip, pixels[0])
        lefts.add(pixels[0][0] < 48)
    assert lefts == {True, False}  # both flipped and unflipped views were drawn


def test_the_test_view_keeps_the_whole_non_square_frame():
    cfg = AVAClipConfig(test_short_side=64)
    box = np.array([[0.55, 0.1, 0.95, 0.6]], dtype=np.float32)
    clip, pixels = full_frame_view(box_clip(box[0], height=120, width=180), box, cfg)
    assert clip.shape[-2:] == (64, 96)
    assert_box_on_the_white_pixels(clip, pixels[0], margin=2.0)


def test_boxes_are_clipped_to_the_crop_and_dropped_when_they_leave_it():
    boxes = np.array([[0, 0, 10, 10], [90, 90, 130, 130], [5, 200, 40, 260]], dtype=np.float32)
    moved, kept = crop_boxes(boxes, top=20, left=20, size=100, min_side=1.0)
    assert kept.tolist() == [False, True, False]
    assert moved.tolist() == [[70, 70, 100, 100]]


def test_box_jitter_moves_each_side_within_its_bounds_and_stays_in_the_frame():
    boxes = np.array([[0.2, 0.2, 0.6, 0.8], [0.0, 0.5, 0.1, 1.0]], dtype=np.float32)
    rng = random.Random(0)
    assert jitter_boxes(boxes, (0.0, 0.0, 0.0, 0.0), rng) is boxes
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    outward = np.stack([boxes[:, 0] - 0.2 * width, boxes[:, 1] - 0.1 * height,
                        boxes[:, 2] + 0.2 * width, boxes[:, 3] + 0.1 * height], axis=1).clip(0, 1)
    inward = np.stack([boxes[:, 0] + 0.1 * width, boxes[:, 1] + 0.05 * height,
                       boxes[:, 2] - 0.1 * width, boxes[:, 3] - 0.05 * height], axis=1)
    moved = np.stack([jitter_boxes(boxes, (0.2, 0.1, 0.1, 0.05), rng) for _ in range(500)])
    eps = 1e-6
    assert (moved[..., :2] >= outward[:, :2] - eps).all() and (moved[..., :2] <= inward[:, :2] + eps).all()
    assert (moved[..., 2:] <= outward[:, 2:] + eps).all() and (moved[..., 2:] >= inward[:, 2:] - eps).all()
    assert (moved >= 0).all() and (moved <= 1).all()
    spread = moved.std(axis=0)
    assert (spread[0] > 0.01).all() and (spread[1, [1, 2, 3]] > 0.005).all()  # every unclipped side moves


@pytest.fixture
def frame_root(tmp_path):
    """One video of 40 frames, 4 fps, first second 900, in AVA's naming; frame n is filled with the value n."""
    folder = tmp_path / "frames" / "vid1"
    folder.mkdir(parents=True)
    for number in range(1, 41):
        Image.fromarray(np.full((24, 32, 3), number * 5, np.uint8)).save(folder / f"vid1_{number:06d}.jpg",
                                                                          quality=100)
    return tmp_path


def test_frame_folders_give_the_clip_around_the_keyframe(frame_root):
    cfg = AVAClipConfig(fps=4, clip_len=4, sampling_rate=2, test_short_side=24)
    keyframe = Keyframe("vid1", 905, np.array([[.1, .1, .9, .9]], np.float32), np.zeros((1, 80), np.float32),
                        np.ones(1, np.float32))
    item = AVAKeyframes(frame_root, [keyframe], cfg, train=False)[0]
    assert item["video"].shape == (3, 4, 24, 32)
    center = (905 - 900) * 4 + 1  # frame 21
    values = item["video"][0, :, 12, 16].tolist()
    assert values == pytest.approx([5 * n for n in (center - 4, center - 2, center, center + 2)], abs=2)
    assert item["boxes"][0].tolist() == pytest.approx([3.2, 2.4, 28.8, 21.6], abs=1e-4)


def test_unreadable_keyframes_are_failures_that_name_them(frame_root):
    cfg = AVAClipConfig(fps=4, clip_len=4, sampling_rate=2)
    boxes, labels, scores = np.zeros((1, 4), np.float32), np.zeros((1, 80), np.float32), np.ones(1, np.float32)
    items = AVAKeyframes(frame_root, [Keyframe("vid1", 990, boxes, labels, scores),
                                      Keyframe("missing", 902, boxes, labels, scores)], cfg, train=False)
    late, missing = items[0], items[1]
    assert isinstance(late, Failure) and "vid1,0990" in late.path and "frames 1-40" in late.reason
    assert isinstance(missing, Failure) and "missing,0902" in missing.path and "no frames" in missing.reason


def test_collate_gives_rois_with_the_item_index_and_survives_empty_items():
    def item(index, count):
        return {"video": torch.zeros(3, 2, 8, 8, dtype=torch.uint8), "boxes": torch.ones(count, 4),
                "labels": torch.zeros(count, 5), "scores": torch.ones(count), "index": index}

    batch = collate_keyframes([item(7, 2), Failure(3, "x", "broken"), item(9, 0), item(4, 1)])
    assert batch["video"].shape == (3, 3, 2, 8, 8)
    assert batch["rois"][:, 0].tolist() == [0, 0, 2]
    assert batch["keyframe"].tolist() == [7, 7, 4]
    assert [f.index for f in batch["failures"]] == [3]
    empty = collate_keyframes([Failure(1, "x", "broken")])
    assert empty["video"] is None and empty["rois"] is None

"""The synthetic dataset: real decodable files, VideoMAE lists, determinism, caching, and labels that need motion."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest

from datasets.files import partial_path
from datasets.synthetic.motion import (
    CLASS_NAMES,
    SyntheticSpec,
    ensure_synthetic_dataset,
    make_synthetic_dataset,
    render_clip,
    render_clip_layers,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = SyntheticSpec(num_videos=40, num_classes=8, frames=16, size=32, seed=1)
LUMA = np.array([0.299, 0.587, 0.114])  # BT.601 weights of R, G, B
DIRECTIONS = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1)}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    summary = make_synthetic_dataset(out, SMALL, workers=2)
    return out, summary


def read_list(path: Path) -> list[tuple[str, int]]:
    entries = []
    for line in path.read_text().splitlines():
        fields = line.split(" ")
        assert len(fields) == 2, f"not 'path label': {line!r}"
        entries.append((fields[0], int(fields[1])))
    return entries


def decode(path: Path) -> np.ndarray:
    reader = decord.VideoReader(str(path), num_threads=1)
    return reader.get_batch(list(range(len(reader)))).asnumpy()


# ---- files and lists ----------------------------------------------------------------------------------------


def test_every_listed_video_decodes_to_the_rendered_clip(small_dataset):
    out, _ = small_dataset
    entries = read_list(out / "train.csv") + read_list(out / "val.csv")
    for relative, label in entries:
        frames = decode(out / relative)
        assert frames.shape == (SMALL.frames, SMALL.size, SMALL.size, 3)
        index = int(Path(relative).stem)
        rendered, rendered_label = render_clip(SMALL, index)
        assert rendered_label == label
        # lossy (CRF 18, and chroma at half resolution) but the luma is close: this also catches swapped
        # channels or a wrong frame order
        luma_error = (frames.astype(np.float64) - rendered) @ LUMA
        assert 10 * np.log10(255**2 / np.mean(luma_error**2)) > 30, relative


def test_lists_labels_and_meta(small_dataset):
    out, summary = small_dataset
    train, val = read_list(out / "train.csv"), read_list(out / "val.csv")
    names = list(CLASS_NAMES[: SMALL.num_classes])
    assert (out / "labels.txt").read_text().splitlines() == names

    paths = [p for p, _ in train + val]
    assert sorted(paths) == sorted(f"videos/{names[i % 8]}/{i:06d}.mp4" for i in range(SMALL.num_videos))
    for relative, label in train + val:
        assert 0 <= label < SMALL.num_classes and relative.split("/")[1] == names[label]
        assert (out / relative).is_file()

    # stratified: 5 videos a class, round(0.2 * 5) = 1 of each in val, the rest in train
    for label in range(SMALL.num_classes):
        assert sum(lab == label for _, lab in val) == 1
        assert sum(lab == label for _, lab in train) == 4
    meta = json.loads((out / "meta.json").read_text())
    assert meta["spec"]["seed"] == SMALL.seed and meta["counts"] == {"train": 32, "val": 8}
    assert summary["generated"] and summary["counts"] == meta["counts"]


def test_spec_validation():
    assert SyntheticSpec(num_classes=len(CLASS_NAMES)).class_names == CLASS_NAMES
    assert len(CLASS_NAMES) >= 10
    for bad in (dict(num_classes=len(CLASS_NAMES) + 1), dict(num_classes=0), dict(size=33), dict(frames=2),
                dict(size=16), dict(size=48),
                dict(num_videos=5, num_classes=8), dict(val_fraction=1.0)):
        with pytest.raises(ValueError):
            SyntheticSpec(**bad)


# ---- determinism ----------------------------------------------------------------------------------------------


def test_same_seed_same_dataset_whatever_the_workers(small_dataset, tmp_path):
    out, _ = small_dataset
    again = tmp_path / "again"
    make_synthetic_dataset(again, SMALL, workers=1)
    for name in ("train.csv", "val.csv", "labels.txt", "meta.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    for relative, _ in read_list(out / "val.csv"):
        assert np.array_equal(decode(again / relative), decode(out / relative))


def test_different_seed_different_dataset(small_dataset, tmp_path):
    out, _ = small_dataset
    other = tmp_path / "other"
    make_synthetic_dataset(other, dataclasses.replace(SMALL, seed=2), workers=1)
    assert (other / "val.csv").read_bytes() != (out / "val.csv").read_bytes()
    relative = "videos/move_left/000000.mp4"
    assert not np.array_equal(decode(other / relative), decode(out / relative))


def test_render_clip_is_a_function_of_spec_and_index():
    a, label = render_clip(SMALL, 3)
    assert a.dtype == np.uint8 and a.shape == (16, 32, 32, 3) and label == 3
    assert np.array_equal(a, render_clip(SMALL, 3)[0])
    assert not np.array_equal(a, render_clip(SMALL, 11)[0])  # same class, another clip


# ---- ensure: cached when complete and equal, rebuilt otherwise ------------------------------------------------------


def test_ensure_is_a_no_op_on_a_matching_dataset(tmp_path):
    spec = SyntheticSpec(num_videos=12, num_classes=4, frames=8, size=32)
    assert ensure_synthetic_dataset(tmp_path, spec, workers=1)["generated"]
    watched = [tmp_path / "meta.json", tmp_path / "train.csv", tmp_path / "videos/move_up/000002.mp4"]
    before = [p.stat().st_mtime_ns for p in watched]
    summary = ensure_synthetic_dataset(tmp_path, spec, workers=1)
    assert not summary["generated"] and summary["counts"] == {"train": 8, "val": 4}
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_ensure_regenerates_partial_or_different_datasets(tmp_path):
    spec = SyntheticSpec(num_videos=12, num_classes=4, frames=8, size=32)
    make_synthetic_dataset(tmp_path, spec, workers=1)

    # interrupted run: no marker (a video missing, one left half-written) -> everything is written again
    (tmp_path / "meta.json").unlink()
    (tmp_path / "videos/move_up/000002.mp4").unlink()
    # an index this spec never writes, so only the clean-up can remove it
    leftover = partial_path(tmp_path / "videos/move_up/000099.mp4", keep_suffix=True)
    leftover.write_bytes(b"half")
    assert ensure_synthetic_dataset(tmp_path, spec, workers=1)["generated"]
    assert (tmp_path / "videos/move_up/000002.mp4").is_file() and (tmp_path / "meta.json").is_file()
    assert not leftover.exists()

    # other parameters (given as overrides): rebuilt, and the videos of the old request are gone
    summary = ensure_synthetic_dataset(tmp_path, spec, workers=1, num_videos=8, seed=5)
    assert summary["generated"] and json.loads((tmp_path / "meta.json").read_text())["spec"]["seed"] == 5
    assert not (tmp_path / "videos/move_left/000008.mp4").exists()
    assert len(list(tmp_path.glob("videos/*/*.mp4"))) == 8


def test_generation_says_what_it_is_doing(tmp_path, caplog):
    """A large dataset takes a while: a start line, a line at each quarter and a closing line, through logging."""
    spec = SyntheticSpec(num_videos=12, num_classes=4, frames=8, size=32)
    with caplog.at_level(logging.INFO, logger="datasets.synthetic.motion"):
        ensure_synthetic_dataset(tmp_path, spec, workers=1)
    messages = [record.getMessage() for record in caplog.records if record.name == "datasets.synthetic.motion"]
    assert messages[0].startswith(f"generating 12 synthetic videos into {tmp_path} ...")
    assert [m.split()[0] for m in messages[1:-1]] == ["3/12", "6/12", "9/12"]
    assert messages[-1].startswith("synthetic dataset done in ")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datasets.synthetic.motion"):
        ensure_synthetic_dataset(tmp_path, spec, workers=1)  # complete already: nothing to say
    assert not [record for record in caplog.records if record.name == "datasets.synthetic.motion"]


@pytest.mark.e2e
def test_cli_prints_a_summary(tmp_path):
    command = [sys.executable, str(ROOT / "run_scripts/make_synthetic.py"), "--out", str(tmp_path),
               "--num-videos", "6", "--num-classes", "3", "--frames", "8", "--size", "32", "--workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=True,
                            env={**os.environ, "PYTHONPATH": ""})
    assert "move_up" in result.stdout and "generated in" in result.stdout
    assert "generating 6 synthetic videos" in result.stderr and "done in" in result.stderr  # progress, on stderr
    assert len(read_list(tmp_path / "train.csv")) + len(read_list(tmp_path / "val.csv")) == 6
    bad = subprocess.run(command[:-4] + ["--num-classes", str(len(CLASS_NAMES) + 1)], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "num_classes" in bad.stderr


# ---- the labels are temporal --------------------------------------------------------------------------------------

PROBE = SyntheticSpec(num_videos=400, num_classes=8, frames=16, size=32, seed=7)


@pytest.fixture(scope="module")
def probe_clips():
    return [render_clip_layers(PROBE, index) for index in range(PROBE.num_videos)]


def centroid(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., S, S) weights -> centroid (..., 2) as (x, y) in pixels, and total weight (...)."""
    axis = np.arange(weights.shape[-1]) + 0.5
    total = weights.sum((-2, -1)) + 1e-6
    x = (weights.sum(-2) * axis).sum(-1) / total
    y = (weights.sum(-1) * axis).sum(-1) / total
    return np.stack([x, y], -1), total


def foreground(clip) -> np.ndarray:
    """(T, S, S) 0/1: pixels that differ from the static background (target and distractors)."""
    difference = np.abs(clip.frames.astype(np.int16) - clip.background.astype(np.int16)).max(-1)
    return (difference > 20).astype(np.float64)


def single_frame_features(clip, t: int) -> np.ndarray:
    """What one frame shows: its mean colour, where things are and how much, the target's place, size, colour."""
    frame, coverage = clip.frames[t].astype(np.float64), clip.target_coverage[t]
    fg_centre, fg_amount = centroid(foreground(clip)[t])
    target_centre, target_area = centroid(coverage)
    target_colour = (frame * coverage[..., None]).sum((0, 1)) / target_area
    return np.concatenate([frame.mean((0, 1)), fg_centre, [fg_amount], target_centre, [target_area], target_colour])


def motion_features(clip) -> np.ndarray:
    """Displacement of the foreground's centroid (from the frames) and of the target's, last vs first frames."""
    fg_path, _ = centroid(foreground(clip))
    target_path, _ = centroid(clip.target_coverage)
    return np.concatenate([fg_path[-4:].mean(0) - fg_path[:4].mean(0), target_path[-1] - target_path[0]])


def nearest_class_mean_accuracy(features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Fit class means on the first half (standardized features), score the second half."""
    half = len(labels) // 2
    mean, std = features[:half].mean(0), features[:half].std(0) + 1e-9
    z = (features - mean) / std
    centres = np.stack([z[:half][labels[:half] == k].mean(0) for k in range(num_classes)])
    predicted = ((z[half:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    return float((predicted == labels[half:]).mean())


def test_single_frames_are_at_chance(probe_clips):
    labels = np.array([clip.label for clip in probe_clips])
    chance = 1 / PROBE.num_classes
    random_t = np.random.default_rng(0).integers(0, PROBE.frames, len(probe_clips))
    for name, times in [("middle", [PROBE.frames // 2] * len(probe_clips)), ("random", random_t)]:
        features = np.stack([single_frame_features(clip, t) for clip, t in zip(probe_clips, times)])
        accuracy = nearest_class_mean_accuracy(features, labels, PROBE.num_classes)
        assert accuracy < chance + 0.1, f"{name} frame tells the class: {accuracy:.2f} (chance {chance:.2f})"


def test_motion_tells_the_class(probe_clips):
    labels = np.array([clip.label for clip in probe_clips])
    features = np.stack([motion_features(clip) for clip in probe_clips])
    # the same probe that is at chance on single frames works on motion: all 8 classes well above chance...
    assert nearest_class_mean_accuracy(features, labels, PROBE.num_classes) > 0.45
    # ...and the four directions almost perfectly, from the frames alone (foreground centroid)
    is_direction = labels < 4
    frames_only = features[is_direction, :2]
    assert nearest_class_mean_accuracy(frames_only, labels[is_direction], 4) > 0.9
    for name, (dx, dy) in DIRECTIONS.items():
        shift = features[labels == CLASS_NAMES.index(name), 2:].mean(0)
        assert shift[0] * dx + shift[1] * dy > 0.15 * PROBE.size, (name, shift)


def test_scale_and_fade_classes_change_as_named(probe_clips):
    for clip in probe_clips:
        area = clip.target_coverage.sum((1, 2))
        name = CLASS_NAMES[clip.label]
        if name == "approach":
            assert area[-1] > 1.8 * area[0]
        if name == "recede":
            assert area[0] > 1.8 * area[-1]
    faded = SyntheticSpec(num_videos=20, num_classes=10, frames=16, size=32)
    for index in (8, 9, 18, 19):  # appear, disappear, appear, disappear
        area = render_clip_layers(faded, index).target_coverage.sum((1, 2))
        assert (area[0] < area[-1]) == (index % 10 == 8) and min(area[0], area[-1]) < 1e-3


def test_time_reversed_direction_clips_look_like_the_opposite_class(probe_clips):
    labels = np.array([clip.label for clip in probe_clips])
    is_direction = labels < 4
    forward = np.stack([motion_features(clip)[:2] for clip in probe_clips])[is_direction]
    centres = np.stack([forward[labels[is_direction] == k].mean(0) for k in range(4)])
    opposite = {0: 1, 1: 0, 2: 3, 3: 2}
    reversed_right = []
    for clip in [c for c in probe_clips if c.label < 4]:
        backward = dataclasses.replace(clip, frames=clip.frames[::-1], target_coverage=clip.target_coverage[::-1])
        predicted = int(((centres - motion_features(backward)[:2]) ** 2).sum(-1).argmin())
        reversed_right.append(predicted == opposite[clip.label])
    assert np.mean(reversed_right) > 0.9

"""The synthetic AVA dataset: files the AVA readers accept, AVA's frame numbering, boxes on the actors, a label
map that leaves an action out, a plausible person detector, reuse of a complete folder, and actions that only
motion reveals."""

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.ava.files import (
    filter_detections,
    keep_label_map_actions,
    read_ava_csv,
    read_excluded_timestamps,
    read_label_map,
)
from datasets.files import partial_path
from datasets.synthetic.ava import (
    ACTIONS,
    APPROACH,
    AVA_FIRST_SECOND,
    DIRECTIONS,
    EVALUATED_IDS,
    FALSE_MAX_IOU,
    FLASH,
    GENERATOR_VERSION,
    MOTION_IDS,
    MOVE_SPEED,
    NOT_EVALUATED_ID,
    STAND_STILL,
    TRUE_SCORES,
    SyntheticAVASpec,
    actor_boxes,
    detect,
    ensure_synthetic_ava,
    excluded_keyframes,
    keyframe_number,
    make_synthetic_ava,
    plan_video,
    render_background,
    render_frames,
    split_videos,
    video_id,
)

DEFAULT = SyntheticAVASpec()
SMALL = SyntheticAVASpec(num_videos=6, num_val_videos=2, seconds=3, seed=5)
SPLITS = ("train", "val")
LUMA = np.array([0.299, 0.587, 0.114])  # BT.601 weights of R, G, B


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The default dataset, generated once for the module."""
    return ensure_synthetic_ava(tmp_path_factory.mktemp("ava"), DEFAULT)


@pytest.fixture(scope="module")
def plans():
    return {video_id(index): plan_video(DEFAULT, index) for index in range(DEFAULT.num_videos)}


def read_frame(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def gt_boxes(table) -> dict[tuple[str, int], np.ndarray]:
    """(keyframe key, person id) -> normalized box, checking that a person's rows at a keyframe share the box."""
    boxes: dict[tuple[str, int], np.ndarray] = {}
    for key, person, box in zip(table.keys().tolist(), table.person_id.tolist(), table.boxes):
        if (key, person) in boxes:
            assert np.array_equal(boxes[key, person], box), (key, person)
        boxes[key, person] = box
    return boxes


def pixels(box: np.ndarray, spec: SyntheticAVASpec) -> np.ndarray:
    return box * np.array([spec.width, spec.height, spec.width, spec.height])


def box_mask(box: np.ndarray, spec: SyntheticAVASpec, grow: float) -> np.ndarray:
    """(H, W) bool: pixels whose centre lies in the pixel box ``box`` grown by ``grow`` pixels (shrunk if < 0)."""
    ys, xs = np.arange(spec.height) + 0.5, np.arange(spec.width) + 0.5
    inside_y = (ys > box[1] - grow) & (ys < box[3] + grow)
    inside_x = (xs > box[0] - grow) & (xs < box[2] + grow)
    return inside_y[:, None] & inside_x[None, :]


def isolated(plan, actor: int, numbers, margin: float = 3.0) -> bool:
    """Whether ``actor``'s boxes in those frames stay ``margin`` pixels away from every other actor's."""
    boxes = actor_boxes(plan, numbers)
    mine = boxes[actor]
    for other in range(plan.num_actors):
        if other == actor:
            continue
        theirs = boxes[other]
        apart = ((mine[:, 2] + margin <= theirs[:, 0]) | (theirs[:, 2] + margin <= mine[:, 0])
                 | (mine[:, 3] + margin <= theirs[:, 1]) | (theirs[:, 3] + margin <= mine[:, 1]))
        if not apart.all():
            return False
    return True


# ---- the spec ------------------------------------------------------------------------------------------------------


def test_spec_defaults_and_validation():
    assert (DEFAULT.height, DEFAULT.width, DEFAULT.fps, DEFAULT.seconds) == (64, 80, 8, 6)
    assert list(DEFAULT.keyframe_seconds) == list(range(902, 908))
    assert DEFAULT.num_frames == (6 + 3) * 8  # from second 900 to 2 s past the last keyframe, 907
    for bad in (dict(num_videos=1), dict(num_val_videos=0), dict(num_val_videos=24), dict(seconds=0),
                dict(fps=3), dict(fps=8.0), dict(height=16), dict(actors=(0, 2)), dict(actors=(3, 2)), dict(miss_rate=1.5),
                dict(box_jitter=0.5), dict(jpeg_quality=100), dict(false_positives=-1), dict(num_videos=1001),
                dict(excluded_per_split=6 * 6 + 1)):
        with pytest.raises(ValueError):
            SyntheticAVASpec(**bad)


# ---- files and readers ---------------------------------------------------------------------------------------------


def test_layout_and_meta(dataset):
    root = dataset.root
    assert dataset.generated and dataset.seconds > 0
    names = sorted(path.name for path in (root / "annotations").iterdir())
    assert names == sorted(["ava_train_v2.2.csv", "ava_val_v2.2.csv", "ava_action_list_v2.2.pbtxt",
                            "ava_train_excluded_timestamps_v2.2.csv", "ava_val_excluded_timestamps_v2.2.csv",
                            "ava_train_predicted_person_boxes.csv", "ava_val_predicted_person_boxes.csv"])
    videos = sorted(path.name for path in (root / "frames").iterdir())
    assert videos == [f"ava-syn_{index:03d}" for index in range(DEFAULT.num_videos)]
    assert all(len(video) == 11 for video in videos)  # like YouTube ids
    meta = json.loads(dataset.meta.read_text())
    assert meta["generator_version"] == GENERATOR_VERSION and meta["spec"]["actors"] == [1, 3]
    assert meta["fps"] == 8 and meta["first_second"] == 900 and meta["keyframe_seconds"] == [902, 907]
    assert meta["counts"]["videos"] == {"train": 18, "val": 6}
    assert sorted(meta["videos"]["train"] + meta["videos"]["val"]) == videos
    assert dataset.split("val") == {"csv": dataset.val_csv, "detections": dataset.val_detections,
                                    "excluded": dataset.val_excluded}


def test_files_read_back_with_the_ava_readers(dataset):
    label_map = read_label_map(dataset.label_map)
    for split in SPLITS:
        files = dataset.split(split)
        truth = read_ava_csv(files["csv"], kind="groundtruth")
        detections = read_ava_csv(files["detections"], kind="detections")
        excluded = read_excluded_timestamps(files["excluded"])
        assert len(truth) and len(detections) and len(excluded) == DEFAULT.excluded_per_split
        assert np.isnan(truth.score).all() and (truth.person_id >= 0).all()
        assert (detections.action == -1).all() and np.isfinite(detections.score).all()
        assert set(truth.video_id.tolist()) == {video_id(i) for i in split_videos(DEFAULT)[split]}
        assert set(truth.timestamp.tolist()) == set(DEFAULT.keyframe_seconds)
        # multi-label: a flashing actor has two rows with one box
        assert len(truth) > len(gt_boxes(truth))
        kept, dropped = keep_label_map_actions(truth, label_map)
        assert set(dropped) == {NOT_EVALUATED_ID} and len(kept) + dropped[NOT_EVALUATED_ID] == len(truth)
        # rows come sorted by video and time, as in AVA's files
        keys = truth.keys().tolist()
        assert keys == sorted(keys)


def test_same_spec_same_bytes_and_another_seed_differs(dataset, tmp_path):
    again = make_synthetic_ava(tmp_path / "again", DEFAULT)
    for path in sorted(dataset.annotations_dir.iterdir()) + [dataset.meta]:
        assert (again.root / path.relative_to(dataset.root)).read_bytes() == path.read_bytes(), path.name
    for video, number in (("ava-syn_000", 1), ("ava-syn_017", 40)):
        assert again.frame_path(video, number).read_bytes() == dataset.frame_path(video, number).read_bytes()
    other = make_synthetic_ava(tmp_path / "other", dataclasses.replace(DEFAULT, seed=1))
    assert other.train_csv.read_bytes() != dataset.train_csv.read_bytes()


def test_label_map_leaves_out_one_used_action(dataset):
    label_map = read_label_map(dataset.label_map)
    assert tuple(label_map) == EVALUATED_IDS and NOT_EVALUATED_ID not in label_map
    used = set()
    for split in SPLITS:
        used |= set(read_ava_csv(dataset.split(split)["csv"], kind="groundtruth").action.tolist())
    assert used == set(ACTIONS)  # every action occurs, the left-out one included
    assert set(label_map.values()) == {ACTIONS[action] for action in EVALUATED_IDS}


# ---- frames: AVA's numbering -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [8, 5])
def test_frames_follow_the_ava_numbering(fps, dataset, tmp_path):
    spec = DEFAULT if fps == DEFAULT.fps else dataclasses.replace(SMALL, fps=fps)
    paths = dataset if spec is DEFAULT else make_synthetic_ava(tmp_path, spec)
    truth = read_ava_csv(paths.train_csv, kind="groundtruth")
    for video, second in set(zip(truth.video_id.tolist(), truth.timestamp.tolist())):
        keyframe = keyframe_number(second, fps)
        assert keyframe == (second - 900) * fps + 1
        for number in range(keyframe - 2 * fps, keyframe + 2 * fps):  # 2 s either side
            assert paths.frame_path(video, number).is_file(), (video, number)
    for index in range(spec.num_videos):
        names = sorted(path.name for path in (paths.frames_dir / video_id(index)).iterdir())
        assert names == [f"{video_id(index)}_{n:06d}.jpg" for n in range(1, spec.num_frames + 1)]
        with Image.open(paths.frame_path(video_id(index), 1)) as image:
            assert image.format == "JPEG" and image.size == (spec.width, spec.height)  # PIL: (W, H)
    # The keyframe file holds the keyframe instant: it matches the rendering of that frame (up to JPEG error,
    # mostly in the grain and the chroma) better than the renderings of its neighbours.
    plan = plan_video(spec, split_videos(spec)["train"][0])
    keyframe = keyframe_number(spec.keyframe_seconds[-1], fps)
    stored = read_frame(paths.frame_path(plan.video_id, keyframe))
    errors = [np.abs((stored - rendered / 255.0) @ LUMA).mean()
              for rendered in render_frames(plan, [keyframe, keyframe - 1, keyframe + 1])]
    assert errors[0] < 0.02 and errors[0] < 0.7 * min(errors[1:]), errors


# ---- boxes ---------------------------------------------------------------------------------------------------------


def test_gt_boxes_are_the_actors_at_the_keyframe(dataset, plans):
    """Each box is the actor's rectangle in the keyframe JPEG: inside it the frame differs from the background,
    outside every box it is the background (plus noise and JPEG error)."""
    inside_differences = []
    for split in SPLITS:
        boxes = gt_boxes(read_ava_csv(dataset.split(split)["csv"], kind="groundtruth"))
        by_keyframe = defaultdict(dict)
        for (key, person), box in boxes.items():
            by_keyframe[key][person] = pixels(box, DEFAULT)
        for key, people in by_keyframe.items():
            video, second = key.split(",")
            plan = plans[video]
            expected = actor_boxes(plan, [keyframe_number(int(second), DEFAULT.fps)])[:, 0]
            assert sorted(people) == list(range(plan.num_actors))
            frame = read_frame(dataset.frame_path(video, keyframe_number(int(second), DEFAULT.fps)))
            difference = np.abs(frame - render_background(DEFAULT, plan.index)).mean(-1)
            anywhere = np.zeros(difference.shape, bool)
            for person, box in people.items():
                np.testing.assert_allclose(box, expected[person], atol=0.0006 * DEFAULT.width)  # 3 decimals
                inside_differences.append(difference[box_mask(box, DEFAULT, -1.0)].mean())
                anywhere |= box_mask(box, DEFAULT, 2.0)
            assert difference[~anywhere].mean() < 0.045, key  # noise and JPEG error: about 0.03
    assert min(inside_differences) > 0.09 and np.median(inside_differences) > 0.2


def test_detections_find_the_actors_within_the_jitter_plus_false_positives(dataset, plans):
    jitter = DEFAULT.box_jitter
    total_missed, false_scores = 0, []
    for split in SPLITS:
        files = dataset.split(split)
        truth = gt_boxes(read_ava_csv(files["csv"], kind="groundtruth"))
        detections = read_ava_csv(files["detections"], kind="detections")
        expected_rows, missed = [], set()
        for index in split_videos(DEFAULT)[split]:
            plan = plans[video_id(index)]
            found = detect(plan)
            expected_rows += found.rows
            missed |= {(f"{plan.video_id},{second:04d}", person) for second, person in found.missed}
        assert files["detections"].read_text().splitlines() == expected_rows
        total_missed += len(missed)

        keys = detections.keys()
        hit = np.zeros(len(detections), bool)
        for (key, person), box in truth.items():
            size = np.tile(box[2:] - box[:2], 2)
            at = np.flatnonzero(keys == key)
            close = (np.abs(detections.boxes[at] - box) <= jitter * size + 0.0015).all(axis=1)
            if (key, person) in missed:
                assert not close.any(), (key, person)
            else:
                assert close.any(), (key, person)
                assert (detections.score[at[close]] >= TRUE_SCORES[0] - 0.0005).all()
            hit[at[close]] = True
        # what is left is false: away from every actor of its keyframe
        false_scores += detections.score[~hit].tolist()
        for row in np.flatnonzero(~hit):
            others = np.array([box for (key, _), box in truth.items() if key == keys[row]])
            assert iou(detections.boxes[row], others).max() < FALSE_MAX_IOU + 0.01
        # a 0.8 threshold (VideoMAE's) keeps every true detection, and the false ones scored above it
        assert (detections.score[hit] >= 0.8).all()
        assert len(filter_detections(detections, 0.8)) == hit.sum() + (detections.score[~hit] >= 0.8).sum()
    boxes = sum(plan.num_actors for plan in plans.values()) * DEFAULT.seconds
    assert 0 < total_missed < 3 * DEFAULT.miss_rate * boxes
    assert len(false_scores) > 0.5 * DEFAULT.false_positives * DEFAULT.num_videos * DEFAULT.seconds
    assert sum(score >= 0.8 for score in false_scores) >= 3 and min(false_scores) < 0.5


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / union


def test_excluded_timestamps_are_existing_keyframes_of_their_split(dataset):
    for split in SPLITS:
        files = dataset.split(split)
        excluded = read_excluded_timestamps(files["excluded"])
        assert excluded == {f"{video},{second:04d}" for video, second in excluded_keyframes(DEFAULT, split)}
        truth_keys = set(read_ava_csv(files["csv"], kind="groundtruth").keys().tolist())
        detection_keys = set(read_ava_csv(files["detections"], kind="detections").keys().tolist())
        assert excluded <= truth_keys and excluded <= detection_keys  # rows kept: the evaluator skips them
        for key in excluded:
            video, second = key.split(",")
            assert dataset.frame_path(video, keyframe_number(int(second), DEFAULT.fps)).is_file()


# ---- the actions need motion -----------------------------------------------------------------------------------------


def test_a_keyframe_is_the_same_image_whatever_the_actions(plans):
    """The keyframe layout and look come from generators that never see the actions: other actions (here every
    motion shifted to the next one and every flash toggled) leave every keyframe identical and change the frames
    around it."""
    plan = next(plan for plan in plans.values() if plan.num_actors == 3)
    motion_ids = np.array(MOTION_IDS)
    shifted = motion_ids[(np.searchsorted(motion_ids, plan.motion) + 1) % len(motion_ids)]
    other = dataclasses.replace(plan, motion=shifted, flash=~plan.flash)
    keyframes = [keyframe_number(second, DEFAULT.fps) for second in DEFAULT.keyframe_seconds]
    assert np.array_equal(render_frames(plan, keyframes), render_frames(other, keyframes))
    for step in (-3, -1, 1, 3):
        around = [number + step for number in keyframes]
        assert not np.array_equal(render_frames(plan, around), render_frames(other, around)), step

    # The same through the spec: the action parameters change the actions only, never the keyframe layout.
    calmer = plan_video(dataclasses.replace(DEFAULT, keep_action=0.9, flash_probability=0.05), plan.index)
    assert not np.array_equal(calmer.motion, plan.motion)
    assert np.array_equal(calmer.centre, plan.centre) and np.array_equal(calmer.size, plan.size)
    assert np.array_equal(render_frames(calmer, keyframes), render_frames(plan, keyframes))


def test_the_frames_around_a_keyframe_show_the_motion(dataset, plans):
    """Between keyframe - k and keyframe + k (inside the keyframe's shot) the actor moves the way its action
    says; measured on the JPEGs, by the centroid of the pixels that differ from the background."""
    k = (DEFAULT.fps - 1) // 2  # the farthest step both ways inside the shot
    span = 2 * k / DEFAULT.fps  # seconds between the two frames
    extent = np.array([DEFAULT.width, DEFAULT.height])
    checked = defaultdict(int)
    for plan in plans.values():
        background = render_background(DEFAULT, plan.index)
        for second in DEFAULT.keyframe_seconds:
            keyframe = keyframe_number(second, DEFAULT.fps)
            before, after = actor_boxes(plan, [keyframe - k, keyframe + k]).transpose(1, 0, 2)
            for actor in range(plan.num_actors):
                motion, *_ = plan.labels(actor, second)
                shift = (before[actor, :2] + before[actor, 2:]) / 2, (after[actor, :2] + after[actor, 2:]) / 2
                moved = shift[1] - shift[0]
                growth = (after[actor, 3] - after[actor, 1]) / (before[actor, 3] - before[actor, 1])
                direction = np.array(DIRECTIONS[motion])
                # the plan: the moves go their way at >= MOVE_SPEED[0], the others barely move
                if direction.any():
                    assert moved @ direction >= 0.9 * MOVE_SPEED[0] * span * extent @ np.abs(direction)
                    assert abs(moved @ direction[::-1]) < 0.05 * span * extent.max()
                else:
                    assert np.abs(moved).max() < 0.05 * span * extent.max()
                assert growth > 1.3 if motion == APPROACH else abs(np.log(growth)) < 0.1
                # the pixels of an isolated actor, fully in view, say the same
                numbers = [keyframe - k, keyframe + k]
                if not isolated(plan, actor, numbers) or (before[actor, :2] < 0).any() \
                        or (after[actor, :2] < 0).any() or (before[actor, 2:] > extent).any() \
                        or (after[actor, 2:] > extent).any():
                    continue
                region = box_mask(np.concatenate([np.minimum(before[actor, :2], after[actor, :2]),
                                                  np.maximum(before[actor, 2:], after[actor, 2:])]), DEFAULT, 2.0)
                centroids = []
                for number in numbers:
                    frame = read_frame(dataset.frame_path(plan.video_id, number))
                    changed = (np.abs(frame - background).mean(-1) > 0.08) & region
                    ys, xs = np.nonzero(changed)
                    centroids.append(np.array([xs.mean(), ys.mean()]))
                seen = centroids[1] - centroids[0]
                if direction.any():
                    assert seen @ direction > 0.5 * MOVE_SPEED[0] * span * extent @ np.abs(direction), (plan.video_id,
                                                                                                       second, actor)
                else:
                    assert np.abs(seen).max() < 3.0, (plan.video_id, second, actor, seen)
                checked[motion] += 1
    assert all(checked[motion] >= 3 for motion in MOTION_IDS), dict(checked)


def test_a_flash_shows_in_the_next_frames(dataset, plans):
    """A flashing actor is brighter one frame after the keyframe (a quarter cycle: the flash at its peak) and
    darker three frames after; a steady one keeps its brightness. Measured on the JPEGs, inside the box."""
    steps = {FLASH: [], "steady": []}
    for plan in plans.values():
        for second in DEFAULT.keyframe_seconds:
            keyframe = keyframe_number(second, DEFAULT.fps)
            numbers = [keyframe, keyframe + 1, keyframe + 3]
            boxes = actor_boxes(plan, numbers)
            frames = [read_frame(dataset.frame_path(plan.video_id, n)) for n in numbers]
            for actor in range(plan.num_actors):
                if not isolated(plan, actor, numbers) or (boxes[actor, :, :2] < 0).any() \
                        or (boxes[actor, :, 2] > DEFAULT.width).any() or (boxes[actor, :, 3] > DEFAULT.height).any():
                    continue
                brightness = [frame[box_mask(box, DEFAULT, -1.5)].mean() for frame, box in zip(frames, boxes[actor])]
                kind = FLASH if FLASH in plan.labels(actor, second) else "steady"
                steps[kind].append((brightness[1] - brightness[0], brightness[2] - brightness[0]))
    flash, steady = np.array(steps[FLASH]), np.array(steps["steady"])
    assert len(flash) >= 10 and len(steady) >= 10
    assert (flash[:, 0] > 0.1).all() and (flash[:, 1] < -0.1).all()
    assert (np.abs(steady) < 0.08).all(), np.abs(steady).max(0)


def test_actions_are_multi_label_and_keep_going(plans):
    """A box has one motion and maybe a flash; actors often keep their action into the next second, as in AVA."""
    kept = changed = flashing_movers = 0
    for plan in plans.values():
        for actor in range(plan.num_actors):
            labels = [plan.labels(actor, second) for second in DEFAULT.keyframe_seconds]
            for previous, current in zip(labels, labels[1:]):
                kept += previous[0] == current[0]
                changed += previous[0] != current[0]
            for current in labels:
                assert current[0] in MOTION_IDS and current[1:] in ((), (FLASH,))
                flashing_movers += len(current) == 2 and current[0] != STAND_STILL
    assert kept > changed > 0 and flashing_movers > 0


# ---- reuse and regeneration ------------------------------------------------------------------------------------------


def all_files(root: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


def test_ensure_reuses_a_complete_dataset(tmp_path):
    first = ensure_synthetic_ava(tmp_path, SMALL)
    assert first.generated
    before = all_files(tmp_path)
    assert len(before) == 8 + SMALL.num_videos * SMALL.num_frames  # 7 annotation files and meta.json
    again = ensure_synthetic_ava(tmp_path, SMALL)
    assert not again.generated and again.train_csv == first.train_csv
    assert all_files(tmp_path) == before  # nothing rewritten


def test_ensure_regenerates_a_partial_or_different_dataset(tmp_path):
    ensure_synthetic_ava(tmp_path, SMALL)
    contents = {path: path.read_bytes() for path in all_files(tmp_path)}
    # an interrupted run: no marker, a frame missing, a temporary file left; a user's own file must survive
    (tmp_path / "meta.json").unlink()
    lost = tmp_path / "frames/ava-syn_001/ava-syn_001_000007.jpg"
    lost.unlink()
    leftover = partial_path(tmp_path / "frames/ava-syn_001/ava-syn_001_000099.jpg")
    leftover.write_bytes(b"half")
    mine = tmp_path / "frames/notes.txt"
    mine.write_text("keep me")
    again = ensure_synthetic_ava(tmp_path, SMALL)
    assert again.generated and not leftover.exists() and mine.read_text() == "keep me"
    assert {path: path.read_bytes() for path in all_files(tmp_path) if path != mine} == contents

    # a marker present but a frame gone: incomplete too
    lost.unlink()
    assert ensure_synthetic_ava(tmp_path, SMALL).generated and lost.is_file()

    # another spec (given as overrides): rebuilt, and the videos of the old one are gone
    smaller = ensure_synthetic_ava(tmp_path, SMALL, num_videos=4, seed=6)
    assert smaller.generated and json.loads(smaller.meta.read_text())["spec"]["seed"] == 6
    assert sorted(path.name for path in (tmp_path / "frames").iterdir()) == [
        "ava-syn_000", "ava-syn_001", "ava-syn_002", "ava-syn_003", "notes.txt"]
    assert not ensure_synthetic_ava(tmp_path, dataclasses.replace(SMALL, num_videos=4, seed=6)).generated


def test_the_time_base_is_avas():
    assert AVA_FIRST_SECOND == 900 and keyframe_number(902, 30) == 61 and keyframe_number(1798, 30) == 26941
    assert keyframe_number(902, 8) == 17 and keyframe_number(900, 8) == 1

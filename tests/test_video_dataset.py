"""Datasets of clips from real H.264 files: repeated sampling, test views, failures reported not replaced."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets.transforms import AugmentConfig
from datasets.video_dataset import DataConfig, EvalClips, Failure, TrainClips, collate_clips, load_records
from datasets.video_io import write_video

FRAMES, HEIGHT, WIDTH = 40, 48, 64


def brightness_video(path, num_frames, offset=0):
    """Frame i is a flat grey of level 5·i + offset: the decoded level tells which frame was sampled."""
    write_video(str(path), (np.full((HEIGHT, WIDTH, 3), 5 * i + offset, np.uint8) for i in range(num_frames)),
                fps=25, gop=8, crf=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    brightness_video(root / "a.mp4", FRAMES)
    brightness_video(root / "b c.mp4", FRAMES, offset=2)  # a path with a space
    brightness_video(root / "short.mp4", 5)
    (root / "corrupt.mp4").write_bytes(b"\x00not a video" * 100)
    (root / "train.csv").write_text("a.mp4 0\nb c.mp4 1\nshort.mp4 2\ncorrupt.mp4 1\n")
    return root


def config(corpus, **kwargs):
    fields = dict(train_list=str(corpus / "train.csv"), val_list=str(corpus / "train.csv"), root=str(corpus),
                  train_augment=AugmentConfig(kind="multi_scale", flip=False),
                  eval_augment=AugmentConfig(kind="eval", short_side=32))
    fields.update(kwargs)
    return DataConfig(**fields)


def levels(clip):
    """The frame index each sampled frame came from: mean grey level / 5 (uint8 (C, T, H, W))."""
    return (clip.float().mean(dim=(0, 2, 3)) / 5).round().long().tolist()


def test_repeated_sampling_cuts_independent_clips_from_one_decode(corpus):
    data = TrainClips(load_records(config(corpus), "train"), config(corpus), clip_len=4, size=32, repeats=3)
    item = data[0]
    assert item["video"].shape == (3, 3, 4, 32, 32) and item["video"].dtype == torch.uint8
    for clip in item["video"]:
        frames = levels(clip)
        assert [b - a for a, b in zip(frames, frames[1:])] == [4, 4, 4]  # sampling_rate 4
    assert len({tuple(levels(clip)) for clip in item["video"]}) > 1


def test_training_items_are_reproducible_by_seed_epoch_and_index(corpus):
    records, cfg = load_records(config(corpus), "train"), config(corpus)
    a = TrainClips(records, cfg, clip_len=4, size=32, repeats=2, seed=5)
    b = TrainClips(records, cfg, clip_len=4, size=32, repeats=2, seed=5)
    assert torch.equal(a[1]["video"], b[1]["video"])
    b.set_epoch(1)
    assert not all(torch.equal(a[i]["video"], b[i]["video"]) for i in (0, 1))


def test_unreadable_and_short_videos_are_failures_not_substitutes(corpus):
    cfg = config(corpus, short_video="skip")
    data = TrainClips(load_records(cfg, "train"), cfg, clip_len=4, size=32)
    short, corrupt = data[2], data[3]
    assert isinstance(short, Failure) and short.path.endswith("short.mp4") and "span" in short.reason
    assert isinstance(corrupt, Failure) and corrupt.path.endswith("corrupt.mp4")
    batch = collate_clips([data[i] for i in range(4)])
    assert batch["video"].shape[0] == 2 and batch["index"].tolist() == [0, 1]
    assert [f.index for f in batch["failures"]] == [2, 3]


def test_short_videos_loop_when_asked(corpus):
    cfg = config(corpus, short_video="loop")
    data = TrainClips(load_records(cfg, "train"), cfg, clip_len=4, size=32)
    assert levels(data[2]["video"][0]) == [0, 4 % 5, 8 % 5, 12 % 5]


def test_test_views_are_deterministic_spread_and_cropped(corpus):
    cfg = config(corpus, test_temporal_views=3, eval_augment=AugmentConfig(kind="eval", short_side=32,
                                                                              num_spatial_views=3))
    data = EvalClips(load_records(cfg, "val"), cfg, clip_len=4, size=32)
    assert len(data) == 4 * 3
    starts = [levels(data[view]["video"][0])[0] for view in range(3)]
    assert starts == [0, 14, 27]  # evenly spaced over the 40 - 13 possible starts
    item = data[1]
    assert item["video"].shape == (3, 3, 4, 32, 32) and item["view"] == 1 and item["index"] == 0
    assert torch.equal(data[1]["video"], item["video"])
    assert isinstance(data[3 * 3], Failure)  # the corrupt video, reported with its index
    assert data[3 * 3].index == 3


def test_collate_repeats_labels_per_clip(corpus):
    cfg = config(corpus)
    data = TrainClips(load_records(cfg, "train"), cfg, clip_len=4, size=32, repeats=2)
    batch = collate_clips([data[0], data[1]])
    assert batch["video"].shape == (4, 3, 4, 32, 32)
    assert batch["label"].tolist() == [0, 0, 1, 1] and batch["index"].tolist() == [0, 0, 1, 1]
    empty = collate_clips([Failure(3, "x", "y")])
    assert empty["video"] is None and len(empty["failures"]) == 1


def test_loader_with_workers(corpus):
    cfg = config(corpus)
    data = TrainClips(load_records(cfg, "train"), cfg, clip_len=4, size=32, repeats=2)
    loader = DataLoader(data, batch_size=2, num_workers=2, collate_fn=collate_clips)
    batches = list(loader)
    assert sum(b["video"].shape[0] for b in batches if b["video"] is not None) == 3 * 2
    assert sum(len(b["failures"]) for b in batches) == 1


def test_data_config_checks_the_pipeline_kinds():
    with pytest.raises(ValueError, match="train_augment"):
        DataConfig(train_augment=AugmentConfig(kind="eval"))
    with pytest.raises(ValueError, match="eval_augment"):
        DataConfig(eval_augment=AugmentConfig(kind="multi_scale"))


def test_subtracting_the_clip_mean_removes_what_stays_still_and_keeps_what_moves():
    from datasets.video_dataset import DataConfig, model_input

    video = torch.full((1, 3, 4, 8, 8), 90, dtype=torch.uint8)  # a static grey background
    video[0, :, :, 2, 2] = 200  # a still bright pixel
    for t in range(4):
        video[0, :, t, 5, t] = 255  # a pixel moving right
    plain = model_input(video, DataConfig())
    moving = model_input(video, DataConfig(subtract_clip_mean=True))
    assert torch.allclose(moving, plain - plain.mean(dim=2, keepdim=True))
    assert moving[0, :, :, 2, 2].abs().max() < 1e-6 and moving[0, :, :, 0, 7].abs().max() < 1e-6
    assert moving[0, 0, 0, 5, 0] > 0 and moving[0, 0, 1, 5, 0] < 0  # the mover left pixel (5, 0) after t = 0


def test_reading_a_split_of_the_built_in_dataset_never_generates_it(tmp_path):
    """Generation is the entry point's set-up step (engine.data.prepare_synthetic); a read of a folder without
    the dataset names the folder and writes nothing."""
    from datasets.annotations import AnnotationError
    from datasets.synthetic.motion import SyntheticSpec
    from engine.data import prepare_synthetic

    data = DataConfig(root=str(tmp_path / "built_in"), synthetic=SyntheticSpec(num_videos=8, frames=8, num_classes=2))
    with pytest.raises(AnnotationError, match="holds no complete synthetic dataset"):
        load_records(data, "train")
    assert not (tmp_path / "built_in").exists()
    prepare_synthetic(data)
    assert len(load_records(data, "train")) + len(load_records(data, "val")) == 8


def test_unnormalize_gives_back_the_pixels_normalize_took():
    from datasets.video_dataset import normalize, unnormalize

    video = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    back = unnormalize(normalize(video, mean, std), mean, std)
    torch.testing.assert_close(back, video.float() / 255, atol=1e-6, rtol=0)
    frames = normalize(video, mean, std)[:, :, 0]  # (B, C, H, W): the channel stays dim 1
    torch.testing.assert_close(unnormalize(frames, mean, std), video[:, :, 0].float() / 255, atol=1e-6, rtol=0)

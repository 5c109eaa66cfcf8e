"""Clip transforms: uint8 in/out, one set of random parameters per clip, reproducible from a seed."""

import pickle
import random

import numpy as np
import pytest
import torch
from timm.data.auto_augment import AugmentOp

from datasets import transforms as T
from datasets.transforms import (
    AugmentConfig,
    CropBox,
    build_eval_views,
    build_transform,
    center_crop,
    crop_and_resize,
    fixed_crop_offsets,
    horizontal_flip,
    multi_scale_crop,
    multi_scale_crop_params,
    rand_augment,
    random_erasing,
    random_erasing_params,
    random_resized_crop,
    random_resized_crop_params,
    resize_short_side,
    three_crop_boxes,
    three_crops,
)

FRAMES, HEIGHT, WIDTH = 4, 40, 56
SCALE = 3      # coordinate encoding: channel 0 = 3 * row, channel 1 = 3 * column
OFFSET = 20    # frame t of the offset clip is the coordinate image + 20 * t (max 165 + 60 < 256)


def coordinate_clip(offset_per_frame: int = 0, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """(T, 3, H, W) uint8: every pixel says where it is; frames differ only by a constant."""
    rows = torch.arange(height).view(-1, 1).expand(height, width)
    cols = torch.arange(width).view(1, -1).expand(height, width)
    image = torch.stack([SCALE * rows, SCALE * cols, torch.zeros_like(rows)])
    return torch.stack([image + offset_per_frame * t for t in range(FRAMES)]).to(torch.uint8)


def still_clip(seed: int = 0) -> torch.Tensor:
    """(T, 3, H, W) uint8: one random frame repeated T times."""
    generator = torch.Generator().manual_seed(seed)
    frame = torch.randint(0, 256, (3, HEIGHT, WIDTH), generator=generator, dtype=torch.uint8)
    return frame.expand(FRAMES, -1, -1, -1).clone()


def noise_clip(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (FRAMES, 3, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def all_frames_equal(clip: torch.Tensor) -> bool:
    return all(torch.equal(clip[0], frame) for frame in clip)


def crop_transforms():
    """Every random geometric transform, as (clip, rng) -> clip with output side 24 (flip keeps the size)."""
    return {
        "multi_scale": lambda clip, rng: multi_scale_crop(clip, 24, rng),
        "multi_scale_free": lambda clip, rng: multi_scale_crop(clip, 24, rng, fix_crop=False),
        "random_resized": lambda clip, rng: random_resized_crop(clip, 24, rng),
        "random_resized_finetune": lambda clip, rng: random_resized_crop(clip, 24, rng, scale=(0.08, 1.0)),
        "flip": lambda clip, rng: horizontal_flip(clip, rng),
        "pipeline_multi_scale": build_transform(AugmentConfig(kind="multi_scale"), 24),
        "pipeline_random_resized": build_transform(AugmentConfig(kind="random_resized"), 24),
        "pipeline_finetune_no_aug": build_transform(
            AugmentConfig(kind="finetune", rrc_scale=(0.08, 1.0)), 24),
    }


def all_training_transforms():
    """Every training transform, RandAugment and erasing included."""
    return crop_transforms() | {
        "rand_augment": lambda clip, rng: rand_augment(clip, rng),
        "random_erasing": lambda clip, rng: random_erasing(clip, rng, p=1.0),
        "pipeline_finetune": build_transform(AugmentConfig(
            kind="finetune", rrc_scale=(0.08, 1.0), rand_augment="rand-m7-n4-mstd0.5-inc1",
            erase_prob=1.0), 24),
    }


# --------------------------------------------------------------------------
# Properties shared by every training transform
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(all_training_transforms()))
def test_training_transform_keeps_uint8_and_shape(name):
    transform = all_training_transforms()[name]
    out = transform(noise_clip(), random.Random(0))
    assert out.dtype == torch.uint8
    assert out.shape[:2] == (FRAMES, 3)
    expected_side = (HEIGHT, WIDTH) if name in ("flip", "rand_augment", "random_erasing") else (24, 24)
    assert tuple(out.shape[2:]) == expected_side


@pytest.mark.parametrize("name", sorted(all_training_transforms()))
def test_identical_frames_stay_identical(name):
    transform = all_training_transforms()[name]
    for seed in range(5):
        assert all_frames_equal(transform(still_clip(seed), random.Random(seed)))


@pytest.mark.parametrize("name", sorted(all_training_transforms()))
def test_same_seed_same_output(name):
    transform = all_training_transforms()[name]
    clip = noise_clip()
    assert torch.equal(transform(clip, random.Random(11)), transform(clip, random.Random(11)))


@pytest.mark.parametrize("name", sorted(crop_transforms()))
def test_crop_geometry_is_the_same_on_every_frame(name):
    # Frames differ by a constant, so with one crop for all of them the outputs differ by that constant
    # too (up to a rounding step of the resize); a per-frame crop would shift the coordinates instead.
    transform = crop_transforms()[name]
    for seed in range(5):
        out = transform(coordinate_clip(OFFSET), random.Random(seed)).int()
        for t in range(1, FRAMES):
            assert (out[t] - out[0] - OFFSET * t).abs().max() <= 1


def test_transforms_leave_the_global_random_state_alone():
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    for transform in all_training_transforms().values():
        transform(noise_clip(), random.Random(0))
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    assert torch.equal(torch.get_rng_state(), torch_state)


# --------------------------------------------------------------------------
# Multi-scale crop
# --------------------------------------------------------------------------


def test_multi_scale_sizes_come_from_the_scale_pairs():
    # short side 40, scales (1, .875, .75, .66) -> sides 40, 35, 30, 26; 30 is within 2 px of 32 and snaps to it
    sides = [40, 35, 32, 26]
    allowed = {(sides[i], sides[j]) for i in range(4) for j in range(4) if abs(i - j) <= 1}
    rng = random.Random(0)
    seen = {tuple(multi_scale_crop_params(HEIGHT, WIDTH, 32, rng)[2:]) for _ in range(500)}
    assert seen == allowed


def test_multi_scale_offsets_come_from_the_fixed_grid():
    rng = random.Random(0)
    for _ in range(300):
        box = multi_scale_crop_params(HEIGHT, WIDTH, 32, rng)
        assert (box.top, box.left) in fixed_crop_offsets(HEIGHT, WIDTH, box.height, box.width)
        assert box.top + box.height <= HEIGHT and box.left + box.width <= WIDTH


def test_fixed_grid_has_5_or_13_positions():
    five = fixed_crop_offsets(40, 56, 20, 24, more_fix_crop=False)
    thirteen = fixed_crop_offsets(40, 56, 20, 24)
    assert five == [(0, 0), (0, 32), (20, 0), (20, 32), (10, 16)]
    assert thirteen[:5] == five and len(set(thirteen)) == 13
    assert {top for top, _ in thirteen} == {0, 5, 10, 15, 20}


def test_multi_scale_max_distort_zero_gives_square_crops():
    rng = random.Random(0)
    for _ in range(100):
        box = multi_scale_crop_params(HEIGHT, WIDTH, 24, rng, max_distort=0)
        assert box.height == box.width


def test_multi_scale_snapped_side_is_clamped_to_the_frame():
    rng = random.Random(0)
    for _ in range(50):  # side 40 snaps to 41 > 40
        box = multi_scale_crop_params(HEIGHT, WIDTH, 41, rng)
        assert box.top + box.height <= HEIGHT and box.left + box.width <= WIDTH


def test_multi_scale_crop_applies_its_params():
    clip = coordinate_clip()
    for seed in range(5):
        box = multi_scale_crop_params(HEIGHT, WIDTH, 24, random.Random(seed))
        out = multi_scale_crop(clip, 24, random.Random(seed))
        assert torch.equal(out, crop_and_resize(clip, box, 24))
        _assert_shows_box(out, box)


def _assert_shows_box(out: torch.Tensor, box: CropBox):
    """The resized crop of the coordinate clip averages to the coordinates of the box's centre."""
    mean_row = out[0, 0].double().mean().item() / SCALE
    mean_col = out[0, 1].double().mean().item() / SCALE
    assert abs(mean_row - (box.top + (box.height - 1) / 2)) < 1
    assert abs(mean_col - (box.left + (box.width - 1) / 2)) < 1


# --------------------------------------------------------------------------
# Random resized crop and flip
# --------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [(0.5, 1.0), (0.08, 1.0)])
def test_random_resized_crop_boxes_respect_scale_and_ratio(scale):
    rng = random.Random(0)
    for _ in range(300):
        box = random_resized_crop_params(HEIGHT, WIDTH, rng, scale=scale)
        assert 0 <= box.top and box.top + box.height <= HEIGHT
        assert 0 <= box.left and box.left + box.width <= WIDTH
        # rounding each side to whole pixels bends the area and aspect a little on 40 x 56 frames
        assert scale[0] * 0.8 <= box.height * box.width / (HEIGHT * WIDTH) <= scale[1]
        assert 3 / 4 * 0.8 <= box.width / box.height <= 4 / 3 * 1.25


def test_random_resized_crop_falls_back_to_a_centre_crop():
    # an area fraction of 1 with aspects far from the frame's never fits: the fallback clamps the aspect
    box = random_resized_crop_params(40, 200, random.Random(0), scale=(1.0, 1.0), ratio=(1.0, 2.0))
    assert box == CropBox(0, 60, 40, 80)


def test_random_resized_crop_applies_its_params():
    clip = coordinate_clip()
    for seed in range(5):
        box = random_resized_crop_params(HEIGHT, WIDTH, random.Random(seed))
        out = random_resized_crop(clip, 24, random.Random(seed))
        assert torch.equal(out, crop_and_resize(clip, box, 24))
        _assert_shows_box(out, box)


def test_flip_mirrors_every_frame():
    clip = coordinate_clip(OFFSET)
    flipped = horizontal_flip(clip, random.Random(0), p=1.0)
    assert torch.equal(flipped, clip.flip(-1))
    assert flipped[:, 1, :, 0].eq(SCALE * (WIDTH - 1) + OFFSET * torch.arange(FRAMES).view(-1, 1)).all()
    assert horizontal_flip(clip, random.Random(0), p=0.0) is clip


def test_flip_happens_about_half_the_time():
    rng = random.Random(0)
    clip = coordinate_clip()
    flips = sum(not torch.equal(horizontal_flip(clip, rng), clip) for _ in range(400))
    assert 150 < flips < 250


# --------------------------------------------------------------------------
# RandAugment
# --------------------------------------------------------------------------


def _record_rand_augment(monkeypatch, clip, seed, config="rand-m7-n4-mstd0.5-inc1"):
    """Run rand_augment and return, per op call, (op name, arguments it was applied with or None if skipped)."""
    log = []
    original_call = AugmentOp.__call__

    def recording_call(op, img):
        out = original_call(op, img)
        log.append((op.name, op._last_args))
        op._last_args = None
        return out

    transform = T._timm_rand_augment(config, int(0.45 * min(HEIGHT, WIDTH)), "bicubic")
    for op in transform.ops:
        def recording_level(magnitude, hparams, op=op, level_fn=op.level_fn):
            op._last_args = level_fn(magnitude, hparams) if level_fn is not None else ()
            return op._last_args
        monkeypatch.setattr(op, "level_fn", recording_level)
        monkeypatch.setattr(op, "_last_args", None, raising=False)
    monkeypatch.setattr(AugmentOp, "__call__", recording_call)
    out = rand_augment(clip, random.Random(seed), config)
    monkeypatch.undo()
    return out, log


def test_rand_augment_applies_the_same_ops_and_magnitudes_to_every_frame(monkeypatch):
    for seed in range(5):
        _, log = _record_rand_augment(monkeypatch, noise_clip(seed), seed)
        assert len(log) == 4 * FRAMES  # n4: four ops drawn per frame
        per_frame = [log[4 * t:4 * t + 4] for t in range(FRAMES)]
        assert all(calls == per_frame[0] for calls in per_frame)


def test_rand_augment_seeds_pick_different_ops(monkeypatch):
    drawn = {tuple(_record_rand_augment(monkeypatch, still_clip(), seed)[1][:4]) for seed in range(10)}
    assert len(drawn) >= 8
    outputs = {rand_augment(still_clip(), random.Random(seed))[0].numpy().tobytes() for seed in range(10)}
    assert len(outputs) >= 5  # some draws skip every op (each fires with p = 0.5), most change the frame


def test_rand_augment_builds_the_timm_transform_once():
    config = "rand-m9-n2-mstd0.5"
    first = T._timm_rand_augment(config, 10, "bicubic")
    assert T._timm_rand_augment(config, 10, "bicubic") is first
    assert first.num_layers == 2
    assert all(op.kwargs["fillcolor"] == (124, 116, 104) for op in first.ops)


# --------------------------------------------------------------------------
# Random erasing
# --------------------------------------------------------------------------


def test_erasing_uses_one_box_through_the_whole_clip():
    clip = noise_clip()
    for seed in range(10):
        box = random_erasing_params(HEIGHT, WIDTH, random.Random(seed), p=1.0)
        out = random_erasing(clip, random.Random(seed), p=1.0)
        region = out[:, :, box.top:box.top + box.height, box.left:box.left + box.width]
        assert all_frames_equal(region)
        inside = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
        inside[box.top:box.top + box.height, box.left:box.left + box.width] = True
        assert torch.equal(out[:, :, ~inside], clip[:, :, ~inside])
        assert box.height < HEIGHT and box.width < WIDTH
        area = box.height * box.width / (HEIGHT * WIDTH)
        assert 0.02 * 0.7 <= area <= 1 / 3 * 1.3


def test_erasing_does_not_modify_its_input_and_respects_p():
    clip = noise_clip()
    copy = clip.clone()
    random_erasing(clip, random.Random(0), p=1.0)
    assert torch.equal(clip, copy)
    assert random_erasing(clip, random.Random(0), p=0.0) is clip


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_erasing_fill_is_normalized_noise_in_pixel_space(mode):
    big = torch.zeros(1, 3, 200, 200, dtype=torch.uint8)
    out = random_erasing(big, random.Random(1), p=1.0, scale=(0.3, 0.3), mode=mode)
    box = random_erasing_params(200, 200, random.Random(1), p=1.0, scale=(0.3, 0.3))
    fill = out[0, :, box.top:box.top + box.height, box.left:box.left + box.width].double()
    if mode == "const":  # 0 after normalization = the mean colour
        assert fill.amax(dim=(1, 2)).tolist() == fill.amin(dim=(1, 2)).tolist() == [124, 116, 104]
    elif mode == "rand":  # one colour per box
        assert (fill.amax(dim=(1, 2)) == fill.amin(dim=(1, 2))).all()
    else:  # per-pixel N(mean, std) in 0..255 units: about 124 +- 58 for the red channel
        assert abs(fill[0].mean().item() - 124) < 5 and abs(fill[0].std().item() - 58) < 5


def test_erasing_rejects_unknown_mode():
    with pytest.raises(ValueError):
        random_erasing(noise_clip(), random.Random(0), p=1.0, mode="zeros")


# --------------------------------------------------------------------------
# Evaluation views
# --------------------------------------------------------------------------


def test_resize_short_side():
    assert tuple(resize_short_side(noise_clip(), 20).shape) == (FRAMES, 3, 20, 28)
    portrait = noise_clip().transpose(-1, -2).contiguous()
    out = resize_short_side(portrait, 20)
    assert tuple(out.shape) == (FRAMES, 3, 28, 20) and out.dtype == torch.uint8


def test_center_crop_is_centred():
    out = center_crop(coordinate_clip(), 24)
    assert tuple(out.shape) == (FRAMES, 3, 24, 24)
    # top-left pixel: row (40 - 24) // 2, column (56 - 24) // 2
    assert out[0, 0, 0, 0].item() == SCALE * 8 and out[0, 1, 0, 0].item() == SCALE * 16


def test_three_crops_run_along_the_long_side():
    assert three_crop_boxes(40, 56, 24) == [CropBox(8, left, 24, 24) for left in (0, 16, 32)]
    assert three_crop_boxes(56, 40, 24) == [CropBox(top, 8, 24, 24) for top in (0, 16, 32)]
    clip = coordinate_clip()
    views = three_crops(clip, 24)
    assert [view[0, 1, 0, 0].item() // SCALE for view in views] == [0, 16, 32]  # left, centre, right
    assert views[2][0, 1, 0, -1].item() == SCALE * (WIDTH - 1)  # the right crop reaches the last column
    assert torch.equal(views[1], center_crop(clip, 24))


def test_eval_crop_must_fit():
    with pytest.raises(ValueError):
        center_crop(noise_clip(), 48)
    with pytest.raises(ValueError):
        three_crops(noise_clip(), 48)


# --------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------


@pytest.mark.parametrize("views", [1, 3])
def test_eval_views(views):
    cfg = AugmentConfig(kind="eval", short_side=28, num_spatial_views=views)
    out = build_eval_views(cfg, 24)(noise_clip())
    assert len(out) == views
    for view in out:
        assert tuple(view.shape) == (FRAMES, 3, 24, 24) and view.dtype == torch.uint8


def test_pipeline_draws_in_a_fixed_order():
    cfg = AugmentConfig(kind="random_resized")
    rng = random.Random(5)
    expected = horizontal_flip(random_resized_crop(noise_clip(), 24, rng, cfg.rrc_scale), rng)
    assert torch.equal(build_transform(cfg, 24)(noise_clip(), random.Random(5)), expected)


def test_pipelines_pickle_for_dataloader_workers():
    cfg = AugmentConfig(kind="finetune", rand_augment="rand-m7-n4-mstd0.5-inc1", erase_prob=0.5)
    transform = pickle.loads(pickle.dumps(build_transform(cfg, 24)))
    expected = build_transform(cfg, 24)(noise_clip(), random.Random(2))
    assert torch.equal(transform(noise_clip(), random.Random(2)), expected)
    views = pickle.loads(pickle.dumps(build_eval_views(AugmentConfig(kind="eval", short_side=28), 24)))
    assert tuple(views(noise_clip())[0].shape) == (FRAMES, 3, 24, 24)


def test_eval_kind_has_no_training_transform():
    with pytest.raises(ValueError):
        build_transform(AugmentConfig(kind="eval"), 224)


def test_eval_views_need_a_short_side_at_least_the_crop():
    with pytest.raises(ValueError, match="short_side >= size"):
        build_eval_views(AugmentConfig(kind="eval", short_side=200), 224)


@pytest.mark.parametrize("kwargs", [
    dict(kind="multi_scale", rand_augment="rand-m7-n4"),
    dict(kind="random_resized", erase_prob=0.25),
    dict(kind="eval", num_spatial_views=2),
    dict(kind="finetune", erase_prob=1.5),
    dict(kind="finetune", rrc_scale=(0.0, 1.0)),
    dict(kind="crop"),
])
def test_config_rejects_inconsistent_settings(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)

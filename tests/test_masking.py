"""Tests for models/masking.py: exact counts, structure, reproducibility and validation."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from models.masking import (
    MaskConfig,
    MaskGenerator,
    block_mask,
    block_max_sides,
    build_mask_generator,
    frame_mask,
    num_decoder_masked,
    num_masked,
    num_visible,
    random_mask,
    running_cell_mask,
    tube_mask,
)

GRIDS = [(8, 14, 14), (4, 4, 4), (2, 3, 5), (1, 2, 2)]
RATIOS = [0.5, 0.75, 0.9]
BLOCK_RATIOS = [0.15, 0.5, 0.75, 0.9]
ENCODER_FUNCTIONS = {
    "tube": tube_mask,
    "space": tube_mask,
    "random": random_mask,
    "frame": frame_mask,
    "block": block_mask,
}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expected_masked(kind: str, grid, ratio: float) -> int:
    """The documented counting rule, written out independently of the module."""
    frames, height, width = grid
    if kind in ("tube", "space"):
        return frames * int(ratio * height * width)
    if kind == "frame":
        return int(ratio * frames) * height * width
    return int(ratio * frames * height * width)


def as_grid(mask: torch.Tensor, grid) -> torch.Tensor:
    """(B, N) -> (B, T, H, W), using the t-major token order."""
    return mask.reshape(mask.shape[0], *grid)


# --------------------------------------------------------------------------- #
# Exact counts
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("kind", ["tube", "space", "random", "frame", "block"])
def test_every_sample_has_the_exact_masked_count(kind, grid):
    ratios = BLOCK_RATIOS if kind == "block" else RATIOS + [0.15]
    frames, height, width = grid
    for ratio in ratios:
        mask = ENCODER_FUNCTIONS[kind](6, grid, ratio, generator=seeded(1))
        assert mask.shape == (6, frames * height * width)
        assert mask.dtype == torch.bool
        expected = expected_masked(kind, grid, ratio)
        assert mask.sum(dim=1).tolist() == [expected] * 6, (kind, grid, ratio)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("kind", ["tube", "space", "random", "frame", "block"])
def test_generator_counts_match_masks_and_allow_reshape_gather(kind, grid):
    cfg = MaskConfig(kind=kind, ratio=0.75)
    gen = build_mask_generator(cfg, grid)
    encoder_mask, decoder_mask = gen(5, "cpu", seeded(2))
    assert decoder_mask is None
    assert gen.num_masked == num_masked(cfg, grid) == expected_masked(kind, grid, 0.75)
    assert gen.num_visible == num_visible(cfg, grid) == gen.num_tokens - gen.num_masked
    assert (~encoder_mask).sum(dim=1).tolist() == [gen.num_visible] * 5
    # The reason for equal counts: visible tokens can be gathered with a reshape.
    tokens = torch.randn(5, gen.num_tokens, 3)
    visible = tokens[~encoder_mask].reshape(5, gen.num_visible, 3)
    assert visible.shape == (5, gen.num_visible, 3)


def test_truncating_count_rule_is_documented_behaviour():
    # 0.57 * 100 == 56.99999999999999 in floating point: int() truncates to 56.
    cfg = MaskConfig(kind="random", ratio=0.57)
    assert num_masked(cfg, (1, 10, 10)) == 56
    assert random_mask(2, (1, 10, 10), 0.57, generator=seeded()).sum(1).tolist() == [56, 56]


def test_zero_ratio_masks_nothing():
    for kind, fn in ENCODER_FUNCTIONS.items():
        assert not fn(3, (2, 4, 4), 0.0, generator=seeded()).any(), kind


# --------------------------------------------------------------------------- #
# Structure of tube / frame / random masks
# --------------------------------------------------------------------------- #
def test_tube_mask_is_identical_across_time_and_differs_across_samples():
    grid = (8, 14, 14)
    mask = as_grid(tube_mask(8, grid, 0.9, generator=seeded(3)), grid)
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    assert not all(torch.equal(mask[0], mask[b]) for b in range(1, 8))


def test_space_kind_equals_tube_kind_under_the_same_seed():
    grid = (4, 6, 6)
    space_gen = build_mask_generator(MaskConfig(kind="space", ratio=0.75), grid)
    tube_gen = build_mask_generator(MaskConfig(kind="tube", ratio=0.75), grid)
    space, _ = space_gen(4, "cpu", seeded(7))
    tube, _ = tube_gen(4, "cpu", seeded(7))
    assert torch.equal(space, tube)


def test_frame_mask_masks_whole_time_slices():
    grid = (8, 4, 5)
    mask = as_grid(frame_mask(16, grid, 0.75, generator=seeded(4)), grid)
    per_slice = mask.flatten(2)
    # Each time slice is either fully masked or fully visible.
    assert torch.equal(per_slice.all(dim=2), per_slice.any(dim=2))
    assert per_slice.all(dim=2).sum(dim=1).tolist() == [6] * 16
    # Which slices are masked is random per sample.
    assert not all(torch.equal(mask[0], mask[b]) for b in range(1, 16))


def test_random_mask_differs_across_samples_and_is_not_tube_structured():
    grid = (8, 14, 14)
    mask = as_grid(random_mask(4, grid, 0.9, generator=seeded(5)), grid)
    assert not torch.equal(mask[0], mask[1])
    # A tube mask would repeat frame 0 in every frame.
    assert not torch.equal(mask, mask[:, :1].expand_as(mask))
    # Per-frame counts vary (spacetime-agnostic), unlike tube masks.
    per_frame = mask.flatten(2).sum(dim=2)
    assert per_frame.unique().numel() > 1


# --------------------------------------------------------------------------- #
# Block masks (VIMPAC)
# --------------------------------------------------------------------------- #
def box_cells(box, grid) -> torch.Tensor:
    """(T, H, W) bool of the cells inside a half-open box (t0, t1, h0, h1, w0, w1)."""
    t0, t1, h0, h1, w0, w1 = box.tolist()
    cells = torch.zeros(grid, dtype=torch.bool)
    cells[t0:t1, h0:h1, w0:w1] = True
    return cells


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", BLOCK_RATIOS)
def test_block_mask_is_a_union_of_boxes_with_a_trimmed_last_box(grid, ratio):
    batch = 4
    mask, boxes = block_mask(batch, grid, ratio, generator=seeded(6), return_boxes=True)
    assert boxes.dtype == torch.long and boxes.shape[0] == batch and boxes.shape[2] == 6
    mask = as_grid(mask, grid)
    max_t, max_h, max_w = block_max_sides(grid)
    target = int(ratio * grid[0] * grid[1] * grid[2])
    for sample in range(batch):
        used = boxes[sample][boxes[sample, :, 0] >= 0]
        # Padding rows are all -1 and only follow the used boxes.
        assert (boxes[sample, len(used):] == -1).all()
        if target == 0:
            assert len(used) == 0 and not mask[sample].any()
            continue
        assert len(used) >= 1
        lengths = used[:, 1::2] - used[:, 0::2]
        assert (lengths >= 1).all()
        assert (lengths[:, 0] <= max_t).all() and (lengths[:, 1] <= max_h).all()
        assert (lengths[:, 2] <= max_w).all()
        assert (used[:, 0::2] >= 0).all()
        assert (used[:, 1::2] <= torch.tensor(grid)).all()

        earlier = torch.zeros(grid, dtype=torch.bool)
        for box in used[:-1]:
            cells = box_cells(box, grid)
            assert mask[sample][cells].all(), "every box but the last is fully masked"
            earlier |= cells
        last = box_cells(used[-1], grid)
        assert (mask[sample] <= (earlier | last)).all(), "masked tokens lie inside used boxes"
        assert (earlier <= mask[sample]).all()
        # The last box adds a t-major prefix of its not-yet-masked cells, no more.
        new_cells = (last & ~earlier).flatten()
        taken = (mask[sample].flatten() & new_cells)
        order = taken[new_cells]
        num_taken = int(order.sum())
        assert num_taken >= 1
        assert order[:num_taken].all() and not order[num_taken:].any()
        assert int(mask[sample].sum()) == target


def test_block_box_sizes_follow_vimpac_limits():
    assert block_max_sides((8, 14, 14)) == (5, 7, 7)
    assert block_max_sides((16, 14, 14)) == (10, 7, 7)
    assert block_max_sides((6, 6, 6)) == (4, 3, 3)  # (2/3)*6 must floor to 4, not 3
    assert block_max_sides((1, 1, 3)) == (1, 1, 1)  # never below one token
    _, boxes = block_mask(8, (8, 14, 14), 0.9, generator=seeded(8), return_boxes=True)
    used = boxes[boxes[..., 0] >= 0]
    lengths = used[:, 1::2] - used[:, 0::2]
    # With hundreds of boxes, the largest allowed extents actually occur.
    assert lengths.max(dim=0).values.tolist() == [5, 7, 7]
    assert lengths.min(dim=0).values.tolist() == [1, 1, 1]


def test_block_config_fractions_reach_the_generator():
    cfg = MaskConfig(kind="block", ratio=0.5, block_max_time_fraction=0.25,
                     block_max_space_fraction=0.25, block_boxes_per_chunk=3)
    gen = build_mask_generator(cfg, (8, 8, 8))
    mask, _ = gen(4, "cpu", seeded(9))
    assert mask.sum(1).tolist() == [256] * 4
    _, boxes = block_mask(4, (8, 8, 8), 0.5, generator=seeded(9), return_boxes=True,
                          max_time_fraction=0.25, max_space_fraction=0.25, boxes_per_chunk=3)
    used = boxes[boxes[..., 0] >= 0]
    lengths = used[:, 1::2] - used[:, 0::2]
    assert lengths.max().item() <= 2


def fraction_with_masked_neighbour(mask: torch.Tensor, grid) -> float:
    """Share of masked tokens that have at least one masked 6-neighbour."""
    frames, height, width = grid
    volume = as_grid(mask, grid).float()
    padded = F.pad(volume, (1, 1, 1, 1, 1, 1))
    neighbour = torch.zeros_like(volume)
    for dt, dh, dw in [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]:
        shifted = padded[:, 1 + dt:1 + dt + frames, 1 + dh:1 + dh + height, 1 + dw:1 + dw + width]
        neighbour = torch.maximum(neighbour, shifted)
    return float((neighbour * volume).sum() / volume.sum())


def test_block_masks_are_spatially_clustered():
    grid, ratio = (8, 14, 14), 0.15
    block = fraction_with_masked_neighbour(block_mask(16, grid, ratio, generator=seeded(10)), grid)
    scattered = fraction_with_masked_neighbour(random_mask(16, grid, ratio, generator=seeded(10)), grid)
    assert block > 0.95
    assert scattered < 0.75
    assert block > scattered + 0.2


def test_block_mask_needs_several_chunks_and_still_hits_the_target():
    # One candidate box per round forces many rounds of the refill loop.
    mask = block_mask(3, (4, 6, 6), 0.9, generator=seeded(11), boxes_per_chunk=1)
    assert mask.sum(1).tolist() == [int(0.9 * 144)] * 3


# --------------------------------------------------------------------------- #
# Running-cell decoder mask (VideoMAE V2)
# --------------------------------------------------------------------------- #
def reference_running_cell(grid, ratio, offset):
    """Pure-Python model of VideoMAE V2's running cell: a queue [1]*m + [0]*(4-m) read from a
    pointer that advances once before every frame; slots of the 2x2 cell in raster order."""
    frames, height, width = grid
    masked = int(4 * ratio)
    queue = [1] * masked + [0] * (4 - masked)
    pointer = offset
    out = []
    for _ in range(frames):
        pointer += 1
        cell = [queue[(slot + pointer) % 4] for slot in range(4)]
        out.append([[bool(cell[2 * (h % 2) + (w % 2)]) for w in range(width)] for h in range(height)])
    return torch.tensor(out).reshape(-1)


def cells_of(mask: torch.Tensor, grid) -> torch.Tensor:
    """(B, N) -> (B, T, H/2, W/2, 4) with the 4 slots of each 2x2 cell in raster order."""
    batch = mask.shape[0]
    frames, height, width = grid
    cells = mask.reshape(batch, frames, height // 2, 2, width // 2, 2)
    return cells.permute(0, 1, 2, 4, 3, 5).reshape(batch, frames, height // 2, width // 2, 4)


@pytest.mark.parametrize("grid", [(8, 14, 14), (4, 4, 4), (1, 2, 2), (3, 2, 6)])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_running_cell_counts_and_per_cell_structure(grid, ratio):
    mask = running_cell_mask(16, grid, ratio, generator=seeded(12))
    frames, height, width = grid
    per_cell = int(4 * ratio)
    assert mask.sum(1).tolist() == [frames * height * width * per_cell // 4] * 16
    cells = cells_of(mask, grid)
    assert (cells.sum(-1) == per_cell).all()
    # All cells of a frame share one pattern.
    assert torch.equal(cells, cells[:, :, :1, :1].expand_as(cells))
    # The pattern runs: slot k at t+1 equals slot k+1 (cyclically, raster order) at t.
    pattern = cells[:, :, 0, 0]  # (B, T, 4)
    assert torch.equal(pattern[:, 1:], pattern[:, :-1].roll(-1, dims=-1))


def test_running_cell_matches_videomae_v2_patterns_and_uses_all_offsets():
    grid, ratio = (5, 4, 6), 0.5
    references = [reference_running_cell(grid, ratio, offset) for offset in range(4)]
    mask = running_cell_mask(64, grid, ratio, generator=seeded(13))
    hits = [0] * 4
    for sample in mask:
        matches = [i for i, ref in enumerate(references) if torch.equal(sample, ref)]
        assert len(matches) == 1
        hits[matches[0]] += 1
    assert all(count > 0 for count in hits)


def test_running_cell_with_zero_ratio_masks_nothing():
    assert not running_cell_mask(2, (2, 4, 4), 0.1, generator=seeded()).any()


@pytest.mark.parametrize("grid", [(4, 3, 4), (4, 4, 5), (2, 7, 7)])
def test_running_cell_rejects_odd_spatial_grid(grid):
    with pytest.raises(ValueError, match="H and W must be even"):
        running_cell_mask(2, grid, 0.5)
    with pytest.raises(ValueError, match="H and W must be even"):
        build_mask_generator(MaskConfig(decoder_kind="running_cell"), grid)


def test_generator_with_running_cell_decoder_mask():
    cfg = MaskConfig(kind="tube", ratio=0.9, decoder_kind="running_cell", decoder_ratio=0.5)
    gen = build_mask_generator(cfg, (8, 14, 14))
    encoder_mask, decoder_mask = gen(3, torch.device("cpu"), seeded(14))
    assert encoder_mask.sum(1).tolist() == [gen.num_masked] * 3
    assert gen.num_decoder_masked == num_decoder_masked(cfg, (8, 14, 14)) == 8 * 49 * 2
    assert decoder_mask.sum(1).tolist() == [gen.num_decoder_masked] * 3
    assert gen.num_decoder_kept == 8 * 196 - 8 * 49 * 2


# --------------------------------------------------------------------------- #
# Reproducibility and device placement
# --------------------------------------------------------------------------- #
ALL_DRAWS = {
    **{kind: (lambda fn: lambda g: fn(4, (4, 6, 6), 0.75, generator=g))(fn)
       for kind, fn in ENCODER_FUNCTIONS.items()},
    "running_cell": lambda g: running_cell_mask(16, (4, 6, 6), 0.5, generator=g),
}


@pytest.mark.parametrize("name", sorted(ALL_DRAWS))
def test_same_seed_same_mask_different_seed_different_mask(name):
    draw = ALL_DRAWS[name]
    assert torch.equal(draw(seeded(21)), draw(seeded(21)))
    assert not torch.equal(draw(seeded(21)), draw(seeded(22)))


@pytest.mark.parametrize("name", sorted(ALL_DRAWS))
def test_masks_live_on_the_requested_device(name):
    assert ALL_DRAWS[name](seeded()).device == torch.device("cpu")


def test_explicit_device_argument_and_unseeded_calls():
    for kind, fn in ENCODER_FUNCTIONS.items():
        assert fn(2, (2, 4, 4), 0.5, device="cpu").device == torch.device("cpu"), kind
        assert fn(2, (2, 4, 4), 0.5, device=torch.device("cpu")).device.type == "cpu", kind
    assert running_cell_mask(2, (2, 4, 4), device="cpu").device.type == "cpu"


def test_generator_call_is_reproducible_for_encoder_and_decoder():
    cfg = MaskConfig(kind="block", ratio=0.6, decoder_kind="running_cell")
    gen = MaskGenerator(cfg, (4, 6, 6))
    first = gen(4, "cpu", seeded(30))
    second = gen(4, "cpu", seeded(30))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# --------------------------------------------------------------------------- #
# Configuration validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, "0.9", None, True])
def test_config_rejects_bad_ratio_with_clear_message(ratio):
    with pytest.raises(ValueError, match=r"MaskConfig\.ratio must be a number in \[0, 1\)"):
        MaskConfig(ratio=ratio)


def test_config_rejects_unknown_kind_and_lists_the_choices():
    with pytest.raises(ValueError, match="MaskConfig.kind must be one of") as info:
        MaskConfig(kind="tubes")
    assert "'tubes'" in str(info.value) and "'block'" in str(info.value)
    with pytest.raises(ValueError, match="MaskConfig.decoder_kind must be one of"):
        MaskConfig(decoder_kind="running")


@pytest.mark.parametrize("decoder_ratio", [1.0, -0.25, 2.0])
def test_config_rejects_decoder_ratio_outside_0_to_3_slots(decoder_ratio):
    with pytest.raises(ValueError, match=r"int\(4 \* MaskConfig\.decoder_ratio\) is in 0\.\.3"):
        MaskConfig(decoder_ratio=decoder_ratio)


@pytest.mark.parametrize("field", ["block_max_time_fraction", "block_max_space_fraction"])
def test_config_rejects_bad_block_fractions(field):
    with pytest.raises(ValueError, match=f"MaskConfig.{field} must be a number in"):
        MaskConfig(**{field: 0.0})
    with pytest.raises(ValueError, match="block_boxes_per_chunk must be a positive int"):
        MaskConfig(block_boxes_per_chunk=0)


def test_config_defaults_are_the_videomae_setting():
    cfg = MaskConfig()
    assert (cfg.kind, cfg.ratio, cfg.decoder_kind, cfg.decoder_ratio) == ("tube", 0.9, "none", 0.5)
    assert num_visible(cfg, (8, 14, 14)) == 8 * (196 - 176)


def test_functions_validate_their_arguments():
    with pytest.raises(ValueError, match="ratio must be a number in"):
        tube_mask(2, (2, 4, 4), 1.0)
    with pytest.raises(ValueError, match=r"grid must be three positive ints"):
        random_mask(2, (0, 4, 4), 0.5)
    with pytest.raises(ValueError, match=r"grid must be three positive ints"):
        frame_mask(2, (4, 4), 0.5)
    with pytest.raises(ValueError, match="batch must be a non-negative int"):
        block_mask(-1, (2, 4, 4), 0.5)


def test_empty_batch_is_allowed():
    for name, fn in itertools.chain(ENCODER_FUNCTIONS.items(), [("running_cell", running_cell_mask)]):
        assert fn(0, (2, 4, 4), 0.5).shape == (0, 32), name

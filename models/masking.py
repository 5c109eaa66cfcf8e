"""Token mask generators for masked video pre-training (VideoMAE, MAE-ST, VIMPAC).

Conventions shared by every generator in this module:

* A clip is split into a token grid ``grid = (T, H, W)`` with
  ``T = frames // tubelet``, ``H = height // patch``, ``W = width // patch``.
* Tokens are ordered t-major: ``index = t * H * W + h * W + w``.
* A mask is a bool tensor of shape ``(B, N)`` with ``N = T * H * W``;
  ``True`` = masked (hidden from the encoder / dropped from the decoder),
  ``False`` = visible.
* Every sample of a batch gets exactly the same number of masked tokens, so the
  encoder can gather its visible tokens with a plain reshape to
  ``(B, num_visible, C)``. The counts use plain ``int()`` truncation, exactly like
  the reference implementations:

  ====================  ==========================================
  kind                  masked tokens per sample
  ====================  ==========================================
  ``tube`` / ``space``  ``T * int(ratio * H * W)``
  ``random``            ``int(ratio * N)``
  ``frame``             ``int(ratio * T) * H * W``
  ``block``             ``int(ratio * N)``
  ``running_cell``      ``T * (H * W // 4) * int(4 * ratio)``
  ====================  ==========================================

  Note that ``int()`` truncates the floating-point product, so e.g.
  ``int(0.57 * 100) == 56``; use :func:`num_masked` rather than recomputing.

All generators build masks with torch ops directly on the requested device and
accept an optional ``torch.Generator`` (which must live on that same device) for
reproducibility.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Tuple, Union

import torch

Grid = Tuple[int, int, int]
DeviceLike = Union[str, torch.device, None]
MaskPair = Tuple[torch.Tensor, Optional[torch.Tensor]]

ENCODER_MASK_KINDS = ("tube", "space", "random", "frame", "block")
DECODER_MASK_KINDS = ("none", "running_cell")

# Slots of a 2x2 running cell are numbered in raster order, like VideoMAE V2:
# slot = 2 * (h % 2) + (w % 2), i.e. (0,0)->0, (0,1)->1, (1,0)->2, (1,1)->3.
RUNNING_CELL_SLOTS = 4

# Guards floor(fraction * side) against float error, e.g. (2/3) * 6 -> 3.9999...
_FLOOR_EPS = 1e-9


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #
@dataclass
class MaskConfig:
    """Which masks to draw for the encoder and (optionally) the decoder."""

    # Encoder mask: "tube" (VideoMAE), "space" (MAE-ST space-only = tube, alias),
    # "random" (MAE-ST spacetime-agnostic), "frame" (time-only), "block" (VIMPAC).
    kind: Literal["tube", "space", "random", "frame", "block"] = "tube"
    # Fraction of tokens hidden from the encoder, in [0, 1); counts truncate with int().
    ratio: float = 0.9
    # Block masks: longest box in time is max(1, floor(fraction * T)); VIMPAC uses 2/3.
    block_max_time_fraction: float = 2.0 / 3.0
    # Block masks: longest box side in space is max(1, floor(fraction * H)) (same for W); VIMPAC uses 1/2.
    block_max_space_fraction: float = 0.5
    # Block masks: candidate boxes drawn per vectorised round (speed/memory knob, not semantics).
    block_boxes_per_chunk: int = 32
    # Block masks, VIMPAC's own rule: the union of exactly this many boxes, so that the hidden share varies from clip
    # to clip (its Table 2: 5 boxes hide 14.5% of 5x16x16 on average) and `ratio` is unused. Only for a model that
    # keeps every position (VIMPAC); None = grow boxes until exactly int(ratio * N) tokens are hidden
    block_count: Optional[int] = None
    # Decoder mask: "none" (decoder sees every token) or VideoMAE V2 "running_cell".
    decoder_kind: Literal["none", "running_cell"] = "none"
    # Running-cell ratio: int(4 * decoder_ratio) of the 4 slots of each 2x2 cell are dropped.
    decoder_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_MASK_KINDS:
            raise ValueError(
                f"MaskConfig.kind must be one of {ENCODER_MASK_KINDS}, got {self.kind!r}"
            )
        _check_ratio(self.ratio, "MaskConfig.ratio")
        _check_fraction(self.block_max_time_fraction, "MaskConfig.block_max_time_fraction")
        _check_fraction(self.block_max_space_fraction, "MaskConfig.block_max_space_fraction")
        if isinstance(self.block_boxes_per_chunk, bool) or not isinstance(
            self.block_boxes_per_chunk, int
        ) or self.block_boxes_per_chunk < 1:
            raise ValueError(
                "MaskConfig.block_boxes_per_chunk must be a positive int, "
                f"got {self.block_boxes_per_chunk!r}"
            )
        if self.decoder_kind not in DECODER_MASK_KINDS:
            raise ValueError(
                f"MaskConfig.decoder_kind must be one of {DECODER_MASK_KINDS}, "
                f"got {self.decoder_kind!r}"
            )
        _check_running_cell_ratio(self.decoder_ratio, "MaskConfig.decoder_ratio")
        if self.block_count is not None and (self.kind != "block" or self.block_count < 1):
            raise ValueError(f"MaskConfig.block_count needs kind='block' and a count >= 1, got kind={self.kind!r}, "
                             f"block_count={self.block_count!r}")


# --------------------------------------------------------------------------- #
# Validation and counting helpers
# --------------------------------------------------------------------------- #
def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ratio(ratio: float, name: str = "ratio") -> None:
    if not _is_real_number(ratio) or not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"{name} must be a number in [0, 1) (fraction of tokens to mask; 1.0 would "
            f"leave the encoder nothing to see), got {ratio!r}"
        )


def _check_fraction(fraction: float, name: str) -> None:
    if not _is_real_number(fraction) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {fraction!r}")


def _check_running_cell_ratio(ratio: float, name: str = "ratio") -> None:
    # Only int(4 * ratio) matters, so any ratio in [0, 1) gives 0..3 dropped slots.
    if not _is_real_number(ratio) or not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"{name} must be a number in [0, 1) so that int(4 * {name}) is in 0..3 "
            f"(masked slots per 2x2 cell), got {ratio!r}; use 0.5 for VideoMAE V2"
        )


def _check_grid(grid: Grid) -> Grid:
    if len(grid) != 3 or not all(
        isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in grid
    ):
        raise ValueError(f"grid must be three positive ints (T, H, W), got {grid!r}")
    return tuple(grid)  # type: ignore[return-value]


def _check_batch(batch: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")


def _check_even_spatial_grid(grid: Grid) -> None:
    _, height, width = grid
    if height % 2 or width % 2:
        raise ValueError(
            f"running-cell masks tile the frame with 2x2 cells, so H and W must be even; "
            f"got grid (T, H, W) = {grid}. Pick an input size / patch size giving an even grid."
        )


def _checked_arguments(
    batch: int, grid: Grid, ratio: float, device: DeviceLike, generator: Optional[torch.Generator]
) -> tuple[Grid, torch.device]:
    """Validate what every encoder mask takes; return the grid as a tuple and the device to draw on."""
    _check_batch(batch)
    grid = _check_grid(grid)
    _check_ratio(ratio)
    return grid, _resolve_device(device, generator)


def _masked_count(ratio: float, total: int) -> int:
    """Number of masked items out of ``total``: plain truncation, like VideoMAE/MAE-ST."""
    return int(ratio * total)


def _resolve_device(device: DeviceLike, generator: Optional[torch.Generator]) -> torch.device:
    # Defaulting to the generator's device avoids a device mismatch error in torch.rand.
    if device is not None:
        return torch.device(device)
    if generator is not None:
        return generator.device
    return torch.device("cpu")


def block_max_sides(
    grid: Grid,
    max_time_fraction: float = 2.0 / 3.0,
    max_space_fraction: float = 0.5,
) -> Tuple[int, int, int]:
    """Largest block extent ``(t, h, w)`` allowed by the VIMPAC limits.

    ``t <= max(1, floor(max_time_fraction * T))``, ``h <= max(1, floor(max_space_fraction * H))``,
    ``w <= max(1, floor(max_space_fraction * W))``.
    """
    frames, height, width = _check_grid(grid)

    def limit(fraction: float, side: int) -> int:
        return max(1, math.floor(fraction * side + _FLOOR_EPS))

    return (
        limit(max_time_fraction, frames),
        limit(max_space_fraction, height),
        limit(max_space_fraction, width),
    )


# --------------------------------------------------------------------------- #
# Shared building blocks
# --------------------------------------------------------------------------- #
def _random_subset_mask(
    batch: int,
    size: int,
    count: int,
    device: torch.device,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """Per sample, exactly ``count`` of ``size`` positions chosen uniformly. Returns (B, size) bool."""
    noise = torch.rand(batch, size, device=device, generator=generator)
    # The `count` smallest noise values are a uniform random subset of that size.
    chosen = noise.argsort(dim=1)[:, :count]
    mask = torch.zeros(batch, size, dtype=torch.bool, device=device)
    return mask.scatter_(1, chosen, True)


def _uniform_ints(
    high_exclusive: torch.Tensor, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Elementwise uniform ints in ``[0, high_exclusive)`` (high >= 1), same shape, long."""
    noise = torch.rand(
        high_exclusive.shape, device=high_exclusive.device, generator=generator, dtype=torch.float64
    )
    # clamp: noise * high can round up to `high` in floating point.
    return (noise * high_exclusive).long().clamp_(max=high_exclusive - 1)


# --------------------------------------------------------------------------- #
# Encoder masks
# --------------------------------------------------------------------------- #
def tube_mask(
    batch: int,
    grid: Grid,
    ratio: float,
    device: DeviceLike = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """VideoMAE tube masking (= MAE-ST "space-only").

    Each sample draws one spatial mask of ``int(ratio * H * W)`` positions and repeats it
    over all T temporal indices. Returns (B, T*H*W) bool, True = masked.
    """
    (frames, height, width), device = _checked_arguments(batch, grid, ratio, device, generator)
    per_frame = _random_subset_mask(
        batch, height * width, _masked_count(ratio, height * width), device, generator
    )
    return per_frame[:, None, :].expand(batch, frames, height * width).reshape(batch, frames * height * width)


def random_mask(
    batch: int,
    grid: Grid,
    ratio: float,
    device: DeviceLike = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """MAE-ST spacetime-agnostic masking: ``int(ratio * N)`` tokens uniformly per sample.

    Returns (B, N) bool, True = masked.
    """
    (frames, height, width), device = _checked_arguments(batch, grid, ratio, device, generator)
    num_tokens = frames * height * width
    return _random_subset_mask(batch, num_tokens, _masked_count(ratio, num_tokens), device, generator)


def frame_mask(
    batch: int,
    grid: Grid,
    ratio: float,
    device: DeviceLike = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Time-only masking: ``int(ratio * T)`` whole temporal slices per sample.

    Returns (B, T*H*W) bool, True = masked.
    """
    (frames, height, width), device = _checked_arguments(batch, grid, ratio, device, generator)
    per_time = _random_subset_mask(batch, frames, _masked_count(ratio, frames), device, generator)
    return per_time[:, :, None].expand(batch, frames, height * width).reshape(batch, frames * height * width)


# ---- block masking (VIMPAC) ----------------------------------------------- #
def _draw_boxes(
    batch: int,
    num_boxes: int,
    grid: Grid,
    max_sides: Tuple[int, int, int],
    device: torch.device,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """Random boxes inside ``grid``: (batch, num_boxes, 6) long, half-open (t0,t1,h0,h1,w0,w1)."""
    corners = []
    for side, max_side in zip(grid, max_sides):
        length = torch.randint(
            1, max_side + 1, (batch, num_boxes), device=device, generator=generator
        )
        start = _uniform_ints(side - length + 1, generator)
        corners += [start, start + length]
    return torch.stack(corners, dim=-1)


def _box_membership(boxes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Which tokens each box covers. boxes (..., 6) -> (..., N) bool, t-major token order.

    Padding boxes (all -1) cover nothing because their ranges are empty.
    """
    frames, height, width = grid
    lead_shape = boxes.shape[:-1]

    def inside(axis: int, side: int) -> torch.Tensor:
        coords = torch.arange(side, device=boxes.device)
        return (coords >= boxes[..., 2 * axis, None]) & (coords < boxes[..., 2 * axis + 1, None])

    in_t, in_h, in_w = inside(0, frames), inside(1, height), inside(2, width)
    # Outer product over (t, h, w), flattened in the same t-major order as the tokens.
    covered = in_t[..., :, None, None] & in_h[..., None, :, None] & in_w[..., None, None, :]
    return covered.reshape(*lead_shape, frames * height * width)


def _first_cells_in_order(cells: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Keep the first ``count[b]`` True entries of each row (index order). (B, N) -> (B, N)."""
    return cells & (cells.cumsum(dim=1) <= count[:, None])


def _grow_block_masks(
    masks: torch.Tensor,
    target: int,
    grid: Grid,
    max_sides: Tuple[int, int, int],
    num_boxes: int,
    generator: Optional[torch.Generator],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add one chunk of ``num_boxes`` random boxes to each unfinished mask.

    masks: (A, N) bool, each with fewer than ``target`` masked tokens.
    Returns the new masks (A, N), the boxes used (A, num_boxes, 6; unused rows = -1) and a
    (A,) bool telling which masks reached exactly ``target``.
    """
    active = masks.shape[0]
    boxes = _draw_boxes(active, num_boxes, grid, max_sides, masks.device, generator)
    covered = _box_membership(boxes, grid)  # (A, M, N)
    # Union after adding boxes 0..k, for every k at once.
    unions = (covered | masks[:, None, :]).cummax(dim=1).values
    counts = unions.sum(dim=-1)  # (A, M)
    reached = counts >= target
    finished = reached.any(dim=1)
    # argmax returns the first maximum: the first box whose union reaches the target.
    last_box = torch.where(finished, reached.int().argmax(dim=1), num_boxes - 1)

    # Mask before the last box: the caller's mask when the very first box is the last one.
    unions_before = torch.cat([masks[:, None, :], unions[:, :-1]], dim=1)
    rows = torch.arange(active, device=masks.device)
    before = unions_before[rows, last_box]
    # The last box contributes only the new cells still needed, in t-major order inside it,
    # so the count is exact and the trimmed region stays compact.
    new_cells = covered[rows, last_box] & ~before
    still_needed = target - before.sum(dim=1)
    trimmed = before | _first_cells_in_order(new_cells, still_needed)
    new_masks = torch.where(finished[:, None], trimmed, unions[:, -1])

    used = torch.arange(num_boxes, device=masks.device)[None, :] <= last_box[:, None]
    boxes = torch.where(used[..., None], boxes, torch.full_like(boxes, -1))
    return new_masks, boxes, finished


def _compact_box_list(box_chunks: list, batch: int, device: torch.device) -> torch.Tensor:
    """Concatenate per-chunk boxes (B, M_i, 6) and drop box columns unused by every sample."""
    if not box_chunks:
        return torch.full((batch, 0, 6), -1, dtype=torch.long, device=device)
    boxes = torch.cat(box_chunks, dim=1)
    # Used boxes form a prefix per sample (a finished sample gets only padding afterwards).
    num_used = (boxes[..., 0] >= 0).sum(dim=1)
    max_used = int(num_used.max()) if batch > 0 else 0
    return boxes[:, :max_used]


def block_mask(
    batch: int,
    grid: Grid,
    ratio: float,
    device: DeviceLike = None,
    generator: Optional[torch.Generator] = None,
    return_boxes: bool = False,
    *,
    max_time_fraction: float = 2.0 / 3.0,
    max_space_fraction: float = 0.5,
    boxes_per_chunk: int = 32,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """VIMPAC block masking: a union of random 3-D boxes with exactly ``int(ratio * N)`` tokens.

    Boxes have temporal length in ``[1, max(1, floor(2T/3))]`` and spatial sides in
    ``[1, max(1, floor(H/2))]`` x ``[1, max(1, floor(W/2))]`` (fractions configurable), at
    uniform positions inside the grid. They are added one after another until the union
    reaches the target; the last box only adds as many of its not-yet-masked cells as
    needed, taken in t-major order inside that box.

    Work is vectorised over the batch and over a chunk of ``boxes_per_chunk`` candidate
    boxes (memory ~ B * boxes_per_chunk * N bools); samples that have not reached the target
    after a chunk draw another one.

    Returns (B, N) bool (True = masked); with ``return_boxes`` also a (B, K, 6) long tensor of
    the boxes used per sample as half-open ranges ``(t0, t1, h0, h1, w0, w1)``, in the order
    they were added, padded with rows of -1. The last non-padding row is the trimmed box.
    """
    grid, device = _checked_arguments(batch, grid, ratio, device, generator)
    _check_fraction(max_time_fraction, "max_time_fraction")
    _check_fraction(max_space_fraction, "max_space_fraction")
    if boxes_per_chunk < 1:
        raise ValueError(f"boxes_per_chunk must be >= 1, got {boxes_per_chunk!r}")
    max_sides = block_max_sides(grid, max_time_fraction, max_space_fraction)
    num_tokens = grid[0] * grid[1] * grid[2]
    target = _masked_count(ratio, num_tokens)

    masks = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    # Indices of samples still below the target (none when nothing is to be masked).
    unfinished = torch.arange(batch if target > 0 else 0, device=device)
    box_chunks = []
    # Terminates with probability 1: a 1x1x1 box can land on any unmasked token.
    while unfinished.numel() > 0:
        grown, boxes, finished = _grow_block_masks(
            masks[unfinished], target, grid, max_sides, boxes_per_chunk, generator
        )
        masks[unfinished] = grown
        chunk = torch.full((batch, boxes_per_chunk, 6), -1, dtype=torch.long, device=device)
        chunk[unfinished] = boxes
        box_chunks.append(chunk)
        unfinished = unfinished[~finished]

    if return_boxes:
        return masks, _compact_box_list(box_chunks, batch, device)
    return masks


def block_union_mask(
    batch: int,
    grid: Grid,
    num_blocks: int,
    device: DeviceLike = None,
    generator: Optional[torch.Generator] = None,
    *,
    max_time_fraction: float = 2.0 / 3.0,
    max_space_fraction: float = 0.5,
) -> torch.Tensor:
    """VIMPAC's own block masking (its ``mask_3d``): per sample the union of ``num_blocks`` random boxes with the
    limits of :func:`block_mask`, so each sample hides its own number of tokens. (B, N) bool, True = masked."""
    grid = _check_grid(grid)
    _check_batch(batch)
    device = _resolve_device(device, generator)
    boxes = _draw_boxes(batch, num_blocks, grid, block_max_sides(grid, max_time_fraction, max_space_fraction),
                        device, generator)
    return _box_membership(boxes, grid).any(dim=1)


# --------------------------------------------------------------------------- #
# Decoder mask (VideoMAE V2 running cell)
# --------------------------------------------------------------------------- #
def running_cell_slot_index(grid: Grid, device: DeviceLike = None) -> torch.Tensor:
    """Raster slot (0..3) of every spatial position inside its 2x2 cell. Returns (H*W,) long."""
    _, height, width = grid
    rows = torch.arange(height, device=device) % 2
    cols = torch.arange(width, device=device) % 2
    return (2 * rows[:, None] + cols[None, :]).reshape(-1)


def running_cell_from_offsets(
    offsets: torch.Tensor, grid: Grid, masked_per_cell: int
) -> torch.Tensor:
    """Running-cell masks for given starting offsets. offsets (B,) long in 0..3 -> (B, N) bool.

    Matches VideoMAE V2's ``RunningCellMaskingGenerator`` with ``ptr_pos = offset``: its cell
    queue is ``[1]*m + [0]*(4-m)`` and its pointer advances once *before* the first frame, so
    at temporal index t slot k (raster order) is masked iff ``(k + offset + t + 1) % 4 < m``.
    Consequently ``mask[t + 1, slot k] == mask[t, slot (k + 1) % 4]``: the pattern runs one
    slot backwards in raster order per time step.
    """
    frames, height, width = _check_grid(grid)
    _check_even_spatial_grid(grid)
    slots = running_cell_slot_index(grid, offsets.device)  # (H*W,)
    times = torch.arange(frames, device=offsets.device)  # (T,)
    phase = slots[None, None, :] + times[None, :, None] + offsets[:, None, None] + 1
    masks = (phase % RUNNING_CELL_SLOTS) < masked_per_cell  # (B, T, H*W)
    return masks.reshape(offsets.shape[0], frames * height * width)


def running_cell_mask(
    batch: int,
    grid: Grid,
    ratio: float = 0.5,
    device: DeviceLike = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """VideoMAE V2 running-cell decoder mask.

    The frame is tiled with 2x2 cells (H and W must be even); in every cell ``int(4 * ratio)``
    of the 4 slots are masked (True = dropped from the decoder), with the same pattern in all
    cells of a frame. The pattern shifts by one slot per temporal index (see
    :func:`running_cell_from_offsets`), from a random starting offset per sample.
    Exactly ``T * (H*W // 4) * int(4 * ratio)`` tokens are masked. Returns (B, N) bool.
    """
    _check_batch(batch)
    grid = _check_grid(grid)
    _check_even_spatial_grid(grid)
    _check_running_cell_ratio(ratio)
    device = _resolve_device(device, generator)
    offsets = torch.randint(
        0, RUNNING_CELL_SLOTS, (batch,), device=device, generator=generator
    )
    return running_cell_from_offsets(offsets, grid, int(RUNNING_CELL_SLOTS * ratio))


# --------------------------------------------------------------------------- #
# Counts and the configured generator
# --------------------------------------------------------------------------- #
def num_masked(cfg: MaskConfig, grid: Grid) -> int:
    """Exact number of encoder-masked tokens per sample for ``cfg`` on ``grid``."""
    frames, height, width = _check_grid(grid)
    if cfg.kind in ("tube", "space"):
        return frames * _masked_count(cfg.ratio, height * width)
    if cfg.kind == "frame":
        return _masked_count(cfg.ratio, frames) * height * width
    # "random" and "block" both mask int(ratio * N) tokens.
    return _masked_count(cfg.ratio, frames * height * width)


def num_visible(cfg: MaskConfig, grid: Grid) -> int:
    """Exact number of tokens the encoder sees per sample for ``cfg`` on ``grid``."""
    frames, height, width = _check_grid(grid)
    return frames * height * width - num_masked(cfg, grid)


def num_decoder_masked(cfg: MaskConfig, grid: Grid) -> int:
    """Tokens dropped from the decoder per sample by the decoder mask (0 for "none")."""
    frames, height, width = _check_grid(grid)
    if cfg.decoder_kind == "none":
        return 0
    return frames * (height * width // RUNNING_CELL_SLOTS) * int(RUNNING_CELL_SLOTS * cfg.decoder_ratio)


_ENCODER_MASK_FUNCTIONS: dict = {
    "tube": tube_mask,
    "space": tube_mask,  # MAE-ST's "space-only" sampling is VideoMAE's tube masking.
    "random": random_mask,
    "frame": frame_mask,
}


class MaskGenerator:
    """Draws ``(encoder_mask, decoder_mask_or_None)`` for a fixed config and token grid.

    ``gen(batch, device, generator=None)`` returns an encoder mask (B, N) bool and either a
    decoder mask (B, N) bool (running cell) or None. The exact per-sample counts are
    available as properties, so the engine and FLOP counter need not draw a mask.
    """

    def __init__(self, cfg: MaskConfig, grid: Grid):
        if cfg.block_count is not None:
            raise ValueError("mask.block_count gives every clip its own number of hidden tokens, which an encoder that "
                             "drops them cannot batch: set mask.ratio (and block_count=null) here")
        self.cfg = cfg
        self.grid = _check_grid(grid)
        if cfg.decoder_kind == "running_cell":
            _check_even_spatial_grid(self.grid)
        self._encoder_mask = self._encoder_mask_function(cfg)

    @staticmethod
    def _encoder_mask_function(cfg: MaskConfig) -> Callable[..., torch.Tensor]:
        if cfg.kind == "block":
            def draw_block(batch, grid, ratio, device, generator):
                return block_mask(
                    batch,
                    grid,
                    ratio,
                    device,
                    generator,
                    max_time_fraction=cfg.block_max_time_fraction,
                    max_space_fraction=cfg.block_max_space_fraction,
                    boxes_per_chunk=cfg.block_boxes_per_chunk,
                )

            return draw_block
        return _ENCODER_MASK_FUNCTIONS[cfg.kind]

    @property
    def num_tokens(self) -> int:
        frames, height, width = self.grid
        return frames * height * width

    @property
    def num_masked(self) -> int:
        return num_masked(self.cfg, self.grid)

    @property
    def num_visible(self) -> int:
        return num_visible(self.cfg, self.grid)

    @property
    def num_decoder_masked(self) -> int:
        return num_decoder_masked(self.cfg, self.grid)

    @property
    def num_decoder_kept(self) -> int:
        """Tokens the decoder keeps (not dropped by the decoder mask) per sample."""
        return self.num_tokens - self.num_decoder_masked

    def __call__(
        self,
        batch: int,
        device: DeviceLike = None,
        generator: Optional[torch.Generator] = None,
    ) -> MaskPair:
        encoder_mask = self._encoder_mask(batch, self.grid, self.cfg.ratio, device, generator)
        if self.cfg.decoder_kind == "none":
            return encoder_mask, None
        decoder_mask = running_cell_mask(
            batch, self.grid, self.cfg.decoder_ratio, device, generator
        )
        return encoder_mask, decoder_mask

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(kind={self.cfg.kind!r}, ratio={self.cfg.ratio}, grid={self.grid}, "
            f"visible={self.num_visible}/{self.num_tokens}, decoder={self.cfg.decoder_kind!r})"
        )


def build_mask_generator(cfg: MaskConfig, grid: Grid) -> MaskGenerator:
    """Mask generator for ``cfg`` on token grid ``grid = (T, H, W)``."""
    return MaskGenerator(cfg, grid)

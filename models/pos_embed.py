"""Position embeddings for a (t, h, w) token grid, always flattened t-major.

Three kinds are supported:

* ``sincos``: VideoMAE's fixed table. It is the 1-D Transformer sinusoid over the *flattened* token index
  (not a factorised 3-D table), with sin on even and cos on odd channels. Official VideoMAE and Hugging Face
  checkpoints were trained with exactly this table, so it is reproduced bit-for-bit (float64, then float32).
  It is a non-persistent buffer: it never appears in a checkpoint and is rebuilt for any other grid.
* ``separable``: MAE-ST's learnable space + time embeddings. The table for token (t, s) is
  ``spatial[s] + temporal[t]``; an optional extra vector serves the cls token. For another grid the two
  parts are resampled separately (bicubic over space, linear over time).
* ``factorized``: VIMPAC's learnable time + height + width embeddings (its eq. 8): token (t, i, j) gets
  ``temporal[t] + height[i] + width[j]``, each part initialised with std 0.02/√3 so that their sum has VIMPAC's 0.02;
  an optional extra vector serves the cls token. For another grid each part is resampled linearly along its axis
  (VIMPAC's 128 → 256 px continuation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Grid = tuple[int, int, int]


def sincos_table(num_positions: int, dim: int, device=None) -> torch.Tensor:
    """VideoMAE's sinusoid table, shape (1, num_positions, dim), float32."""
    position = torch.arange(num_positions, dtype=torch.float64, device=device)[:, None]
    channel = torch.arange(dim, device=device)
    # Channels 2i and 2i+1 share the frequency 1 / 10000^(2i/dim).
    inv_freq = torch.pow(10000.0, -(2 * torch.div(channel, 2, rounding_mode="floor")).double() / dim)
    angles = position * inv_freq
    table = torch.where(channel % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.float().unsqueeze(0)


def separable_table(spatial: torch.Tensor, temporal: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Combine (1, H*W, D) spatial and (1, T, D) temporal tables into a (1, T*H*W, D) t-major table.

    Both parts are resampled first when ``grid`` differs from the grid they were learned on.
    """
    t, h, w = grid
    if temporal.shape[1] != t:
        temporal = resample_temporal(temporal, t)
    if spatial.shape[1] != h * w:
        spatial = resample_spatial(spatial, (h, w))
    return spatial.repeat(1, t, 1) + temporal.repeat_interleave(h * w, dim=1)


def _square_side(num_positions: int) -> int:
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(
            f"cannot infer the spatial grid of a table with {num_positions} positions; pass old_hw explicitly"
        )
    return side


def resample_spatial(table: torch.Tensor, new_hw: tuple[int, int], old_hw: tuple[int, int] | None = None):
    """Bicubic resampling of a (1, H*W, D) spatial table to (1, H'*W', D)."""
    old_h, old_w = old_hw if old_hw is not None else (_square_side(table.shape[1]),) * 2
    if (old_h, old_w) == tuple(new_hw):
        return table
    dim = table.shape[-1]
    image = table.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=tuple(new_hw), mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, -1, dim).to(table.dtype)


def resample_temporal(table: torch.Tensor, new_t: int) -> torch.Tensor:
    """Linear resampling of a (1, T, D) temporal table to (1, T', D)."""
    if table.shape[1] == new_t:
        return table
    signal = table.transpose(1, 2).float()
    signal = F.interpolate(signal, size=new_t, mode="linear", align_corners=False)
    return signal.transpose(1, 2).to(table.dtype)


class PositionEmbedding(nn.Module):
    """The position table of one transformer (encoder or decoder).

    ``forward(grid)`` returns the (1, T*H*W, D) table for the patch tokens of that grid; ``cls`` holds the
    cls token's own vector (learnable, separable kind only) or is None.
    """

    def __init__(self, kind: str, grid: Grid, dim: int, cls_token: bool = False):
        super().__init__()
        self.kind = kind
        self.grid = tuple(grid)
        self.dim = dim
        self.cls = None
        if kind == "sincos":
            self.register_buffer("table", sincos_table(math.prod(grid), dim), persistent=False)
        elif kind == "separable":
            t, h, w = grid
            self.spatial = nn.Parameter(torch.zeros(1, h * w, dim))
            self.temporal = nn.Parameter(torch.zeros(1, t, dim))
            if cls_token:
                self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            for p in self.parameters():
                nn.init.trunc_normal_(p, std=0.02)
        elif kind == "factorized":
            t, h, w = grid
            self.temporal = nn.Parameter(torch.zeros(1, t, dim))
            self.height = nn.Parameter(torch.zeros(1, h, dim))
            self.width = nn.Parameter(torch.zeros(1, w, dim))
            for p in self.parameters():
                nn.init.trunc_normal_(p, std=0.02 / math.sqrt(3))
            if cls_token:
                self.cls = nn.Parameter(torch.zeros(1, 1, dim))
                nn.init.trunc_normal_(self.cls, std=0.02)
        else:
            raise ValueError(f"unknown position embedding {kind!r}; expected 'sincos', 'separable' or 'factorized'")

    def forward(self, grid: Grid) -> torch.Tensor:
        grid = tuple(grid)
        if self.kind == "sincos":
            if grid == self.grid:
                return self.table
            # The 1-D table only depends on the token count: VideoMAE rebuilds it for every new input size.
            return sincos_table(math.prod(grid), self.dim, device=self.table.device)
        if self.kind == "factorized":
            t, h, w = grid
            temporal = resample_temporal(self.temporal, t)
            height, width = resample_temporal(self.height, h), resample_temporal(self.width, w)
            table = temporal[:, :, None, None] + height[:, None, :, None] + width[:, None, None, :]
            return table.reshape(1, t * h * w, self.dim)
        h, w = self.grid[1:]
        spatial = self.spatial if grid[1:] == (h, w) else resample_spatial(self.spatial, grid[1:], (h, w))
        return separable_table(spatial, self.temporal, grid)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, grid={self.grid}, dim={self.dim}"

"""Histograms of oriented gradients of video frames, on the device: MaskFeat's HOG, the target of MAE-ST's Table 2b.

Per frame and colour channel: image gradients by MaskFeat's 3×3 Sobel filters (or the central differences of
Dalal-Triggs and scikit-image), each pixel's gradient magnitude added to the bin of its unsigned
orientation (``orientations`` bins over 180°, no interpolation between bins), optionally weighted by a Gaussian
window tiled over the frame (MaskFeat: 16×16, std 8), averaged over ``cell``×``cell`` cells, and each cell's
histogram L2-normalized per channel as scikit-image does it, x / sqrt(|x|² + 1e-5²). Reflect padding: a border
pixel's derivative across the border is zero, as in scikit-image.

Two choices differ from MaskFeat's code, both only where a cell is nearly flat: cells are averaged rather than
summed, and the Gaussian window has mean 1 rather than sum 1, so that the epsilon of the normalization compares with
a mean gradient magnitude of pixels in [0, 1] (one grey level is 0.004). A cell whose mean magnitude is well below
1e-5 (a flat area, or noise far below one grey level) then stays near zero instead of being blown up to a unit
histogram of noise, which MaskFeat's sum and ``F.normalize`` (epsilon 1e-12) would do. Elsewhere the normalized
histograms are the same: scaling a cell does not change its normalized histogram.

Single-device code: no distribution, precision or device placement here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

# The epsilon of scikit-image's L2 block normalization, x / sqrt(|x|^2 + eps^2), used the same way here.
NORM_EPS = 1e-5


@dataclass
class HOGConfig:
    # orientation bins over 180° (unsigned gradients); MaskFeat: 9
    orientations: int = 9
    # side of the square cells histograms are summed over, in pixels; MaskFeat: 8
    cell: int = 8
    # derivative filters: sobel (MaskFeat) or central ([-1, 0, 1]: Dalal-Triggs, scikit-image)
    gradient: Literal["sobel", "central"] = "sobel"
    # side of the Gaussian window (std side / 2) that weights the magnitudes, tiled over the frame; 0 = none
    gaussian_window: int = 16

    def __post_init__(self) -> None:
        if self.orientations < 1 or self.cell < 1:
            raise ValueError(f"orientations and cell must be >= 1, got {self.orientations}, {self.cell}")
        if self.gaussian_window < 0:
            raise ValueError(f"gaussian_window must be >= 0, got {self.gaussian_window}")


def _gradients(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """d/dx (along the width) and d/dy (along the height) of (M, H, W) images, reflect-padded, as differences of
    shifted copies rather than a convolution: equal neighbours give an exact zero. A gradient along a reflected
    border is then exactly horizontal or vertical; a convolution's ±1e-8 of rounding would put it in the first or
    the last bin at random (0° and 180° are the same orientation, on the edge between those two bins)."""
    if kind not in ("sobel", "central"):
        raise ValueError(f"gradient must be 'sobel' or 'central', got {kind!r}")
    p = F.pad(x[:, None], (1, 1, 1, 1), mode="reflect")[:, 0]  # (M, H+2, W+2)
    dx = p[:, :, 2:] - p[:, :, :-2]  # (M, H+2, W)
    dy = p[:, 2:, :] - p[:, :-2, :]  # (M, H, W+2)
    if kind == "central":
        return dx[:, 1:-1], dy[:, :, 1:-1]
    # Sobel: the difference smoothed by (1, 2, 1) across it
    return dx[:, :-2] + 2 * dx[:, 1:-1] + dx[:, 2:], dy[:, :, :-2] + 2 * dy[:, :, 1:-1] + dy[:, :, 2:]


def _gaussian_window(side: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """A side×side Gaussian (std side / 2, mean 1) tiled over height×width."""
    n = torch.arange(side, dtype=torch.float32, device=device)
    g = torch.exp(-0.5 * ((n - n.mean()) / (side / 2)) ** 2)
    window = torch.outer(g, g)
    window = window / window.mean()
    return window.repeat(math.ceil(height / side), math.ceil(width / side))[:height, :width]


def hog(frames: torch.Tensor, cfg: HOGConfig) -> torch.Tensor:
    """frames (N, C, H, W), H and W multiples of ``cfg.cell`` → histograms (N, C, orientations, H/cell, W/cell),
    float32: each cell's mean of the magnitudes per bin, L2-normalized per cell and channel."""
    n, c, h, w = frames.shape
    if h % cfg.cell or w % cfg.cell:
        raise ValueError(f"frames of {h}×{w} are not divisible into {cfg.cell}-pixel cells")
    x = frames.float().reshape(n * c, h, w)
    gx, gy = _gradients(x, cfg.gradient)  # (N·C, H, W)
    magnitude = torch.hypot(gx, gy)
    if cfg.gaussian_window:
        magnitude = magnitude * _gaussian_window(cfg.gaussian_window, h, w, x.device)
    # unsigned orientation in [0, 180°) → bin; a gradient and its opposite fall in the same bin
    angle = torch.remainder(torch.atan2(gy, gx), math.pi)
    bins = (angle * (cfg.orientations / math.pi)).long().clamp_(max=cfg.orientations - 1)
    hc, wc = h // cfg.cell, w // cfg.cell
    rows = torch.arange(h, device=x.device) // cfg.cell
    cols = torch.arange(w, device=x.device) // cfg.cell
    cell_of_pixel = (rows[:, None] * wc + cols[None, :]).reshape(-1)  # (H·W,)
    index = bins.reshape(n * c, -1) * (hc * wc) + cell_of_pixel
    hist = torch.zeros(n * c, cfg.orientations * hc * wc, device=x.device)
    hist.scatter_add_(1, index, magnitude.reshape(n * c, -1))
    hist = hist.reshape(n, c, cfg.orientations, hc, wc) / cfg.cell**2
    return hist / (hist.square().sum(dim=2, keepdim=True) + NORM_EPS**2).sqrt()

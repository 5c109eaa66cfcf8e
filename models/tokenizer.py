"""A per-frame VQ autoencoder: the video tokenizer whose codes VIMPAC (and MAE-ST's dVAE row of Table 2b) predicts.

Each frame goes through a convolutional encoder that downsamples by ``2 ** len(channels)`` (8 by default, DALL-E's
grid: one code per 8×8 pixels), a vector quantizer, and a mirrored decoder back to pixels. The quantizer is
``vector_quantize_pytorch.VectorQuantize``: codebook updated by exponential moving averages, codes unused for a while
replaced by encoder outputs of the current batch (dead-code restarts), commitment loss. ``tokenize(video)`` gives the
codes (B, T, H/8, W/8) of a normalized clip; the training objective is ``loss`` (reconstruction MSE + commitment).

Single-device code: no distribution, precision or device placement here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TokenizerConfig:
    # output channels of the encoder's stages, each halving height and width (3 stages: 8x downsampling, DALL-E's)
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    # residual blocks after each stage
    blocks_per_stage: int = 1
    # codes in the codebook (DALL-E: 8192; 1024 suits small data)
    codebook_size: int = 1024
    # width of a code
    code_dim: int = 64
    # EMA decay of the codebook
    decay: float = 0.99
    # weight of the commitment loss (encoder outputs pulled towards their codes)
    commitment_weight: float = 0.25
    # a code chosen fewer times than this (EMA count) is replaced by an encoder output of the batch; 0 = never
    dead_code_threshold: float = 2.0
    in_chans: int = 3  # input channels

    def __post_init__(self) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be a non-empty list of positive widths, got {self.channels}")
        if self.codebook_size < 2 or self.code_dim < 1 or self.blocks_per_stage < 0:
            raise ValueError(f"codebook_size must be >= 2, code_dim >= 1, blocks_per_stage >= 0, got "
                             f"{self.codebook_size}, {self.code_dim}, {self.blocks_per_stage}")
        if not 0 < self.decay < 1 or self.commitment_weight < 0 or self.dead_code_threshold < 0:
            raise ValueError("decay must lie in (0, 1); commitment_weight and dead_code_threshold must be >= 0")

    @property
    def downsample(self) -> int:
        return 2 ** len(self.channels)


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(min(32, dim), dim), nn.SiLU(), nn.Conv2d(dim, dim, 3, padding=1),
                                 nn.GroupNorm(min(32, dim), dim), nn.SiLU(), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _encoder(cfg: TokenizerConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = cfg.in_chans
    for out in cfg.channels:
        layers += [nn.Conv2d(width, out, 4, stride=2, padding=1), *(ResBlock(out) for _ in range(cfg.blocks_per_stage))]
        width = out
    layers += [nn.GroupNorm(min(32, width), width), nn.SiLU(), nn.Conv2d(width, cfg.code_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(cfg: TokenizerConfig) -> nn.Sequential:
    widths = list(reversed(cfg.channels))
    layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, widths[0], 3, padding=1)]
    for i, width in enumerate(widths):
        out = widths[i + 1] if i + 1 < len(widths) else widths[-1]
        layers += [*(ResBlock(width) for _ in range(cfg.blocks_per_stage)),
                   nn.ConvTranspose2d(width, out, 4, stride=2, padding=1)]
    layers += [nn.GroupNorm(min(32, widths[-1]), widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], cfg.in_chans, 3,
                                                                                  padding=1)]
    return nn.Sequential(*layers)


class VQTokenizer(nn.Module):
    """Frames (N, C, H, W), normalized, H and W multiples of ``cfg.downsample`` → codes (N, H/8, W/8)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.cfg = cfg
        self.encoder = _encoder(cfg)
        self.quantizer = VectorQuantize(dim=cfg.code_dim, codebook_size=cfg.codebook_size, decay=cfg.decay,
                                        commitment_weight=cfg.commitment_weight,
                                        threshold_ema_dead_code=cfg.dead_code_threshold, accept_image_fmap=True)
        self.decoder = _decoder(cfg)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss = reconstruction MSE + commitment loss, the MSE alone (detached), codes (N, H/8, W/8),
        reconstruction (N, C, H, W)). In training mode the forward also moves the codebook (moving averages,
        dead-code restarts)."""
        quantized, codes, commitment = self.quantizer(self.encoder(frames.to(self.encoder[0].weight.dtype)))
        reconstruction = self.decoder(quantized)
        mse = F.mse_loss(reconstruction.float(), frames.float())
        return mse + commitment, mse.detach(), codes, reconstruction

    @torch.no_grad()
    def tokenize(self, video: torch.Tensor) -> torch.Tensor:
        """A normalized clip (B, C, T, H, W) → its codes (B, T, H/8, W/8), int64, on the clip's device. Runs in
        eval mode whatever the module's mode: reading codes never moves the codebook."""
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w).to(self.encoder[0].weight.dtype)
        training = self.training
        self.eval()
        try:
            _, codes, _ = self.quantizer(self.encoder(frames))
        finally:
            self.train(training)
        return codes.reshape(b, t, h // self.cfg.downsample, w // self.cfg.downsample)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (N, h, w) → frames (N, C, 8h, 8w): what a code map looks like."""
        quantized = self.quantizer.get_output_from_indices(codes)  # (N, D, h, w): an image feature map
        return self.decoder(quantized.to(self.decoder[0].weight.dtype))


def on_device(tokenizer: VQTokenizer, device: torch.device) -> VQTokenizer:
    """``tokenizer`` moved to ``device`` the first time it is needed there (float32 always): a frozen tokenizer kept
    outside a model's registered modules does not follow the model's ``.to()``, and must not follow its casts."""
    if next(tokenizer.parameters()).device != device:
        tokenizer.to(device)
    return tokenizer


def code_statistics(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """``codebook_statistics`` of the codes (any shape) of a tokenizer with ``codebook_size`` codes."""
    return codebook_statistics(torch.bincount(codes.reshape(-1), minlength=codebook_size))


def codebook_statistics(counts: torch.Tensor) -> dict[str, float]:
    """From how often each code was chosen (codebook_size,): the share of the codebook used and the perplexity of
    the codes' distribution (exp of its entropy: the number of equally used codes that would give it)."""
    p = counts.double() / counts.sum().clamp(min=1)
    entropy = -(p * p.clamp(min=1e-12).log()).sum()
    return {"code_usage": (counts > 0).double().mean().item(), "perplexity": entropy.exp().item()}

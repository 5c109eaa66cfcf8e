"""Masked video autoencoder (VideoMAE / MAE-ST): asymmetric encoder-decoder that owns its objective.

``VideoMAE.forward(video, mask)`` takes a normalized clip and a token mask and returns ``(loss, pred, mask)``;
the training engine never touches pixels, patches or targets. Parameter names follow the official VideoMAE
pre-training checkpoints: ``encoder.*``, ``encoder_to_decoder``, ``mask_token``, ``decoder.blocks.*``,
``decoder.norm``, ``decoder.head``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.flops import linear_flops, transformer_flops
from models.hog import HOGConfig, hog
from models.pos_embed import PositionEmbedding
from models.tokenizer import on_device
from models.vit import VisionTransformer, ViTConfig, enable_checkpointing, make_blocks, run_blocks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# VideoMAE's decoder (width, heads) for each encoder size.
DECODER_DIMS = {
    "vit_debug": (32, 2),
    "vit_small": (192, 3),
    "vit_base": (384, 6),
    "vit_large": (512, 8),
    "vit_huge": (640, 8),
}


@dataclass
class DecoderConfig:
    embed_dim: Optional[int] = None  # decoder width; None = VideoMAE's width for the encoder size
    depth: int = 4  # decoder blocks
    num_heads: Optional[int] = None  # None = VideoMAE's heads for the encoder size
    mlp_ratio: float = 4.0  # MLP hidden width / decoder width
    pos_embed: Literal["sincos", "separable"] = "sincos"  # decoder position table
    layer_scale_init: float = 0.0  # initial LayerScale of the blocks (official init_values); 0 disables it


@dataclass
class TargetConfig:
    normalize: Literal["per_channel", "joint", "none"] = "per_channel"  # pixels: per-patch pixel normalization
    frames: Literal["tubelet", "first"] = "tubelet"  # predict every frame of a tubelet or one time slice
    # what the decoder predicts for a hidden token: its pixels (VideoMAE, MAE-ST), the histograms of oriented
    # gradients of its 8x8 cells (MaskFeat; MAE-ST Table 2b), both with MSE, or the codes a frozen video tokenizer
    # gives its 8x8 cells (VIMPAC; MAE-ST's dVAE row), with cross-entropy
    kind: Literal["pixels", "hog", "tokens"] = "pixels"
    hog: HOGConfig = field(default_factory=HOGConfig)  # kind=hog: bins, cells, gradient filters, Gaussian window
    # kind=tokens: the tokenizer's weights.pt (run_scripts/tokenizer.py); its architecture comes from the run's
    # config.yaml beside it. It must have been trained on clips normalized as this run's data section does.
    tokenizer: str = ""


@dataclass
class PretrainModelConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)  # the encoder that is transferred afterwards
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # the light decoder
    target: TargetConfig = field(default_factory=TargetConfig)  # what the decoder reconstructs

    def __post_init__(self) -> None:
        if self.target.kind == "hog" and self.encoder.patch_size % self.target.hog.cell:
            raise ValueError(f"HOG targets need whole cells in a patch: patch_size {self.encoder.patch_size} is not a "
                             f"multiple of target.hog.cell {self.target.hog.cell}")
        if self.target.kind == "tokens" and not self.target.tokenizer:
            raise ValueError("target.kind=tokens needs target.tokenizer: the weights.pt of run_scripts/tokenizer.py")

    def decoder_dims(self) -> tuple[int, int]:
        width, heads = DECODER_DIMS[self.encoder.arch]
        return self.decoder.embed_dim or width, self.decoder.num_heads or heads

    def target_dim(self, frames: int, codebook_size: int = 0, token_cell: int = 1) -> int:
        """Values the decoder predicts per token, for ``frames`` frames of it (tokens: a logit per code of the
        tokenizer's codebook for each of its ``token_cell``-pixel cells)."""
        enc = self.encoder
        if self.target.kind == "hog":
            return frames * (enc.patch_size // self.target.hog.cell) ** 2 * enc.in_chans * self.target.hog.orientations
        if self.target.kind == "tokens":
            return frames * (enc.patch_size // token_cell) ** 2 * codebook_size
        return frames * enc.patch_size**2 * enc.in_chans


def patchify(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """(B, C, T, H, W) → (B, N, tubelet·patch·patch, C): tokens t-major, pixels (t, y, x) within a token."""
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (t // tubelet) * (h // patch) * (w // patch), tubelet * patch * patch, c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], tubelet: int, patch: int) -> torch.Tensor:
    """Inverse of ``patchify`` for tokens (B, N, tubelet·patch·patch·C) → (B, C, T, H, W)."""
    b = tokens.shape[0]
    gt, gh, gw = grid
    x = tokens.reshape(b, gt, gh, gw, tubelet, patch, patch, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, x.shape[1], gt * tubelet, gh * patch, gw * patch)


def normalize_patches(patches: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token target normalization of (B, N, P, C) patches; returns (B, N, P·C)."""
    if mode == "per_channel":
        # VideoMAE: each channel over its P pixels, unbiased std, epsilon outside the square root.
        mean = patches.mean(dim=-2, keepdim=True)
        std = patches.var(dim=-2, unbiased=True, keepdim=True).sqrt()
        return ((patches - mean) / (std + 1e-6)).flatten(2)
    flat = patches.flatten(2)
    if mode == "joint":
        # MAE / MAE-ST: all P·C values of a token together, epsilon inside the square root.
        mean = flat.mean(dim=-1, keepdim=True)
        var = flat.var(dim=-1, unbiased=True, keepdim=True)
        return (flat - mean) / (var + 1e-6).sqrt()
    return flat


def hog_tokens(frames: torch.Tensor, per_token: int, patch: int, cfg: HOGConfig) -> torch.Tensor:
    """HOG of clips (B, C, T, H, W) arranged per token: (B, N, per_token · (patch/cell)² · C · orientations), the
    ``per_token`` consecutive frames of a token, then its cells row by row, then channels, then bins."""
    b, c, t, h, w = frames.shape
    hist = hog(frames.transpose(1, 2).reshape(b * t, c, h, w), cfg)  # (B·T, C, bins, H/cell, W/cell)
    k, bins = patch // cfg.cell, cfg.orientations
    hist = hist.reshape(b, t // per_token, per_token, c, bins, h // patch, k, w // patch, k)
    hist = hist.permute(0, 1, 5, 7, 2, 6, 8, 3, 4)  # (B, T', H', W', frames, cy, cx, C, bins)
    return hist.reshape(b, (t // per_token) * (h // patch) * (w // patch), -1)


def code_tokens(codes: torch.Tensor, per_token: int, cells: int) -> torch.Tensor:
    """Code maps (B, T, H/cell, W/cell) arranged per token: (B, N, per_token · cells²), the ``per_token`` consecutive
    frames of a token, then its ``cells`` × ``cells`` codes row by row (a 16-pixel patch holds 2 × 2 codes of 8)."""
    b, t, hc, wc = codes.shape
    x = codes.reshape(b, t // per_token, per_token, hc // cells, cells, wc // cells, cells)
    x = x.permute(0, 1, 3, 5, 2, 4, 6)  # (B, T', H', W', frames, cy, cx)
    return x.reshape(b, (t // per_token) * (hc // cells) * (wc // cells), per_token * cells * cells)


def _denormalize(pred: torch.Tensor, patches: torch.Tensor, mode: str) -> torch.Tensor:
    """Map predicted targets (B, N, P·C) back to pixels (B, N, P, C) with the statistics of ``patches``."""
    shaped = pred.reshape(patches.shape)
    if mode == "per_channel":
        mean = patches.mean(dim=-2, keepdim=True)
        std = patches.var(dim=-2, unbiased=True, keepdim=True).sqrt()
        return shaped * (std + 1e-6) + mean
    if mode == "joint":
        flat = patches.flatten(2)
        mean = flat.mean(dim=-1, keepdim=True)[..., None]
        std = (flat.var(dim=-1, unbiased=True, keepdim=True) + 1e-6).sqrt()[..., None]
        return shaped * std + mean
    return shaped


class Decoder(nn.Module):
    """Transformer over visible + mask tokens that predicts the pixels of the last ``num_pred`` tokens."""

    def __init__(self, dim, depth, num_heads, mlp_ratio, out_dim, norm_eps, use_sdpa, layer_scale_init=0.0):
        super().__init__()
        self.blocks = make_blocks(dim, depth, num_heads, mlp_ratio, layer_scale_init=layer_scale_init,
                                  norm_eps=norm_eps, use_sdpa=use_sdpa)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, num_pred: int, checkpointing: str = "none") -> torch.Tensor:
        x = run_blocks(self.blocks, x, checkpointing)
        # The head runs only on the tokens that are scored (VideoMAE), not on the visible ones.
        return self.head(self.norm(x[:, -num_pred:]))


class VideoMAE(nn.Module):
    """Masked video pre-training model.

    The encoder sees only visible tokens. The decoder input is ``[visible + pos, mask_token + pos]`` in that
    order (not unshuffled: positions are carried by the added table, so order does not change the result).
    With a ``decoder_mask`` (VideoMAE V2 dual masking) mask tokens are placed at every position the decoder
    keeps, and only tokens both hidden from the encoder and kept by the decoder are scored.
    """

    def __init__(self, cfg: PretrainModelConfig, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD, tokenizer=None):
        """``pixel_mean``/``pixel_std``: the statistics the input clip was normalized with (the data config's),
        needed to recover pixels for the targets. ``tokenizer``: the frozen ``models.tokenizer.VQTokenizer`` of
        ``target.kind=tokens``; it is kept outside this module's parameters, buffers and state dict (never trained,
        never cast to the engine's precision, never saved with the encoder) and follows the clip to its device."""
        super().__init__()
        if len(pixel_mean) != cfg.encoder.in_chans or len(pixel_std) != cfg.encoder.in_chans:
            raise ValueError(f"pixel_mean/pixel_std need {cfg.encoder.in_chans} values, one per input channel")
        self.cfg = cfg
        enc = cfg.encoder
        self.tubelet, self.patch = enc.tubelet_size, enc.patch_size
        self.pred_frames = enc.tubelet_size if cfg.target.frames == "tubelet" else 1
        self.checkpointing = enc.checkpointing

        self.encoder = VisionTransformer(enc, num_classes=0, global_pool="none", init="xavier")
        dec_dim, dec_heads = cfg.decoder_dims()
        self.encoder_to_decoder = nn.Linear(self.encoder.embed_dim, dec_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = PositionEmbedding(cfg.decoder.pos_embed, enc.grid, dec_dim)
        if (cfg.target.kind == "tokens") != (tokenizer is not None):
            raise ValueError("a tokenizer is given exactly when target.kind is tokens")
        # plain attribute bypassing nn.Module registration: see the docstring
        self.__dict__["tokenizer"] = tokenizer.eval().requires_grad_(False) if tokenizer is not None else None
        if tokenizer is not None:
            cell = tokenizer.cfg.downsample
            if self.patch % cell:
                raise ValueError(f"token targets need whole tokenizer cells in a patch: patch_size {self.patch} is not "
                                 f"a multiple of the tokenizer's {cell}-pixel cells")
            out_dim = cfg.target_dim(self.pred_frames, tokenizer.cfg.codebook_size, cell)
        else:
            out_dim = cfg.target_dim(self.pred_frames)
        self.decoder = Decoder(
            dec_dim, cfg.decoder.depth, dec_heads, cfg.decoder.mlp_ratio, out_dim, enc.norm_eps,
            use_sdpa=enc.attention == "sdpa", layer_scale_init=cfg.decoder.layer_scale_init,
        )
        # Plain floats, not buffers: casting the module to bf16 would round them (0.229 -> 0.2295), and the targets
        # must undo exactly the normalization the clip went through.
        self.pixel_mean, self.pixel_std = tuple(map(float, pixel_mean)), tuple(map(float, pixel_std))
        self._pixel_stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        self._init_decoder()
        enable_checkpointing(self.decoder.blocks, self.checkpointing)

    @torch.no_grad()
    def _init_decoder(self) -> None:
        for module in [self.encoder_to_decoder, *self.decoder.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def pixel_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as float32 (1, C, 1, 1, 1) tensors on ``device``, made once per device."""
        if device not in self._pixel_stats:
            self._pixel_stats[device] = tuple(
                torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
                for values in (self.pixel_mean, self.pixel_std))
        return self._pixel_stats[device]

    def pixels(self, video: torch.Tensor) -> torch.Tensor:
        """The normalized clip (B, C, T, H, W) back in [0, 1] pixels, float32."""
        mean, std = self.pixel_stats(video.device)
        return video.float() * std + mean

    @torch.no_grad()
    def targets(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction targets (B, N, ``cfg.target_dim(pred_frames)``) from the normalized clip, in float32: the
        normalized pixels of each token, or the HOG of its cells. Give the clip in float32: a bf16 clip has lost a
        pixel level's worth of precision, which per-patch normalization amplifies on flat patches (2% RMS target
        error on smooth content)."""
        if self.pred_frames == 1:
            # One time slice per token (MAE-ST): the first frame of each tubelet.
            video = video[:, :, :: self.tubelet]
        if self.cfg.target.kind == "tokens":  # the tokenizer reads the normalized clip, as it was trained on it
            tokenizer = on_device(self.__dict__["tokenizer"], video.device)
            codes = tokenizer.tokenize(video.float())
            return code_tokens(codes, self.pred_frames, self.patch // tokenizer.cfg.downsample)
        raw = self.pixels(video)
        if self.cfg.target.kind == "hog":
            return hog_tokens(raw, self.pred_frames, self.patch, self.cfg.target.hog)
        return normalize_patches(patchify(raw, self.pred_frames, self.patch), self.cfg.target.normalize)

    def forward(self, video: torch.Tensor, mask: torch.Tensor, decoder_mask: Optional[torch.Tensor] = None):
        """video (B, C, T, H, W) normalized; mask (B, N) True = hidden from the encoder;
        decoder_mask (B, N) True = dropped by the decoder, or None.

        Returns ``loss`` (scalar, float32), ``pred`` (B, N_pred, P) for the decoded positions in ascending
        token order (the hidden ones, or the decoder-kept ones with a decoder mask) and ``mask``.
        """
        b = video.shape[0]
        grid = self.encoder.patch_embed.grid(video)
        decoded = mask if decoder_mask is None else ~decoder_mask

        latent = self.encoder_to_decoder(self.encoder.forward_features(video, mask))
        latent = latent[:, self.encoder.num_prefix_tokens :]  # the decoder has no cls token
        dim = latent.shape[-1]
        pos = self.decoder_pos_embed(grid).to(latent.dtype).expand(b, -1, -1)
        pos_visible = pos[~mask].reshape(b, -1, dim)
        pos_decoded = pos[decoded].reshape(b, -1, dim)
        x = torch.cat([latent + pos_visible, self.mask_token.to(latent.dtype) + pos_decoded], dim=1)
        pred = self.decoder(x, pos_decoded.shape[1], self.checkpointing)

        target = self.targets(video)
        target = target[decoded].reshape(b, -1, target.shape[-1])
        if self.cfg.target.kind == "tokens":  # target (B, N_pred, positions) codes; pred a logit per code each
            logits = pred.float().reshape(*target.shape, -1)
            error = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none").reshape(target.shape)
            error = error.mean(dim=-1)
        else:
            error = F.mse_loss(pred.float(), target, reduction="none").mean(dim=-1)
        if decoder_mask is None:
            loss = error.mean()
        else:
            scored = mask[decoded].reshape(b, -1).float()
            loss = (error * scored).sum() / scored.sum().clamp(min=1)
        return loss, pred, mask

    def pixel_mask(self, mask: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """The token mask (B, N) spread over the pixels of ``video``: bool (B, C, T, H, W)."""
        grid = self.encoder.patch_embed.grid(video)
        per_token = mask[..., None].expand(-1, -1, self.tubelet * self.patch**2 * video.shape[1])
        return unpatchify(per_token.float(), grid, self.tubelet, self.patch).bool()

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                    decoder_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pixels in [0, 1] (B, C, T, H, W): visible tubelets from the input, decoded ones from ``pred``
        (normalized targets mapped back with each patch's own statistics), the rest grey. A model that predicts
        HOG has no pixels to show: its hidden tubelets stay grey."""
        b, c = video.shape[:2]
        grid = self.encoder.patch_embed.grid(video)
        decoded = mask if decoder_mask is None else ~decoder_mask
        raw = self.pixels(video)
        patches = patchify(raw, self.tubelet, self.patch)  # (B, N, P, C)
        if self.cfg.target.kind != "pixels":
            out = torch.full_like(patches, 0.5)
            out[~mask] = patches[~mask]
            return unpatchify(out.flatten(2), grid, self.tubelet, self.patch).clamp(0, 1)
        source = patches if self.pred_frames == self.tubelet else patchify(raw[:, :, :: self.tubelet], 1, self.patch)
        predicted = _denormalize(pred.float(), source[decoded].reshape(b, -1, *source.shape[2:]),
                                 self.cfg.target.normalize)  # (B, N_pred, P', C)
        if self.pred_frames != self.tubelet:  # one time slice per tubelet: show it on every frame
            predicted = predicted.reshape(b, -1, 1, self.patch**2, c).expand(-1, -1, self.tubelet, -1, -1)
            predicted = predicted.reshape(b, -1, self.tubelet * self.patch**2, c)
        out = torch.full_like(patches, 0.5)
        out[~mask] = patches[~mask]
        out[decoded] = predicted.reshape(-1, *patches.shape[2:])
        return unpatchify(out.flatten(2), grid, self.tubelet, self.patch).clamp(0, 1)

    def forward_flops(self, grid, num_visible: int, num_decoded: Optional[int] = None) -> int:
        """Forward FLOPs of one clip: encoder on ``num_visible`` tokens, decoder over visible + decoded."""
        num_tokens = math.prod(grid)
        num_decoded = num_tokens - num_visible if num_decoded is None else num_decoded
        dec_dim = self.mask_token.shape[-1]
        flops = self.encoder.forward_flops(grid, num_visible)
        flops += linear_flops(num_visible + self.encoder.num_prefix_tokens, self.encoder.embed_dim, dec_dim)
        flops += transformer_flops(num_visible + num_decoded, dec_dim, len(self.decoder.blocks),
                                   self.cfg.decoder.mlp_ratio)
        flops += linear_flops(num_decoded, dec_dim, self.decoder.head.out_features)
        return flops

    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{name}" for name in self.encoder.no_weight_decay()}
        names |= {name for name, _ in self.named_parameters() if "pos_embed" in name}
        return names | {"mask_token"}

"""Vanilla video Vision Transformer: tubelet embedding, pre-norm blocks, pooling head.

Parameter names follow the official VideoMAE release (``patch_embed.proj``, ``blocks.N.attn.qkv``,
``attn.q_bias``/``attn.v_bias``, ``mlp.fc1``, ``norm``, ``fc_norm``, ``head``) so its checkpoints load by name.
Single-device code: no distribution, precision or device placement happens here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.flops import linear_flops, transformer_flops
from models.pos_embed import PositionEmbedding

# (embed_dim, depth, num_heads) of the VideoMAE family, plus a debug size for tests and CPU smoke runs, and VIMPAC's
# Table 3 sizes (its Large-Half also halves the head width and the MLP: head_dim 32, mlp_ratio 2 in its recipe).
ARCHS = {
    "vit_debug": (64, 2, 4),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
    "vimpac_small": (512, 6, 8),
    "vimpac_base": (768, 12, 12),
    "vimpac_large_half": (1024, 24, 16),
}
ArchName = Literal["vit_debug", "vit_small", "vit_base", "vit_large", "vit_huge", "vimpac_small", "vimpac_base",
                   "vimpac_large_half"]

Grid = tuple[int, int, int]


@dataclass
class ViTConfig:
    arch: ArchName = "vit_base"  # size preset
    embed_dim: Optional[int] = None  # overrides the preset's width
    depth: Optional[int] = None  # overrides the preset's number of blocks
    num_heads: Optional[int] = None  # overrides the preset's number of attention heads
    # width of one attention head; None = embed_dim / num_heads (VIMPAC Large-Half: 32, half its 64)
    head_dim: Optional[int] = None
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim
    num_frames: int = 16  # input frames the position table is built for
    img_size: int = 224  # input height = width the position table is built for
    patch_size: int = 16  # spatial side of a tubelet
    tubelet_size: int = 2  # frames per tubelet
    in_chans: int = 3  # input channels
    qkv_bias: bool = True  # learnable q and v biases (the k bias is fixed at zero, as in BEiT/VideoMAE)
    layer_scale_init: float = 0.0  # initial LayerScale value; 0 disables LayerScale
    drop_path: float = 0.0  # stochastic depth rate of the last block (linear ramp from 0)
    drop: float = 0.0  # dropout after attention projection and in the MLP
    attn_drop: float = 0.0  # dropout on attention probabilities
    # fixed VideoMAE table, MAE-ST learnable space + time, or VIMPAC learnable time + height + width
    pos_embed: Literal["sincos", "separable", "factorized"] = "sincos"
    cls_token: bool = False  # prepend a learnable cls token (MAE-ST); VideoMAE has none
    checkpointing: Literal["none", "torch", "fairscale", "fairscale_offload"] = "none"  # per-block recompute
    attention: Literal["sdpa", "manual"] = "sdpa"  # fused scaled_dot_product_attention or the explicit softmax
    norm_eps: float = 1e-6  # LayerNorm epsilon everywhere in the network
    # LayerNorm before each residual branch (ViT, VideoMAE; a final norm after the last block) or after the residual
    # sum (the original Transformer and BERT, VIMPAC's default; no final norm)
    norm_layout: Literal["pre", "post"] = "pre"
    # attention over every token ("full"), or VIMPAC's "T,H|W": per layer, attention along time, then along height
    # and width in parallel (half the heads each), [CLS] attending to every line and averaged. Only for a transformer
    # over tokenizer codes (models.vimpac.TokenViT), whose tokens always fill the grid
    layout: Literal["full", "t,h|w"] = "full"

    def __post_init__(self):
        dim, _, heads = self.dims()
        if self.norm_layout not in ("pre", "post"):
            raise ValueError(f"norm_layout must be 'pre' or 'post', got {self.norm_layout!r}")
        if self.layout not in ("full", "t,h|w"):
            raise ValueError(f"layout must be 'full' or 't,h|w', got {self.layout!r}")
        if self.layout != "full" and heads % 2:
            raise ValueError(f"layout 't,h|w' splits the heads between height and width: num_heads {heads} is odd")
        if dim % heads and self.head_dim is None:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        if self.num_frames % self.tubelet_size or self.img_size % self.patch_size:
            raise ValueError(
                f"num_frames {self.num_frames} must be a multiple of tubelet_size {self.tubelet_size} and "
                f"img_size {self.img_size} a multiple of patch_size {self.patch_size}"
            )

    def dims(self) -> tuple[int, int, int]:
        """(embed_dim, depth, num_heads) after applying overrides to the preset."""
        dim, depth, heads = ARCHS[self.arch]
        return self.embed_dim or dim, self.depth or depth, self.num_heads or heads

    def attn_dim(self) -> int:
        """Width of the attention's queries, keys and values: heads × head width."""
        dim, _, heads = self.dims()
        return heads * self.head_dim if self.head_dim else dim

    @property
    def grid(self) -> Grid:
        side = self.img_size // self.patch_size
        return (self.num_frames // self.tubelet_size, side, side)


class PatchEmbed3D(nn.Module):
    """Non-overlapping tubelets (t × p × p) → tokens (B, T'·H'·W', D) in t-major order."""

    def __init__(self, in_chans: int, embed_dim: int, tubelet_size: int, patch_size: int):
        super().__init__()
        self.kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.kernel, stride=self.kernel)

    def grid(self, video: torch.Tensor) -> Grid:
        _, _, t, h, w = video.shape
        kt, kh, kw = self.kernel
        if t % kt or h % kh or w % kw:
            raise ValueError(f"video of {t}×{h}×{w} is not divisible into {kt}×{kh}×{kw} tubelets")
        return (t // kt, h // kh, w // kw)

    def forward(self, video: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """video (B, C, T, H, W) → tokens (B, N, D), or only the visible ones (B, N_visible, D) under ``mask``.

        The convolution is computed as a matrix product over tubelets flattened as (C, t, p, p), the layout of its
        weight: it can then embed only the visible tubelets (at 90% masking, embedding them all would cost as much
        as a fifth of the sparse encoder). Every tubelet goes the same way, so dense and sparse inputs share one
        code path; alone, the product is also faster than the strided Conv3d (forward + weight gradient, ViT-B
        16×224², batch 2, 2-core CPU: 92 vs 144 ms in fp32, 248 vs 316 ms in bf16), which in a whole dense ViT-S
        step is within the noise there."""
        gt, gh, gw = self.grid(video)
        b, c = video.shape[:2]
        kt, kh, kw = self.kernel
        tubelets = video.reshape(b, c, gt, kt, gh, kh, gw, kw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        tubelets = tubelets.reshape(b, gt * gh * gw, -1)
        if mask is not None:
            tubelets = tubelets[~mask].reshape(b, -1, tubelets.shape[-1])
        return F.linear(tubelets, self.proj.weight.flatten(1), self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and BEiT-style q/v biases."""

    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, use_sdpa=True, head_dim=None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        inner = num_heads * head_dim  # = dim unless the heads are narrowed (Sparse Transformer, VIMPAC Large-Half)
        self.scale = head_dim**-0.5
        self.use_sdpa = use_sdpa
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, inner * 3, bias=False)
        # Official VideoMAE keeps separate q/v biases and no k bias; a k bias would cancel in softmax anyway.
        self.q_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(inner)) if qkv_bias else None
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_bias(self) -> Optional[torch.Tensor]:
        if self.q_bias is None:
            return None
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        if self.use_sdpa:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = F.dropout(attn.softmax(dim=-1), p=drop)
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block with optional LayerScale (``gamma_1``/``gamma_2``) and stochastic depth; with
    ``post_norm`` the norms follow the residual sums instead (``norm1(x + attn(x))``, then ``norm2(x + mlp(x))``)."""

    def __init__(
        self,
        dim,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        layer_scale_init=0.0,
        norm_eps=1e-6,
        use_sdpa=True,
        head_dim=None,
        post_norm=False,
    ):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, use_sdpa, head_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        if layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
            self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.drop_path(self._scaled(self.gamma_1, self.attn(x))))
            return self.norm2(x + self.drop_path(self._scaled(self.gamma_2, self.mlp(x))))
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))

    @staticmethod
    def _scaled(gamma: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return x if gamma is None else gamma * x


def make_blocks(dim, depth, num_heads, mlp_ratio, *, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0,
                layer_scale_init=0.0, norm_eps=1e-6, use_sdpa=True, head_dim=None, post_norm=False) -> nn.ModuleList:
    """``depth`` blocks with the stochastic-depth rate ramped linearly from 0 to ``drop_path``."""
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, rate, layer_scale_init, norm_eps, use_sdpa,
              head_dim, post_norm)
        for rate in drop_path_rates(drop_path, depth)
    )


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each of ``depth`` blocks: a linear ramp from 0 to ``drop_path``."""
    return [drop_path * i / (depth - 1) if depth > 1 else drop_path for i in range(depth)]


def enable_checkpointing(blocks: nn.ModuleList, mode: str) -> None:
    """Wrap blocks for fairscale checkpointing; the ``torch`` mode is applied in ``run_blocks`` instead."""
    if mode.startswith("fairscale"):
        from fairscale.nn.checkpoint import checkpoint_wrapper

        for block in blocks:
            # Patches forward in place: parameter names stay those of the plain block.
            checkpoint_wrapper(block, offload_to_cpu=mode == "fairscale_offload")


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpointing: str) -> torch.Tensor:
    recompute = checkpointing == "torch" and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
    return x


class VisionTransformer(nn.Module):
    """Video ViT encoder with an optional classification head.

    ``global_pool``: ``"mean"`` (VideoMAE: mean of patch tokens → ``fc_norm`` → head, final ``norm`` is identity),
    ``"cls"`` (``norm`` → cls token → head), ``"first"`` (``norm`` → the first token → head: official and
    Hugging Face VideoMAE with ``use_mean_pooling=False``; without a cls token it is the first patch token) or
    ``"none"`` (pre-training encoder: ``norm`` on every token, no head).
    """

    def __init__(
        self,
        cfg: ViTConfig,
        num_classes: int = 0,
        global_pool: str = "none",
        head_drop: float = 0.0,
        head_init_scale: float = 1.0,
        init: str = "trunc_normal",
    ):
        super().__init__()
        if global_pool not in ("none", "mean", "cls", "first"):
            raise ValueError(f"global_pool must be 'none', 'mean', 'cls' or 'first', got {global_pool!r}")
        if global_pool == "cls" and not cfg.cls_token:
            raise ValueError("global_pool='cls' needs cls_token=True (VideoMAE has no cls token; use 'mean', or "
                             "'first' for a checkpoint trained with use_mean_pooling=False)")
        self.cfg = cfg
        dim, depth, heads = cfg.dims()
        self.embed_dim, self.depth = dim, depth
        self.global_pool = global_pool
        self.num_prefix_tokens = int(cfg.cls_token)
        self.checkpointing = cfg.checkpointing

        self.patch_embed = PatchEmbed3D(cfg.in_chans, dim, cfg.tubelet_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.cls_token else None
        self.pos_embed = PositionEmbedding(cfg.pos_embed, cfg.grid, dim, cls_token=cfg.cls_token)
        self.blocks = self.build_blocks(cfg)
        # post-norm blocks end on a norm already
        final_norm = global_pool != "mean" and cfg.norm_layout == "pre"
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if final_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if global_pool == "mean" else None
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

        self.init_weights(init, head_init_scale)
        enable_checkpointing(self.blocks, cfg.checkpointing)

    @torch.no_grad()
    def init_weights(self, scheme: str, head_init_scale: float = 1.0) -> None:
        """``trunc_normal`` (std .02, VideoMAE fine-tuning) or ``xavier`` (VideoMAE/MAE pre-training) linears."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if scheme == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            # VideoMAE shrinks the fresh head (init_scale 0.001) so fine-tuning starts near uniform logits.
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def build_blocks(self, cfg: ViTConfig) -> nn.ModuleList:
        """The transformer blocks: full attention over every token (a subclass may offer other layouts)."""
        if cfg.layout != "full":
            raise ValueError(f"layout {cfg.layout!r} is for a transformer over tokenizer codes "
                             "(models.vimpac.TokenViT); a pixel encoder drops hidden tokens, which leaves no grid to "
                             "attend along")
        dim, depth, heads = cfg.dims()
        return make_blocks(
            dim, depth, heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop=cfg.drop, attn_drop=cfg.attn_drop,
            drop_path=cfg.drop_path, layer_scale_init=cfg.layer_scale_init, norm_eps=cfg.norm_eps,
            use_sdpa=cfg.attention == "sdpa", head_dim=cfg.head_dim, post_norm=cfg.norm_layout == "post",
        )

    def rebuilt(self, cfg: ViTConfig, num_classes: int = 0, global_pool: str = "none") -> VisionTransformer:
        """A model of the same kind (pixels in, or codes in) with configuration ``cfg``, freshly initialised."""
        return VisionTransformer(cfg, num_classes, global_pool)

    def embed(self, video: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Patch tokens plus positions, visible ones only when ``mask`` (B, N; True = hidden) is given.

        ``video`` may be of a wider dtype than the weights (float32 clips for bf16 weights, so that a pre-training
        model computes its targets from unrounded pixels): it is cast to the weights' dtype here."""
        video = video.to(self.patch_embed.proj.weight.dtype)
        grid = self.patch_embed.grid(video)
        pos = self.pos_embed(grid).to(video.dtype)
        if mask is None:
            x = self.patch_embed(video) + pos
        else:
            # Every sample hides the same number of tokens, so the gathers are reshapes.
            b, dim = video.shape[0], pos.shape[-1]
            x = self.patch_embed(video, mask) + pos.expand(b, -1, -1)[~mask].reshape(b, -1, dim)
        if self.cls_token is not None:
            cls = self.cls_token if self.pos_embed.cls is None else self.cls_token + self.pos_embed.cls
            x = torch.cat([cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x

    def forward_features(self, video: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """video (B, C, T, H, W), mask (B, N) or None → tokens (B, prefix + N_visible, D) after ``norm``."""
        x = run_blocks(self.blocks, self.embed(video, mask), self.checkpointing)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "mean":
            x = self.fc_norm(tokens[:, self.num_prefix_tokens :].mean(dim=1))
        elif self.global_pool in ("cls", "first"):
            x = tokens[:, 0]
        else:
            return tokens
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, video: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(video, mask))

    # ---- hooks for the optimizer and the FLOP counter -------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and norms (handled by shape)."""
        return {name for name, _ in self.named_parameters() if "pos_embed" in name or name == "cls_token"}

    def layer_id(self, name: str) -> int:
        """VideoMAE's layer-decay groups: embeddings 0, block i → i + 1, norms and head depth + 1."""
        if name.startswith(("patch_embed", "pos_embed", "cls_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def forward_flops(self, grid: Grid, num_visible: Optional[int] = None) -> int:
        """Forward FLOPs (2 per multiply-add) of one clip; only ``num_visible`` tokens are embedded and
        encoded when given."""
        num_tokens = math.prod(grid) if num_visible is None else num_visible
        patch_volume = self.cfg.in_chans * self.cfg.tubelet_size * self.cfg.patch_size**2
        flops = linear_flops(num_tokens, patch_volume, self.embed_dim)
        flops += transformer_flops(num_tokens + self.num_prefix_tokens, self.embed_dim, self.depth,
                                   self.cfg.mlp_ratio, self.cfg.attn_dim())
        if self.global_pool != "none" and isinstance(self.head, nn.Linear):
            flops += linear_flops(1, self.embed_dim, self.head.out_features)
        return flops


@dataclass
class ClassifierConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)  # backbone
    num_classes: int = 400  # classes of the linear head
    # VideoMAE mean pooling + fc_norm, the cls token, or the first token after the final norm (official / HF
    # VideoMAE checkpoints fine-tuned with use_mean_pooling=False: the first patch token)
    global_pool: Literal["mean", "cls", "first"] = "mean"
    head_drop: float = 0.0  # dropout before the head
    head_init_scale: float = 0.001  # the fresh head's weights are scaled by this (VideoMAE init_scale)


def build_classifier(cfg: ClassifierConfig) -> VisionTransformer:
    return VisionTransformer(
        cfg.encoder, cfg.num_classes, cfg.global_pool, cfg.head_drop, cfg.head_init_scale, init="trunc_normal"
    )

"""VIMPAC (Tan et al.): a transformer over the discrete codes of a frozen video tokenizer, pre-trained by predicting
block-masked codes from their context, together with a contrastive loss between two clips of one video.

* ``TokenViT`` is our ``VisionTransformer`` reading codes instead of pixels: code embedding + position table
  (VIMPAC's factorized time + height + width by default) + a [CLS] vector, then a LayerNorm and dropout (VIMPAC eq. 7),
  then the same blocks (pre-norm by default, ``norm_layout=post`` for VIMPAC's post-norm), or with ``layout=t,h|w``
  VIMPAC's ``FactorizedBlock`` layers (attention along time, then along height and width). Its token grid is the
  tokenizer's: one token per frame and ``patch_size``-pixel cell, so ``patch_size`` is the tokenizer's cell and
  ``tubelet_size`` is 1. It takes either codes (B, T, H, W) or a normalized clip, which its frozen tokenizer turns
  into codes first: the fine-tuning and test code paths give it clips, as they give any classifier.
* The ids past the codebook are special: ``[MASK]`` = ``vocab_size`` replaces a hidden code, ``[PAD]`` =
  ``vocab_size + 1`` is reserved for frames past a clip's end (our samplers always fill a clip, looping or repeating a
  short video, so no clip holds it) and is never masked or predicted. [CLS] is a learned vector, not an id.
* ``VIMPAC`` adds BERT's token head (dense → GELU → LayerNorm → the code embedding transposed, own bias; eq. 16-17),
  scored with cross-entropy on the hidden positions only, and the contrastive head on [CLS] ((Linear + BatchNorm +
  ReLU) × (layers − 1), then a bias-free Linear). Its forward returns the mask loss, the mask accuracy and the
  contrastive features; the InfoNCE over the global batch (``engine.tasks.vimpac``) needs other ranks and is the
  engine's.

Single-device code: no distribution, precision or device placement here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.flops import linear_flops, transformer_flops
from models.tokenizer import on_device
from models.vit import Attention, Grid, VisionTransformer, ViTConfig, drop_path_rates


def line_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid, axis: int,
                   dropout: float) -> torch.Tensor:
    """Attention of every code to the codes on its line along ``axis`` (0 time, 1 height, 2 width) and to [CLS],
    which is put at the head of every line; [CLS]'s own output is the mean of its outputs over the lines (VIMPAC eq.
    15). q, k, v (B, heads, 1 + N, head width), [CLS] first, codes t-major → (B, heads, 1 + N, head width)."""
    b, h, _, d = q.shape
    t, hh, w = grid

    def lines(x: torch.Tensor) -> torch.Tensor:  # (B, h, 1+N, d) → (B·lines, h, 1 + length, d)
        grid_x = x[:, :, 1:].reshape(b, h, t, hh, w, d)
        order = [0, 2, 3, 4]  # B and the two other axes lead, the line's axis follows
        order.remove(2 + axis)
        grid_x = grid_x.permute(*order, 1, 2 + axis, 5)  # (B, a, c, h, length, d)
        count = grid_x.shape[1] * grid_x.shape[2]
        grid_x = grid_x.reshape(b * count, h, grid[axis], d)
        cls = x[:, :, :1].repeat_interleave(count, dim=0)
        return torch.cat([cls, grid_x], dim=2)

    out = F.scaled_dot_product_attention(lines(q), lines(k), lines(v), dropout_p=dropout)
    count = out.shape[0] // b
    cls = out[:, :, :1].reshape(b, count, h, 1, d).mean(dim=1)
    others = [n for i, n in enumerate(grid) if i != axis]
    codes = out[:, :, 1:].reshape(b, *others, h, grid[axis], d)  # (B, a, c, h, length, d)
    back = {0: (0, 3, 4, 1, 2, 5), 1: (0, 3, 1, 4, 2, 5), 2: (0, 3, 1, 2, 4, 5)}[axis]
    codes = codes.permute(*back).reshape(b, h, t * hh * w, d)
    return torch.cat([cls, codes], dim=2)


class LineAttention(Attention):
    """``Attention``'s projections (same names and shapes) over lines of the token grid: each group of heads attends
    along one axis (``axes``: (0,) = time; (1, 2) = height and width in parallel, half the heads each: VIMPAC's sparse
    "H|W" block, eq. 11), and the groups' outputs are concatenated before the output projection."""

    def __init__(self, dim, num_heads, axes, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, head_dim=None):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop, True, head_dim)
        self.axes = axes

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        per_axis = self.num_heads // len(self.axes)
        parts = [line_attention(q[:, i * per_axis:(i + 1) * per_axis], k[:, i * per_axis:(i + 1) * per_axis],
                                v[:, i * per_axis:(i + 1) * per_axis], grid, axis, drop)
                 for i, axis in enumerate(self.axes)]
        x = torch.cat(parts, dim=1).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(x))


class FactorizedBlock(nn.Module):
    """VIMPAC's layer (eq. 12-14): attention along time, then along height and width in parallel, then the MLP, each
    with its residual and LayerNorm (after the sum with ``post_norm``, VIMPAC's default; before the branch without)."""

    def __init__(self, dim, num_heads, mlp_ratio, drop, attn_drop, drop_path, norm_eps, head_dim, post_norm):
        super().__init__()
        self.post_norm = post_norm
        self.time = LineAttention(dim, num_heads, (0,), attn_drop=attn_drop, proj_drop=drop, head_dim=head_dim)
        self.norm_time = nn.LayerNorm(dim, eps=norm_eps)
        self.space = LineAttention(dim, num_heads, (1, 2), attn_drop=attn_drop, proj_drop=drop, head_dim=head_dim)
        self.norm_space = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.norm_mlp = nn.LayerNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _residual(self, x, norm, branch):
        if self.post_norm:
            return norm(x + self.drop_path(branch(x)))
        return x + self.drop_path(branch(norm(x)))

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = self._residual(x, self.norm_time, lambda y: self.time(y, grid))
        x = self._residual(x, self.norm_space, lambda y: self.space(y, grid))
        return self._residual(x, self.norm_mlp, self.mlp)


def special_ids(vocab_size: int) -> tuple[int, int]:
    """([MASK], [PAD]) of a tokenizer with ``vocab_size`` codes: the first ids past its codes."""
    return vocab_size, vocab_size + 1


def vimpac_encoder(**overrides) -> ViTConfig:
    """VIMPAC Small over 5 frames of 128 px, 8-pixel codes (Table 3/4): [CLS], factorized positions, dropout 0.1."""
    base = dict(arch="vimpac_small", num_frames=5, img_size=128, patch_size=8, tubelet_size=1, cls_token=True,
                pos_embed="factorized", drop=0.1, attn_drop=0.1)
    return ViTConfig(**{**base, **overrides})


def check_token_encoder(cfg: ViTConfig, tokenizer) -> None:
    """A transformer over ``tokenizer``'s codes needs one token per frame and tokenizer cell."""
    cell = tokenizer.cfg.downsample
    if cfg.tubelet_size != 1 or cfg.patch_size != cell:
        raise ValueError(f"a transformer over tokenizer codes has one token per frame and {cell}-pixel cell of the "
                         f"tokenizer: set encoder.tubelet_size=1 and encoder.patch_size={cell} (got "
                         f"{cfg.tubelet_size} and {cfg.patch_size})")


class TokenViT(VisionTransformer):
    """``VisionTransformer`` over tokenizer codes (see the module docstring). ``tokenizer``: the frozen
    ``models.tokenizer.VQTokenizer``, kept outside the parameters, buffers and state dict (never trained, never cast
    to the engine's precision, never saved with the model); without one the model takes codes only."""

    def __init__(self, cfg: ViTConfig, vocab_size: int, num_classes: int = 0, global_pool: str = "none",
                 head_drop: float = 0.0, head_init_scale: float = 1.0, tokenizer=None):
        if not cfg.cls_token:
            raise ValueError("a transformer over tokenizer codes reads out its [CLS] vector: set "
                             "encoder.cls_token=true")
        if tokenizer is not None:
            check_token_encoder(cfg, tokenizer)
            if tokenizer.cfg.codebook_size != vocab_size:
                raise ValueError(f"the tokenizer has {tokenizer.cfg.codebook_size} codes, the model {vocab_size}")
        super().__init__(cfg, num_classes, global_pool, head_drop, head_init_scale, init="trunc_normal")
        self.vocab_size = vocab_size
        self.mask_id, self.pad_id = special_ids(vocab_size)
        self.patch_embed = None  # codes are embedded by token_embed
        self.token_embed = nn.Embedding(vocab_size + 2, self.embed_dim)
        nn.init.normal_(self.token_embed.weight, std=0.02)  # BERT's initialisation
        self.embed_norm = nn.LayerNorm(self.embed_dim, eps=cfg.norm_eps)
        self.embed_drop = nn.Dropout(cfg.drop)
        self.__dict__["tokenizer"] = tokenizer.eval().requires_grad_(False) if tokenizer is not None else None

    def build_blocks(self, cfg: ViTConfig) -> nn.ModuleList:
        """Full attention (``VisionTransformer``'s blocks), or VIMPAC's ``FactorizedBlock`` layers (``t,h|w``)."""
        if cfg.layout != "t,h|w":
            return super().build_blocks(cfg)
        dim, depth, heads = cfg.dims()
        return nn.ModuleList(
            FactorizedBlock(dim, heads, cfg.mlp_ratio, cfg.drop, cfg.attn_drop, rate, cfg.norm_eps, cfg.head_dim,
                            cfg.norm_layout == "post") for rate in drop_path_rates(cfg.drop_path, depth))

    def rebuilt(self, cfg: ViTConfig, num_classes: int = 0, global_pool: str = "none") -> TokenViT:
        return TokenViT(cfg, self.vocab_size, num_classes, global_pool, tokenizer=self.__dict__["tokenizer"])

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (B, T, H, W) int64: ``x`` itself when it holds codes, else the tokenizer's codes of the normalized
        clip ``x`` (B, C, T, H·cell, W·cell), computed in float32 without gradients."""
        if not x.is_floating_point():
            return x.long()
        tokenizer = self.__dict__["tokenizer"]
        if tokenizer is None:
            raise ValueError("this TokenViT has no tokenizer: give it codes, not a clip")
        return on_device(tokenizer, x.device).tokenize(x.float())

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[CLS] + code embeddings + positions, through the embedding LayerNorm and dropout: (B, 1 + N, D). ``mask``
        (B, N), True = hidden: those codes become [MASK] (every position stays in the sequence, unlike the pixel
        encoder's dropped tokens)."""
        codes = self.codes(x)
        grid = tuple(codes.shape[1:])
        ids = codes.flatten(1)
        if mask is not None:
            ids = ids.masked_fill(mask & (ids != self.pad_id), self.mask_id)
        weight = self.token_embed.weight
        tokens = F.embedding(ids, weight) + self.pos_embed(grid).to(weight.dtype)
        cls = self.cls_token if self.pos_embed.cls is None else self.cls_token + self.pos_embed.cls
        tokens = torch.cat([cls.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        return self.embed_drop(self.embed_norm(tokens))

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.cfg.layout == "full":
            return super().forward_features(x, mask)
        codes = self.codes(x)
        tokens, grid = self.embed(codes, mask), tuple(codes.shape[1:])
        recompute = self.checkpointing == "torch" and torch.is_grad_enabled()
        for block in self.blocks:
            tokens = checkpoint(block, tokens, grid, use_reentrant=False) if recompute else block(tokens, grid)
        return self.norm(tokens)

    def layer_id(self, name: str) -> int:
        if name.startswith(("token_embed", "embed_norm")):
            return 0
        return super().layer_id(name)

    def forward_flops(self, grid: Grid, num_visible: Optional[int] = None) -> int:
        """Forward FLOPs of one clip's codes through the transformer and head; the frozen tokenizer is not counted.
        Every position is encoded: a hidden code is replaced, not dropped."""
        n, dim, attn = math.prod(grid) + 1, self.embed_dim, self.cfg.attn_dim()
        if self.cfg.layout == "full":
            flops = transformer_flops(n, dim, self.depth, self.cfg.mlp_ratio, attn)
        else:  # two attention blocks a layer; each code attends to its line and [CLS] (half the heads per space axis)
            t, h, w = grid
            line = (t + 1) + ((h + 1) + (w + 1)) / 2
            per_layer = 2 * n * dim * (8 * attn + 2 * self.cfg.mlp_ratio * dim) + 4 * n * line * attn
            flops = int(self.depth * per_layer)
        if isinstance(self.head, nn.Linear):
            flops += linear_flops(1, self.embed_dim, self.head.out_features)
        return flops


def build_token_classifier(cfg, tokenizer) -> TokenViT:
    """A classifier over ``tokenizer``'s codes from a ``models.vit.ClassifierConfig`` (VIMPAC fine-tuning: [CLS]
    pooling, a zero-initialised head: ``global_pool=cls``, ``head_init_scale=0``)."""
    return TokenViT(cfg.encoder, tokenizer.cfg.codebook_size, cfg.num_classes, cfg.global_pool, cfg.head_drop,
                    cfg.head_init_scale, tokenizer=tokenizer)


class TokenHead(nn.Module):
    """BERT's masked-token head (VIMPAC eq. 16-17): dense → GELU → LayerNorm, then logits over the codes through the
    code embedding's rows (tied weights) plus a bias of its own. Special ids get no logit: they are never targets."""

    def __init__(self, dim: int, vocab_size: int, norm_eps: float):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        u = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(u, embedding[: self.bias.shape[0]], self.bias)


@dataclass
class ContrastiveHeadConfig:
    layers: int = 3  # linear layers (VIMPAC Large: 3; its Small script: 2)
    hidden: int = 4096  # width of the hidden layers (VIMPAC Large: 4096; its Small script: 2048)
    out_dim: int = 256  # width of the features compared by the contrastive loss

    def __post_init__(self) -> None:
        if self.layers < 1 or self.hidden < 1 or self.out_dim < 1:
            raise ValueError(f"layers, hidden and out_dim must be >= 1, got {self.layers}, {self.hidden}, "
                             f"{self.out_dim}")


class ContrastiveHead(nn.Sequential):
    """VIMPAC's [CLS] head (after MoCo v3): (Linear + BatchNorm + ReLU) × (layers − 1), then a bias-free Linear. The
    engine replaces its BatchNorms by ones whose statistics span every rank (``engine.tasks.vimpac``)."""

    def __init__(self, dim: int, cfg: ContrastiveHeadConfig):
        layers: list[nn.Module] = []
        width = dim
        for _ in range(cfg.layers - 1):
            # no bias: the BatchNorm right after it would cancel it
            layers += [nn.Linear(width, cfg.hidden, bias=False), nn.BatchNorm1d(cfg.hidden), nn.ReLU(inplace=True)]
            width = cfg.hidden
        layers.append(nn.Linear(width, cfg.out_dim, bias=False))
        super().__init__(*layers)


@dataclass
class VimpacModelConfig:
    encoder: ViTConfig = field(default_factory=vimpac_encoder)  # the transformer over codes that is transferred
    # the frozen tokenizer's weights.pt (run_scripts/tokenizer.py; its architecture comes from the config.yaml beside
    # it). It must have been trained on clips normalized as this run's data section does.
    tokenizer: str = ""
    contrastive_head: ContrastiveHeadConfig = field(default_factory=ContrastiveHeadConfig)  # on [CLS]
    # weights to continue from: a VIMPAC pre-training export (VIMPAC's 256-px continuation of its 128-px model); the
    # position tables are resampled to this grid. "" = from scratch
    init: str = ""


class VIMPAC(nn.Module):
    """The pre-training model: ``encoder`` (a ``TokenViT`` without classification head), ``token_head`` and, when the
    contrastive loss is used, ``contrastive_head``."""

    def __init__(self, cfg: VimpacModelConfig, tokenizer, contrastive: bool = True):
        super().__init__()
        self.cfg = cfg
        vocab = tokenizer.cfg.codebook_size
        self.encoder = TokenViT(cfg.encoder, vocab, num_classes=0, global_pool="none", tokenizer=tokenizer)
        self.token_head = TokenHead(self.encoder.embed_dim, vocab, cfg.encoder.norm_eps)
        self.contrastive_head = ContrastiveHead(self.encoder.embed_dim, cfg.contrastive_head) if contrastive else None
        for module in [*self.token_head.modules(), *(self.contrastive_head or [])]:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        """``x``: a normalized clip (B, C, T, H, W) or its codes (B, T, H', W'); ``mask`` (B, N), True = hidden.

        Returns ``(loss, accuracy, features)``: the cross-entropy of the hidden codes' predictions (float32, the
        mean over every hidden position of the batch), the share of them predicted right (detached), and the
        contrastive head's output on [CLS] (B, out_dim), or None without the head."""
        codes = self.encoder.codes(x)
        hidden = self.encoder.forward_features(codes, mask)
        scored = mask & (codes.flatten(1) != self.encoder.pad_id)
        logits = self.token_head(hidden[:, 1:][scored], self.encoder.token_embed.weight).float()
        target = codes.flatten(1)[scored]
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.argmax(dim=-1) == target).float().mean().detach()
        features = self.contrastive_head(hidden[:, 0]) if self.contrastive_head is not None else None
        return loss, accuracy, features

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def load_pretraining(self, weights: dict[str, torch.Tensor]) -> list[str]:
        """Load a VIMPAC pre-training state dict strictly, its factorized position tables resampled linearly to this
        model's grid (VIMPAC's 128 → 256 px continuation); a contrastive head this model does not have is left out.
        Returns the resampled keys."""
        from models.pos_embed import resample_temporal

        own = self.state_dict()
        weights = {k: v for k, v in weights.items() if k in own or not k.startswith("contrastive_head.")}
        resampled = []
        for key in ("encoder.pos_embed.temporal", "encoder.pos_embed.height", "encoder.pos_embed.width"):
            if key in weights and key in own and weights[key].shape != own[key].shape:
                weights[key] = resample_temporal(weights[key], own[key].shape[1])
                resampled.append(key)
        self.load_state_dict(weights)
        return resampled

    def forward_flops(self, grid: Grid, num_masked: float) -> int:
        """Forward FLOPs of one clip: the encoder on every position, the token head on ``num_masked`` of them (the
        mean count: block masks vary), the contrastive head on [CLS]."""
        dim = self.encoder.embed_dim
        flops = self.encoder.forward_flops(grid)
        flops += int(num_masked * (linear_flops(1, dim, dim) + linear_flops(1, dim, self.encoder.vocab_size)))
        for module in self.contrastive_head or []:
            if isinstance(module, nn.Linear):
                flops += linear_flops(1, module.in_features, module.out_features)
        return flops

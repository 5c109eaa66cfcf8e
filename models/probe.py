"""Read-outs of a frozen video ViT: the pooled features a linear probe or k-NN reads, a grid of linear heads
trained together, and V-JEPA's attentive probe.

* ``FeatureEncoder``: the encoder without head, its final ``norm`` on every token (``models.convert.
  load_into_encoder`` fills it from any checkpoint the project reads). ``pooled`` gives, per clip, the features
  named in ``POOLS``; ``tokens`` gives every last-layer token after the final norm (the attentive probe's input).
* ``LinearHeadGrid``: many linear classifiers over standardized pooled features, each with its own learning rate
  and weight decay (set by the optimizer's groups, one per head). The heads that read the same pooled feature are
  one matrix product, and every pooled feature goes through one batched product: training 32 heads costs about
  what one costs when the step is not bound by the product itself.
* ``AttentiveProbeGrid``: V-JEPA's attentive classifier (a learned query cross-attending to every token, an MLP,
  a linear layer), several of them over the same tokens.

Single-device code: no distribution, precision or device placement here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from models.convert import EncoderLoadReport, load_into_encoder
from models.flops import linear_flops
from models.vit import VisionTransformer, ViTConfig

# The pooled features of a clip, each (D,):
#   mean         mean of the last block's tokens, before the final norm
#   norm_mean    mean of the last block's tokens after the final norm (a mean-pooling fine-tuned checkpoint has no
#                such norm: its fc_norm applied to the mean instead, the feature its classifier was trained on)
#   last_k_mean  mean over the last k blocks of each block's token mean, before any norm
#   cls          the [CLS] token after the final norm (encoders with a cls token: MAE-ST's option, VIMPAC)
POOLS = ("mean", "norm_mean", "last_k_mean", "cls")
# what every encoder has (cls needs a cls token)
DEFAULT_POOLS = ("mean", "norm_mean", "last_k_mean")

# BatchNorm's epsilon in MAE's linear probe, used by the standardization that replaces it
STANDARDIZE_EPS = 1e-6


class FeatureEncoder(nn.Module):
    """A frozen video ViT as a feature extractor (built without drop path; call ``eval()`` and run it without
    gradients)."""

    def __init__(self, cfg: ViTConfig, last_k: int = 4, tokenizer=None):
        """``tokenizer``: the frozen tokenizer of an encoder over its codes (VIMPAC), None for one over pixels."""
        super().__init__()
        cfg = replace(cfg, drop_path=0.0)
        if tokenizer is None:
            self.encoder = VisionTransformer(cfg, num_classes=0, global_pool="none")
        else:
            from models.vimpac import TokenViT

            self.encoder = TokenViT(cfg, tokenizer.cfg.codebook_size, num_classes=0, tokenizer=tokenizer)
        if not 1 <= last_k <= self.encoder.depth:
            raise ValueError(f"last_k must lie in [1, depth={self.encoder.depth}], got {last_k}")
        self.last_k = last_k
        self.fc_norm: Optional[nn.LayerNorm] = None  # a mean-pooling fine-tuned checkpoint's norm of the mean
        self.dim = self.encoder.embed_dim

    def load(self, checkpoint: Mapping) -> EncoderLoadReport:
        """The encoder's weights from a checkpoint (see ``load_into_encoder``); keeps a fine-tuned checkpoint's
        ``fc_norm`` for the ``norm_mean`` feature."""
        report = load_into_encoder(self.encoder, checkpoint)
        self.fc_norm = None
        if report.fc_norm is not None:
            self.fc_norm = nn.LayerNorm(self.dim, eps=self.encoder.cfg.norm_eps)
            self.fc_norm.load_state_dict(report.fc_norm)
            self.fc_norm.to(self.encoder.norm.weight.device, self.encoder.norm.weight.dtype)
        return report

    def _block_outputs(self, video: torch.Tensor, keep: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(last block's tokens, token means of the last ``keep`` blocks, float32), before the final norm."""
        encoder = self.encoder
        x = encoder.embed(video)
        prefix = encoder.num_prefix_tokens
        means = []
        for i, block in enumerate(encoder.blocks):
            x = block(x)
            if i >= encoder.depth - keep:
                means.append(x[:, prefix:].float().mean(dim=1))
        return x, means

    def pooled(self, video: torch.Tensor, pools: Sequence[str] = DEFAULT_POOLS) -> torch.Tensor:
        """video (B, C, T, H, W) → features (B, len(pools), D), float32, in the order of ``pools``."""
        unknown = [p for p in pools if p not in POOLS]
        if unknown:
            raise ValueError(f"unknown pooled features {unknown}; valid: {', '.join(POOLS)}")
        if "cls" in pools and not self.encoder.num_prefix_tokens:
            raise ValueError("the cls feature needs an encoder with a cls token (encoder.cls_token=true)")
        tokens, means = self._block_outputs(video, self.last_k if "last_k_mean" in pools else 1)
        out = []
        for pool in pools:
            if pool == "mean":
                out.append(means[-1])
            elif pool == "last_k_mean":
                out.append(torch.stack(means).mean(dim=0))
            elif pool == "cls":
                out.append(self.encoder.norm(tokens[:, 0]).float())
            elif self.fc_norm is not None:
                out.append(self.fc_norm(means[-1].to(tokens.dtype)).float())
            else:
                out.append(self.encoder.norm(tokens)[:, self.encoder.num_prefix_tokens:].float().mean(dim=1))
        return torch.stack(out, dim=1)

    def tokens(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, T, H, W) → every token of the last block after the final norm (B, prefix + N, D)."""
        return self.encoder.forward_features(video)

    def forward_flops(self, grid) -> int:
        return self.encoder.forward_flops(grid)


# ---- the linear probe ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSpec:
    """One linear head of a grid: which pooled feature it reads, its base lr and its weight decay."""

    pool: str
    lr: float
    weight_decay: float

    @property
    def name(self) -> str:
        return f"{self.pool} lr={self.lr:g} wd={self.weight_decay:g}"


def head_grid(pools: Sequence[str], lrs: Sequence[float], weight_decays: Sequence[float]) -> list[HeadSpec]:
    """Every combination, pool-major (the order ``LinearHeadGrid`` computes them in)."""
    return [HeadSpec(p, float(lr), float(wd)) for p in pools for lr in lrs for wd in weight_decays]


class LinearHeadGrid(nn.Module):
    """Linear classifiers over standardized pooled features, all trained in one pass.

    ``pools``: the features of the input (B, len(pools), D), in order; ``heads``: pool-major, the same number of
    heads on every pool they use (``head_grid``). Each feature is standardized with fixed statistics of the
    training features (``set_standardization``): what MAE's affine-free BatchNorm in front of its linear probe
    converges to, but the same on every rank and batch size, so a run on two ranks gives what one rank gives.
    Every head starts from the same weights (truncated normal, std 0.01, as MAE's probe; zero bias), so a head
    trained in the grid is the same head trained alone.
    """

    def __init__(self, dim: int, num_classes: int, pools: Sequence[str], heads: Sequence[HeadSpec],
                 seed: int = 0):
        super().__init__()
        self.pools, self.specs = list(pools), list(heads)
        missing = sorted({h.pool for h in heads} - set(pools))
        if missing:
            raise ValueError(f"heads read pooled features {missing} that are not among {self.pools}")
        used = list(dict.fromkeys(h.pool for h in heads))
        per_pool = [sum(h.pool == p for h in heads) for p in used]
        expected = [h.pool for h in heads]
        if len(set(per_pool)) != 1 or expected != [p for p in used for _ in range(per_pool[0])]:
            raise ValueError("heads must come pool by pool, the same number on each pool (see head_grid)")
        self.used = [self.pools.index(p) for p in used]
        self.per_pool = per_pool[0]
        self.num_classes = num_classes
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in heads)
        generator = torch.Generator().manual_seed(seed)
        weight = nn.init.trunc_normal_(torch.empty(num_classes, dim), std=0.01, generator=generator)
        with torch.no_grad():
            for head in self.heads:
                head.weight.copy_(weight)
                head.bias.zero_()
        self.register_buffer("feature_mean", torch.zeros(len(pools), dim))
        self.register_buffer("feature_std", torch.ones(len(pools), dim))

    def set_standardization(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Per-feature mean and variance (len(pools), D) of the training features."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_((var + STANDARDIZE_EPS).sqrt())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, len(pools), D) → logits (B, len(heads), num_classes)."""
        used = self.used
        x = (features[:, used] - self.feature_mean[used]) / self.feature_std[used]  # (B, P, D)
        k, c = self.per_pool, self.num_classes
        weights = torch.stack([torch.cat([h.weight for h in self.heads[i * k:(i + 1) * k]]).t()
                               for i in range(len(used))])  # (P, D, K*C)
        bias = torch.stack([torch.cat([h.bias for h in self.heads[i * k:(i + 1) * k]])
                            for i in range(len(used))])  # (P, K*C)
        logits = torch.baddbmm(bias[:, None], x.transpose(0, 1), weights)  # (P, B, K*C)
        return logits.transpose(0, 1).reshape(features.shape[0], len(self.specs), c)

    def head_state(self, index: int) -> dict[str, torch.Tensor]:
        """One head as a standalone classifier of its pooled feature: (x - feature_mean) / feature_std → linear."""
        pool = self.pools.index(self.specs[index].pool)
        return {"weight": self.heads[index].weight, "bias": self.heads[index].bias,
                "feature_mean": self.feature_mean[pool], "feature_std": self.feature_std[pool]}


def per_head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over heads of each head's mean cross-entropy: logits (B, H, C), labels (B,). Each head's gradient is the
    gradient of its own loss, as if it were trained alone."""
    b, h, _ = logits.shape
    losses = F.cross_entropy(logits.float().transpose(1, 2), labels[:, None].expand(b, h), reduction="none")
    return losses.mean(dim=0).sum()


# ---- the attentive probe ---------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Multi-head attention of a few queries over many tokens."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, m, d = queries.shape
        heads, width = self.num_heads, d // self.num_heads
        q = self.q(queries).reshape(b, m, heads, width).transpose(1, 2)
        k, v = self.kv(tokens).reshape(b, tokens.shape[1], 2, heads, width).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, m, d))


class AttentiveClassifier(nn.Module):
    """V-JEPA's attentive probe: one learned query attends to the normalized tokens (a residual cross-attention),
    then a residual MLP, then a linear classifier of the query."""

    def __init__(self, dim: int, num_heads: int, num_classes: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.head = nn.Linear(dim, num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.query, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        q = q + self.attn(q, self.norm1(tokens))
        q = q + self.mlp(self.norm2(q))
        return self.head(q[:, 0])

    def forward_flops(self, num_tokens: int) -> int:
        dim = self.query.shape[-1]
        flops = linear_flops(num_tokens, dim, 2 * dim) + 2 * linear_flops(1, dim, dim)
        flops += 2 * 2 * num_tokens * dim  # scores and weighted sum of one query
        flops += linear_flops(1, dim, self.mlp.fc1.out_features) * 2 + linear_flops(1, dim, self.head.out_features)
        return flops


class AttentiveProbeGrid(nn.Module):
    """A frozen ``FeatureEncoder`` read by several attentive probes (one per learning rate of a grid) in one
    pass: the encoder runs once per clip, without gradients (no activation memory is kept for it), and every
    probe sees the same tokens. ``forward`` → logits (B, len(probes), num_classes)."""

    def __init__(self, encoder: FeatureEncoder, num_probes: int, num_classes: int, num_heads: Optional[int] = None):
        super().__init__()
        self.backbone = encoder.requires_grad_(False)
        first = AttentiveClassifier(encoder.dim, num_heads or encoder.encoder.cfg.dims()[2], num_classes)
        # every probe starts from the same weights: one trained in the grid is the probe trained alone
        self.probes = nn.ModuleList(first if i == 0 else copy.deepcopy(first) for i in range(num_probes))

    def train(self, mode: bool = True) -> "AttentiveProbeGrid":
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, whatever the probes do
        return self

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.backbone.tokens(video)
        return torch.stack([probe(tokens) for probe in self.probes], dim=1)

    def probe_flops(self, grid) -> int:
        """Forward FLOPs of the probes (not the frozen encoder) on one clip of ``grid`` tokens."""
        return sum(p.forward_flops(math.prod(grid)) for p in self.probes)

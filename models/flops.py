"""Analytic FLOP counts (2 FLOPs per multiply-add), the basis of MFU logging.

Per pre-norm block of width D over N tokens with MLP ratio r: the qkv, output and MLP projections cost
2·N·D²·(4 + 2r) FLOPs and the two attention matmuls (QKᵀ and A·V) 4·N²·D; with r = 4 that is the familiar
24·N·D² + 4·N²·D. Attention narrower than the width (heads × head width A < D) costs 8·N·D·A + 4·N²·A instead of
8·N·D² + 4·N²·D. Softmax, LayerNorm, GELU and biases are ignored, as in the papers (their "GFLOPs" are
multiply-adds, i.e. half of these numbers).
"""

from __future__ import annotations


def block_flops(num_tokens: int, dim: int, mlp_ratio: float = 4.0, attn_dim: int | None = None) -> int:
    attn_dim = attn_dim or dim
    linear = 2 * num_tokens * dim * (4 * attn_dim + 2 * mlp_ratio * dim)
    attention = 4 * num_tokens * num_tokens * attn_dim
    return int(linear + attention)


def transformer_flops(num_tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0,
                      attn_dim: int | None = None) -> int:
    return depth * block_flops(num_tokens, dim, mlp_ratio, attn_dim)


def linear_flops(num_tokens: int, in_features: int, out_features: int) -> int:
    return 2 * num_tokens * in_features * out_features

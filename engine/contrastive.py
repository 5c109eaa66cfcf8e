"""VIMPAC's contrastive loss over the global batch: InfoNCE between two clips of each video (paper eq. 4-5).

For clip features ``a`` (the first clip of each of this rank's videos) and ``b`` (the second), L2-normalized, every
clip is an anchor; its positive is the other clip of its video, its negatives every other clip of the *global* batch
(both clips of the other videos, gathered from every rank). Eq. 4 for anchor a_i, with temperature γ:

    L(i) = -log exp(a_i·b_i/γ) / (Σ_{k≠i} exp(a_i·a_k/γ) + Σ_k exp(a_i·b_k/γ))

and the symmetric L'(i) for b_i; eq. 5: L_cl = mean_i L(i) + mean_i L'(i). Each rank scores its own anchors against
the gathered candidates, and the gather passes gradients back to the rank that owns each feature: with the
gradients averaged over ranks (DeepSpeed's data parallelism), two ranks of B videos give the loss and the gradients
of one rank of 2B.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.evaluate import group_active


class _GatherWithGradient(torch.autograd.Function):
    """``all_gather`` of equal-sized tensors whose backward sums every rank's gradient for this rank's part (an
    all-reduce then a slice: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather_with_gradient(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shape everywhere) concatenated in rank order, gradients flowing back to the owners;
    ``x`` itself without a process group of more than one rank."""
    return _GatherWithGradient.apply(x) if group_active() else x


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 5's L_cl for this rank's anchors: ``a``, ``b`` (n, D) the features of the two clips of this rank's n
    videos (normalized here); the candidates are the global batch. Returns mean_i L(i) + mean_i L'(i) over this
    rank's videos."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    all_a, all_b = gather_with_gradient(a), gather_with_gradient(b)
    n = a.shape[0]
    offset = dist.get_rank() * n if group_active() else 0
    own = torch.arange(n, device=a.device) + offset  # this rank's videos in the global batch

    def one_side(anchor: torch.Tensor, same: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        positives_and_others = anchor @ other.T / temperature  # the positive sits at column own[i]
        same_view = anchor @ same.T / temperature
        same_view[torch.arange(n, device=a.device), own] = float("-inf")  # an anchor is not its own negative
        return F.cross_entropy(torch.cat([positives_and_others, same_view], dim=1), own)

    return one_side(a, all_a, all_b) + one_side(b, all_b, all_a)

"""VIMPAC's contrastive loss over the global batch: InfoNCE between two clips of each video (paper eq. 4-5).

For clip features ``a`` (the first clip of each of this rank's videos) and ``b`` (the second), L2-normalized, every
clip is an anchor; its positive is the other clip of its video, its negatives every other clip of the *global* batch
(both clips of the other videos, gathered from every rank). Eq. 4 for anchor a_i, with temperature γ:

    L(i) = -log exp(a_i·b_i/γ) / (Σ_{k≠i} exp(a_i·a_k/γ) + Σ_k exp(a_i·b_k/γ))

and the symmetric L'(i) for b_i; eq. 5: L_cl = mean_i L(i) + mean_i L'(i). Each rank scores its own anchors against
the gathered candidates, and the gather passes gradients back to the rank that owns each feature: with the
gradients averaged over ranks (DeepSpeed's data parallelism), two ranks of B videos give the loss and the gradients
of one rank of 2B. (A rank whose micro-batch lost videos it could not read contributes fewer clips; the gather takes
any sizes.)

The contrastive head's BatchNorms take their statistics over the same global batch (``GlobalBatchNorm1d``; torch's
SyncBatchNorm refuses CPU tensors), so that the features, and the loss, do not depend on how the batch is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.dist import gather_with_gradient, group_active, sum_over_ranks


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 5's L_cl for this rank's anchors: ``a``, ``b`` (n, D) the features of the two clips of this rank's n
    videos (normalized here); the candidates are the global batch. Returns mean_i L(i) + mean_i L'(i) over this
    rank's videos."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    both, offset = gather_with_gradient(torch.stack([a, b], dim=1))  # one gather (and size exchange) for both clips
    all_a, all_b = both[:, 0], both[:, 1]
    n = a.shape[0]
    own = torch.arange(n, device=a.device) + offset  # this rank's videos in the global batch

    def one_side(anchor: torch.Tensor, same: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        positives_and_others = anchor @ other.T / temperature  # the positive sits at column own[i]
        same_view = anchor @ same.T / temperature
        same_view[torch.arange(n, device=a.device), own] = float("-inf")  # an anchor is not its own negative
        return F.cross_entropy(torch.cat([positives_and_others, same_view], dim=1), own)

    return one_side(a, all_a, all_b) + one_side(b, all_b, all_a)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics are those of the batch of every rank together (what
    ``nn.SyncBatchNorm`` does on GPUs, on any device and process group), gradients included; on one rank it is
    ``nn.BatchNorm1d``. Mean and variance are taken in two passes, in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and group_active()):
            return super().forward(x)
        values = x.float()
        # the sum and the count in one all-reduce
        totals = sum_over_ranks(torch.cat([values.sum(dim=0), values.new_full((1,), values.shape[0])]))
        count = totals[-1:]
        mean = totals[:-1] / count
        var = sum_over_ranks(((values - mean) ** 2).sum(dim=0)) / count  # biased: what normalizes
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        out = (values - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.float() + self.bias.float()
        return out.to(x.dtype)


def global_batch_norms(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d`` replaced, in place, by a ``GlobalBatchNorm1d`` holding the same
    parameters and statistics (names unchanged: checkpoints and exports are those of the plain model)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats, device=child.weight.device if child.affine
                                            else None)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            global_batch_norms(child)
    return module

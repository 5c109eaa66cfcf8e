"""Mixup / CutMix / label smoothing for video clips, delegated to ``timm.data.Mixup``.

Clips are ``(B, C, T, H, W)`` float tensors. timm's ``Mixup`` is written for ``(B, C, H, W)``
images: its cutmix box is drawn from ``shape[-2:]`` and pasted with ``x[:, :, yl:yh, xl:xh]``
('batch' mode) or ``x[i][:, yl:yh, xl:xh]`` ('elem'/'pair'), i.e. it only ever slices the last
two dims, and its mixup is a plain blend ``lam * x + (1 - lam) * x.flip(0)``. So we hand timm
the clip viewed as ``(B, C*T, H, W)``: every (channel, frame) plane gets the *same* box, and
mixup/cutmix/label-smoothing semantics are exactly timm's (lambda sampling, switch_prob,
``correct_lam`` box-area correction, ``mixup_target``). Nothing of timm is reimplemented.

Default mode is timm's ``'batch'``: one lambda and one box per call, sample ``i`` mixed with
sample ``B-1-i`` (``flip(0)``). timm asserts an even batch in every mode; we raise a clear
``ValueError`` instead. The batch here is what the model sees per micro-step
(``batch.micro_batch x batch.repeats`` clips). Note that with repeated augmentation a clip may
be paired with another view of the same video (e.g. ``micro_batch=1, repeats=2``), which makes
the mix a no-op on labels; that is a recipe choice, not checked here.

Like timm, the mix is done in place: the input tensor may be overwritten (it is, when it is
contiguous); use the returned tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

MixupFn = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class MixupConfig:
    mixup_alpha: float = 0.8  # Beta(a, a) for mixup lambda; 0 disables mixup
    cutmix_alpha: float = 1.0  # Beta(a, a) for cutmix lambda; 0 disables cutmix
    prob: float = 1.0  # probability of mixing a batch at all (else lam=1, targets only smoothed)
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are enabled
    mode: str = "batch"  # timm mode: 'batch' (one lam/box per batch), 'pair' or 'elem'
    label_smoothing: float = 0.1  # off classes get label_smoothing / num_classes

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha/cutmix_alpha must be >= 0, got {self.mixup_alpha}/{self.cutmix_alpha}")
        if not 0.0 <= self.prob <= 1.0 or not 0.0 <= self.switch_prob <= 1.0:
            raise ValueError(f"prob/switch_prob must be in [0, 1], got {self.prob}/{self.switch_prob}")
        if self.mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mode must be 'batch', 'pair' or 'elem', got {self.mode!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def enabled(self) -> bool:
        """Whether clips are mixed at all (mixup_alpha > 0 or cutmix_alpha > 0)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def build_mixup(cfg: MixupConfig, num_classes: int) -> Optional[MixupFn]:
    """``(video (B,C,T,H,W), labels (B,) int) -> (mixed video (B,C,T,H,W), soft targets (B,num_classes))``.

    Returns None when ``cfg.enabled`` is False (train with hard labels and
    ``classification_loss(..., label_smoothing)`` then).
    """
    if not cfg.enabled:
        return None
    mixer = Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.prob,
        switch_prob=cfg.switch_prob,
        mode=cfg.mode,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )

    def mix(video: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if video.ndim != 5:
            raise ValueError(f"expected a clip batch (B, C, T, H, W), got shape {tuple(video.shape)}")
        b, c, t, h, w = video.shape
        if b % 2 != 0:
            raise ValueError(
                f"mixup/cutmix needs an even number of clips per micro-step, got {b}; "
                "choose batch.micro_batch (x batch.repeats) even or disable mixup/cutmix"
            )
        if labels.shape != (b,):
            raise ValueError(f"labels must be (B,) class ids with B={b}, got shape {tuple(labels.shape)}")
        planes = video.reshape(b, c * t, h, w)  # a view when contiguous: timm mixes it in place
        planes, targets = mixer(planes, labels)
        return planes.view(b, c, t, h, w), targets

    mix.mixer = mixer  # the underlying timm object (for inspection / tests)
    return mix


_soft_ce = SoftTargetCrossEntropy()


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))`` (timm's SoftTargetCrossEntropy)."""
    return _soft_ce(logits, targets)


def classification_loss(logits: torch.Tensor, labels_or_soft_targets: torch.Tensor,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Soft targets (B, K) float -> SoftTargetCrossEntropy (smoothing is already in them);
    hard labels (B,) int -> ``F.cross_entropy(label_smoothing=label_smoothing)``."""
    y = labels_or_soft_targets
    if y.ndim == logits.ndim and y.is_floating_point():
        return soft_target_cross_entropy(logits, y)
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)

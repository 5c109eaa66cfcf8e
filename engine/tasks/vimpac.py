"""VIMPAC pre-training: mask-then-predict on the codes of a frozen tokenizer, plus InfoNCE between two clips of each
video, as a task of the shared training loop.

Each training item is one video decoded once and cut into two clips with independent starts (``batch.repeats=2``;
``data.repeat_max_distance`` bounds their distance), resized and centre-cropped without any other spatial
augmentation. Both clips are tokenized on the device by the frozen tokenizer, block-masked (VIMPAC's union of
``mask.block_count`` boxes), and scored by the token head on their hidden positions; the [CLS] features of the two
clips are the positive pair of the contrastive loss, every other clip of the global batch a negative. The loss is
VIMPAC's eq. 6: ``L_mask + α·γ·L_cl``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from datasets.transforms import AugmentConfig
from datasets.video_dataset import DataConfig, model_input
from engine import checkpoint, ds
from engine.config import BatchConfig, ConfigError
from engine.data import train_clips
from engine.dist import gather_with_gradient, group_active, sum_over_ranks
from engine.eval.knn import KNNMonitor, KNNMonitorConfig, monitor_after_epoch
from engine.frozen import load_trained_tokenizer
from engine.loop import RunConfig
from engine.optim import OptimConfig
from engine.task import Task
from models.convert import unwrap_state_dict
from models.masking import MaskConfig, block_union_mask, build_mask_generator
from models.vimpac import VIMPAC, VimpacModelConfig

log = logging.getLogger("vimpac")


# ---- the contrastive loss over the global batch ---------------------------------------------------------------
# InfoNCE between two clips of each video (paper eq. 4-5).
#
# For clip features ``a`` (the first clip of each of this rank's videos) and ``b`` (the second), L2-normalized, every
# clip is an anchor; its positive is the other clip of its video, its negatives every other clip of the *global* batch
# (both clips of the other videos, gathered from every rank). Eq. 4 for anchor a_i, with temperature γ:
#
#     L(i) = -log exp(a_i·b_i/γ) / (Σ_{k≠i} exp(a_i·a_k/γ) + Σ_k exp(a_i·b_k/γ))
#
# and the symmetric L'(i) for b_i; eq. 5: L_cl = mean_i L(i) + mean_i L'(i). Each rank scores its own anchors against
# the gathered candidates, and the gather passes gradients back to the rank that owns each feature: with the
# gradients averaged over ranks (DeepSpeed's data parallelism), two ranks of B videos give the loss and the gradients
# of one rank of 2B. (A rank whose micro-batch lost videos it could not read contributes fewer clips; the gather takes
# any sizes.)
#
# The contrastive head's BatchNorms take their statistics over the same global batch (``GlobalBatchNorm1d``; torch's
# SyncBatchNorm refuses CPU tensors), so that the features, and the loss, do not depend on how the batch is split.


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


@dataclass
class ContrastiveConfig:
    # α of eq. 6, the weight of the contrastive loss; 0 = mask-then-predict only (no contrastive head is built)
    weight: float = 1.0
    # γ of eq. 4-6, the temperature (VIMPAC: 0.2); the loss is multiplied by it too, which VIMPAC found steadier
    temperature: float = 0.2

    def __post_init__(self) -> None:
        if self.weight < 0 or self.temperature <= 0:
            raise ValueError(f"weight must be >= 0 and temperature > 0, got {self.weight}, {self.temperature}")


def _vimpac_data() -> DataConfig:
    # VIMPAC pre-training: the short side resized to the input size and the centre crop, nothing else
    return DataConfig(train_augment=AugmentConfig(kind="center", flip=False))


def _vimpac_optim() -> OptimConfig:
    # VIMPAC Table 4 (analysis column): AdamW (0.9, 0.98), wd 0.05, lr 1e-3 at 1024 videos (= blr 2.5e-4 per 256),
    # linear warmup over a tenth of the run and linear decay, gradients clipped at 1
    return OptimConfig(blr=2.5e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.05, epochs=10, warmup_epochs=1,
                       warmup_lr=0.0, min_lr=0.0, lr_decay="linear", clip_grad=1.0)


@dataclass
class VimpacConfig:
    model: VimpacModelConfig = field(default_factory=VimpacModelConfig)  # transformer over codes, tokenizer, heads
    mask: MaskConfig = field(default_factory=lambda: MaskConfig(kind="block", block_count=5))  # VIMPAC, 5x16x16
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)  # α and γ of the contrastive loss
    data: DataConfig = field(default_factory=_vimpac_data)  # videos, clip sampling (two clips each), no augmentation
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(repeats=2))  # repeats: clips per video
    optim: OptimConfig = field(default_factory=_vimpac_optim)  # AdamW and its linear schedule
    ds: ds.DeepSpeedConfig = field(default_factory=ds.DeepSpeedConfig)  # ZeRO stage and precision
    run: RunConfig = field(default_factory=RunConfig)  # output directory, seed, logging, checkpoints
    knn: KNNMonitorConfig = field(default_factory=KNNMonitorConfig)  # optional k-NN accuracy (VIMPAC's UCF101 monitor)

    def __post_init__(self) -> None:
        if self.contrastive.weight > 0 and self.batch.repeats != 2:
            raise ValueError(f"the contrastive loss pairs two clips of each video: set batch.repeats=2 (got "
                             f"{self.batch.repeats}), or contrastive.weight=0")
        if self.data.sampling != "dense":
            raise ValueError("VIMPAC samples its clips densely: set data.sampling=dense")


class VimpacTask(Task):
    """VIMPAC pre-training for ``engine.loop.train``."""

    config_class = VimpacConfig

    def __init__(self, cfg: VimpacConfig):
        super().__init__(cfg)
        if not cfg.model.tokenizer:
            raise ConfigError("model.tokenizer is not set: VIMPAC needs the weights.pt of run_scripts/tokenizer.py")
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank and in every run
        tokenizer = load_trained_tokenizer(cfg.model.tokenizer, "model.tokenizer")
        encoder = cfg.model.encoder
        model = VIMPAC(cfg.model, tokenizer, contrastive=cfg.contrastive.weight > 0)
        if cfg.model.init:
            weights = unwrap_state_dict(checkpoint.read_checkpoint(cfg.model.init))
            try:
                resampled = model.load_pretraining(weights)
            except RuntimeError as err:
                raise ConfigError(f"model.init={cfg.model.init} does not fit this VIMPAC model: "
                                  f"{' '.join(str(err).split())[:600]}") from None
            log.info("initial weights from %s (resampled: %s)", cfg.model.init, ", ".join(resampled) or "none")
        self.model = global_batch_norms(model)
        log.info("tokens: the frozen tokenizer of %s (%d codes, %d-pixel cells), token grid %s", cfg.model.tokenizer,
                 tokenizer.cfg.codebook_size, tokenizer.cfg.downsample, encoder.grid)
        self.train_set = train_clips(cfg.data, encoder, cfg.batch.repeats, cfg.run.seed)
        self.masks = None if cfg.mask.block_count else build_mask_generator(cfg.mask, encoder.grid)
        self.knn = KNNMonitor(cfg.knn, cfg.data, encoder, cfg.optim.epochs) if cfg.knn.every_epochs else None
        self._last: dict[str, torch.Tensor] = {}

    def _mask(self, clips: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
        mask = self.cfg.mask
        if self.masks is not None:
            return self.masks(clips, device=device, generator=generator)[0]
        return block_union_mask(clips, self.cfg.model.encoder.grid, mask.block_count, device, generator,
                                max_time_fraction=mask.block_max_time_fraction,
                                max_space_fraction=mask.block_max_space_fraction)

    def loss(self, engine, batch: dict, generator: torch.Generator) -> torch.Tensor:
        # float32 whatever the engine's precision: the tokenizer reads the clip in float32.
        video = model_input(batch["video"], self.cfg.data, torch.float32)
        mask_loss, accuracy, features = engine(video, self._mask(video.shape[0], video.device, generator))
        self._last = {"mask_loss": mask_loss.detach(), "mask_accuracy": accuracy}
        if features is None:
            return mask_loss
        # collate keeps each video's clips together: clip 1 and clip 2 of video i are rows 2i and 2i + 1
        contrastive = info_nce(features[0::2], features[1::2], self.cfg.contrastive.temperature)
        self._last["contrastive_loss"] = contrastive.detach()
        return mask_loss + self.cfg.contrastive.weight * self.cfg.contrastive.temperature * contrastive

    def on_epoch_end(self, engine, epoch: int, output_dir: str, generator: torch.Generator) -> Optional[dict]:
        return monitor_after_epoch(self.knn, engine, epoch)

    def step_metrics(self) -> dict[str, float]:
        return {name: value.item() for name, value in self._last.items()}

    def token_grid(self) -> tuple[int, int, int]:
        return self.cfg.model.encoder.grid

    def train_flops_per_clip(self) -> float:
        grid = self.cfg.model.encoder.grid
        if self.masks is not None:
            hidden = float(self.masks.num_masked)
        else:  # block unions hide a varying count: its mean over a few hundred draws
            draws = self._mask(256, torch.device("cpu"), torch.Generator().manual_seed(0))
            hidden = draws.float().sum(dim=1).mean().item()
        return 3 * self.model.forward_flops(grid, hidden)



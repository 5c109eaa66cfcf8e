"""Supervised fine-tuning of a (pre-trained) video ViT classifier, with validation and the multi-view test.

The training loop is ``engine.loop``'s; this module says what fine-tuning is made of: the classifier and where
its weights come from, mixup/cutmix and the classification loss, optional MAE-ST masking annealed to zero,
a model EMA that is evaluated as well as saved, validation with best-weights export, and the final test.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from datasets.files import write_text_atomic
from datasets.transforms import AugmentConfig
from datasets.video_dataset import DataConfig, EvalClips, model_input
from engine import checkpoint, ds
from engine.config import BatchConfig
from engine.data import multiview_test_set, prepare_synthetic, train_clips, validation_set
from engine.dist import is_main_process
from engine.eval.multiview import EvalConfig, describe_scores, evaluate_clips
from engine.frozen import load_trained_tokenizer
from engine.loop import RunConfig
from engine.optim import OptimConfig
from engine.task import Task, export_final_weights
from models.convert import load_into_classifier
from models.masking import MaskConfig, build_mask_generator
from models.vit import ClassifierConfig, ViTConfig, build_classifier

log = logging.getLogger("finetune")


# ---- mixup / cutmix / label smoothing -------------------------------------------------------------------------
# Delegated to ``timm.data.Mixup``.
#
# Clips are ``(B, C, T, H, W)`` float tensors. timm's ``Mixup`` is written for ``(B, C, H, W)``
# images: its cutmix box is drawn from ``shape[-2:]`` and pasted with ``x[:, :, yl:yh, xl:xh]``
# ('batch' mode) or ``x[i][:, yl:yh, xl:xh]`` ('elem'/'pair'), i.e. it only ever slices the last
# two dims, and its mixup is a plain blend ``lam * x + (1 - lam) * x.flip(0)``. So we hand timm
# the clip viewed as ``(B, C*T, H, W)``: every (channel, frame) plane gets the *same* box, and
# mixup/cutmix/label-smoothing semantics are exactly timm's (lambda sampling, switch_prob,
# ``correct_lam`` box-area correction, ``mixup_target``). Nothing of timm is reimplemented.
#
# Default mode is timm's ``'batch'``: one lambda and one box per call, sample ``i`` mixed with
# sample ``B-1-i`` (``flip(0)``). timm asserts an even batch in every mode; we raise a clear
# ``ValueError`` instead. The batch here is what the model sees per micro-step
# (``batch.micro_batch x batch.repeats`` clips). Note that with repeated augmentation a clip may
# be paired with another view of the same video (e.g. ``micro_batch=1, repeats=2``), which makes
# the mix a no-op on labels; that is a recipe choice, not checked here.
#
# Like timm, the mix is done in place: the input tensor may be overwritten (it is, when it is
# contiguous); use the returned tensor.


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


@dataclass
class FinetuneModelConfig(ClassifierConfig):
    # weights to start from: our pre-training export, a fine-tuned checkpoint, an official VideoMAE / V2
    # release or a Hugging Face VideoMAE checkpoint; None trains from scratch
    init: Optional[str] = None
    # a classifier over tokenizer codes (VIMPAC): the weights.pt of the frozen tokenizer it reads them from, run in
    # front of the transformer on every clip; "" = a ViT over pixels
    tokenizer: str = ""


@dataclass
class FinetuneMaskConfig:
    """MAE-ST appendix B.3: hide a fraction of the tokens from the encoder, annealed to 0 by a cosine."""

    # "random" (MAE-ST, spacetime-agnostic) or "tube"
    kind: Literal["random", "tube"] = "random"
    # fraction hidden at the first step (MAE-ST tried 0.5 and 0.75); 0 = no masking
    start_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.start_ratio < 1:
            raise ValueError(f"start_ratio must be in [0, 1), got {self.start_ratio}")

    def ratio_at(self, step: int, total_steps: int) -> float:
        """The ratio for optimizer step ``step`` (0-based) of ``total_steps``: start → 0 on a half cosine."""
        return self.start_ratio * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


@dataclass
class EmaConfig:
    # decay of an exponential moving average of the weights, updated every optimizer step, validated, tested
    # and exported beside the model (VideoMAE: 0.9999); None = no EMA
    decay: Optional[float] = None

    def __post_init__(self) -> None:
        if self.decay is not None and not 0 < self.decay < 1:
            raise ValueError(f"decay must be in (0, 1) or null, got {self.decay}")


def _finetune_augment() -> AugmentConfig:
    # VideoMAE fine-tuning: RandAugment, random-resized crop (0.08-1), flip, cube erasing p=0.25.
    return AugmentConfig(kind="finetune", rrc_scale=(0.08, 1.0), rand_augment="rand-m7-n4-mstd0.5-inc1",
                         erase_prob=0.25)


def _finetune_model() -> FinetuneModelConfig:
    return FinetuneModelConfig(encoder=ViTConfig(drop_path=0.1))


def _finetune_optim() -> OptimConfig:
    # VideoMAE fine-tuning defaults: base lr 1e-3 per 256 clips, AdamW (0.9, 0.999), layer decay 0.75.
    return OptimConfig(blr=1e-3, betas=(0.9, 0.999), epochs=100, warmup_epochs=5, layer_decay=0.75)


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=_finetune_model)  # classifier and its initial weights
    mask: FinetuneMaskConfig = field(default_factory=FinetuneMaskConfig)  # optional annealed token masking
    data: DataConfig = field(default_factory=lambda: DataConfig(train_augment=_finetune_augment()))
    mixup: MixupConfig = field(default_factory=MixupConfig)  # mixup / cutmix / label smoothing
    ema: EmaConfig = field(default_factory=EmaConfig)  # model EMA
    eval: EvalConfig = field(default_factory=EvalConfig)  # validation and the final test
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(repeats=2))  # repeats = VideoMAE num_sample
    optim: OptimConfig = field(default_factory=_finetune_optim)  # AdamW, layer decay and schedule
    ds: ds.DeepSpeedConfig = field(default_factory=ds.DeepSpeedConfig)  # ZeRO stage and precision
    run: RunConfig = field(default_factory=RunConfig)  # output directory, seed, logging, checkpoints

    def __post_init__(self) -> None:
        if self.ema.decay is not None and ds.zero_stage(self.ds) == 3:
            raise ValueError("ema.decay needs whole parameters on every rank: use ZeRO stage 0-2, or no EMA")
        if self.mixup.enabled and (self.batch.micro_batch * self.batch.repeats) % 2:
            raise ValueError(f"mixup/cutmix pairs clips: batch.micro_batch x batch.repeats must be even, got "
                             f"{self.batch.micro_batch} x {self.batch.repeats}")
        if self.data.num_classes is not None and self.data.num_classes != self.model.num_classes:
            raise ValueError(f"data.num_classes {self.data.num_classes} differs from model.num_classes "
                             f"{self.model.num_classes}")


def build_model(cfg: FinetuneModelConfig):
    """The classifier, freshly initialised: a ViT over pixels, or over the codes of ``cfg.tokenizer``."""
    if not cfg.tokenizer:
        return build_classifier(cfg)
    from models.vimpac import build_token_classifier

    return build_token_classifier(cfg, load_trained_tokenizer(cfg.tokenizer, "model.tokenizer"))


def build_initial_model(cfg: FinetuneModelConfig):
    """The classifier, with the weights of ``cfg.init`` when set (a fresh head where they have none)."""
    model = build_model(cfg)
    if cfg.init:
        report = load_into_classifier(model, checkpoint.read_checkpoint(cfg.init))
        log.info("initial weights from %s: %s", cfg.init, report)
    else:
        log.info("training from scratch (model.init is not set)")
    return model


def load_trained_model(cfg: FinetuneModelConfig, path: str):
    """A classifier holding fine-tuned weights: unlike ``build_initial_model``, a missing head is an error."""
    model = build_model(cfg)
    report = load_into_classifier(model, checkpoint.read_checkpoint(path))
    if report.fresh:
        raise ValueError(f"{path} has no classification head for {cfg.num_classes} classes (it lacks "
                         f"{', '.join(report.fresh)}): these weights are not fine-tuned for this task")
    return model


def score(cfg: FinetuneConfig, forward, dataset: EvalClips, device: torch.device, dtype: torch.dtype,
          collective_forward: bool = False) -> dict:
    """``engine.eval.multiview.evaluate_clips`` with this run's batch, workers and normalization."""
    return evaluate_clips(forward, dataset, num_classes=cfg.model.num_classes, micro_batch=cfg.eval.micro_batch,
                          num_workers=cfg.batch.num_workers, device=device, dtype=dtype,
                          collective_forward=collective_forward)


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# What a run exports: the last weights, the best-validated weights, for the model and its EMA.
EXPORTS = {"model": ("weights.pt", "best.pt"), "ema": ("weights_ema.pt", "best_ema.pt")}


class FinetuneTask(Task):
    """Classification fine-tuning for ``engine.loop.train``: validation every ``eval.every_epochs`` with the
    best weights exported, and the multi-view test of the last weights (model and EMA) at the end."""

    config_class = FinetuneConfig
    outputs = ("config.yaml, derived.yaml, metrics.jsonl, tb/, checkpoints/, weights.pt, best.pt, "
               "test_results.json")

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        torch.manual_seed(cfg.run.seed)  # the same fresh head on every rank and in every run
        self.model = build_initial_model(cfg.model)
        self.train_set = train_clips(cfg.data, cfg.model.encoder, cfg.batch.repeats, cfg.run.seed)
        self.mixup = build_mixup(cfg.mixup, cfg.model.num_classes)
        self.ema = None
        if cfg.ema.decay is not None:
            from timm.utils import ModelEmaV3

            # float32 whatever the engine's precision: a 0.9999 average vanishes in bf16 steps.
            self.ema = ModelEmaV3(self.model, decay=cfg.ema.decay, dtype=torch.float32)
        self.val_set = validation_set(cfg.data, cfg.model.encoder) if cfg.eval.every_epochs else None
        self.step = 0  # optimizer steps taken: the position of the mask-ratio schedule
        self.best: dict[str, float] = {}  # variant -> best validation top-1 so far
        self._masks: dict[int, object] = {}  # hidden-token count -> mask generator

    # ---- training --------------------------------------------------------------------------------------------

    def _mask(self, batch: int, device: torch.device, generator: torch.Generator) -> Optional[torch.Tensor]:
        """MAE-ST fine-tuning mask for the current step, or None once the annealed ratio hides no token."""
        grid = self.cfg.model.encoder.grid
        num_tokens = math.prod(grid)
        hidden = int(num_tokens * self.cfg.mask.ratio_at(self.step, self.derived.total_steps))
        if hidden == 0:
            return None
        if hidden not in self._masks:
            # the midpoint ratio truncates back to exactly `hidden` tokens
            ratio = (hidden + 0.5) / num_tokens
            self._masks[hidden] = build_mask_generator(MaskConfig(kind=self.cfg.mask.kind, ratio=ratio), grid)
        mask, _ = self._masks[hidden](batch, device=device, generator=generator)
        return mask

    def loss(self, engine, batch: dict, generator: torch.Generator) -> torch.Tensor:
        # float32 (mixup blends in full precision); the model casts the clip to its weights' dtype.
        video = model_input(batch["video"], self.cfg.data, torch.float32)
        targets = batch["label"]
        if self.mixup is not None:
            if video.shape[0] % 2:
                # An unreadable video left an odd batch and mixup pairs clips: the last clip goes twice. Dropping
                # it instead would leave nothing of a batch of one clip (a NaN loss, which stops the run).
                video, targets = torch.cat([video, video[-1:]]), torch.cat([targets, targets[-1:]])
            video, targets = self.mixup(video, targets)
        logits = engine(video, self._mask(video.shape[0], video.device, generator))
        return classification_loss(logits.float(), targets, self.cfg.mixup.label_smoothing)

    def after_step(self, engine, step: int) -> None:
        self.step = step
        if self.ema is not None:
            self._ema_to(engine.device)
            self.ema.update(engine.module, step=step)

    def _ema_to(self, device: torch.device) -> None:
        if next(self.ema.module.parameters()).device != device:
            self.ema.module.to(device)

    def token_grid(self) -> tuple[int, int, int]:
        return self.cfg.model.encoder.grid

    def train_flops_per_clip(self) -> float:
        # Dense count: annealed masking makes the first epochs cheaper than this.
        return 3 * self.model.forward_flops(self.cfg.model.encoder.grid)

    def state_dict(self) -> dict:
        state = {"step": self.step, "best": dict(self.best)}
        if self.ema is not None:
            state["ema"] = {k: v.cpu() for k, v in self.ema.module.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state.get("step", 0)
        self.best = dict(state.get("best", {}))
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])

    # ---- evaluation ------------------------------------------------------------------------------------------

    def _variants(self, engine):
        """(name, forward, input dtype, collective forward) of what is evaluated: the model, and its EMA."""
        yield "model", engine, ds.input_dtype(engine), ds.parameters_partitioned(engine)
        if self.ema is not None:
            self._ema_to(engine.device)
            yield "ema", self.ema.module, torch.float32, False

    def _weights(self, engine, variant: str) -> dict[str, torch.Tensor]:
        """Whole weights of a variant (a collective under ZeRO-3: call on every rank)."""
        if variant == "ema":
            return {k: v.detach().float().cpu() for k, v in self.ema.module.state_dict().items()}
        return ds.full_parameters(engine)

    def _score_all(self, engine, dataset: EvalClips) -> dict[str, dict]:
        engine.eval()
        try:
            return {name: score(self.cfg, forward, dataset, engine.device, dtype, collective)
                    for name, forward, dtype, collective in self._variants(engine)}
        finally:
            engine.train()

    def on_epoch_end(self, engine, epoch: int, output_dir: str, generator: torch.Generator) -> Optional[dict]:
        every = self.cfg.eval.every_epochs
        if self.val_set is None or (epoch % every and epoch < self.cfg.optim.epochs):
            return None
        record = {}
        for name, summary in self._score_all(engine, self.val_set).items():
            log.info("%s", describe_scores(f"epoch {epoch} validation ({name})", summary))
            prefix = "val" if name == "model" else f"val_{name}"
            record.update({f"{prefix}_top1": summary["top1"], f"{prefix}_top5": summary["top5"],
                           f"{prefix}_unreadable": len(summary["unscored"])})
            if summary["top1"] > self.best.get(name, -1.0):
                self.best[name] = summary["top1"]
                weights = self._weights(engine, name)
                if is_main_process():
                    path = checkpoint.export_weights(weights, Path(output_dir) / EXPORTS[name][1])
                    log.info("new best %s validation top-1 %.2f: wrote %s", name, 100 * summary["top1"], path)
        return record

    def finish(self, engine, output_dir: str) -> None:
        """Export the last weights (fp32, whole), then run the multi-view test on them and the EMA's."""
        out = Path(output_dir)
        step = export_final_weights(engine, out, EXPORTS["model"][0])
        if self.ema is not None:
            ema_weights = self._weights(engine, "ema")
            if is_main_process():
                checkpoint.export_weights(ema_weights, out / EXPORTS["ema"][0])
        if not self.cfg.eval.final_test:
            return
        results = self._score_all(engine, multiview_test_set(self.cfg.data, self.cfg.model.encoder))
        views = f"{self.cfg.data.test_temporal_views}x{self.cfg.data.eval_augment.num_spatial_views} views"
        for name, summary in results.items():
            log.info("%s", describe_scores(f"test, {views} ({name})", summary))
        if is_main_process():
            write_json(out / "test_results.json", {"step": step, "views": views, **results})
            log.info("wrote %s", out / "test_results.json")


def evaluate_weights(cfg: FinetuneConfig, path: str, device: torch.device) -> dict:
    """The multi-view test of fine-tuned weights, without training (``finetune.py --eval-only``); every rank
    calls it, each scoring its share."""
    model = load_trained_model(cfg.model, path).to(device).eval()
    prepare_synthetic(cfg.data)
    return score(cfg, model, multiview_test_set(cfg.data, cfg.model.encoder), device, torch.float32)

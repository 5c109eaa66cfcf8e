"""V-JEPA's attentive probe of a frozen encoder, trained by ``engine.loop`` on video clips.

Every step runs the frozen encoder once per clip, without gradients (no activation memory is kept for it; only the
probes' parameters are in the optimizer), and trains several attentive probes on its tokens at once, one per
learning rate of ``grid.lrs``. Validation scores every probe on one clip per video every ``eval.every_epochs``; at
the end every probe is scored on validation and on the multi-view test, and the one with the best validation top-1
is reported (the test never chooses): ``probe_results.json`` / ``.md``, ``best_probe.pt``.

V-JEPA's protocol (its configs vitl16_k400_16x8x3 / vitl16_ssv2_16x2x3): AdamW, lr 0.001 at batch 256 without
warmup, cosine to 0, weight decay 0.01, 20 epochs, random resized crops (scale 0.3-1). It attends across all the
segments of a video at once; this probe reads one clip at a time and the multi-view test averages the clips'
probabilities, as for the other heads of the project.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from datasets.files import write_text_atomic
from datasets.transforms import AugmentConfig
from datasets.video_dataset import DataConfig, model_input
from engine import checkpoint, ds
from engine.config import BatchConfig, require
from engine.data import multiview_test_set, train_clips, validation_set
from engine.dist import is_main_process
from engine.eval.multiview import EvalConfig, evaluate_columns
from engine.eval.report import choose_on_validation, describe_results, result_entry, results_table
from engine.frozen import ProbeModelConfig, build_feature_encoder
from engine.loop import RunConfig
from engine.optim import OptimConfig, optimizer_over, param_groups
from engine.task import Task, export_final_weights
from models.probe import AttentiveProbeGrid, per_head_loss

log = logging.getLogger("probe")


@dataclass
class AttentiveModelConfig(ProbeModelConfig):
    # attention heads of each probe's cross-attention; null = the encoder's
    num_heads: Optional[int] = None


@dataclass
class AttentiveGridConfig:
    # base learning rates, one probe each, trained in one pass: peak lr = lr x global batch / 256 (V-JEPA: 0.001 at
    # batch 256); the grid replaces optim.blr, which only names the reference the schedule is logged at
    lrs: list[float] = field(default_factory=lambda: [0.001])

    def __post_init__(self) -> None:
        require(bool(self.lrs) and all(lr > 0 for lr in self.lrs), f"lrs must be positive numbers, got {self.lrs}")


def _attentive_optim() -> OptimConfig:
    # V-JEPA: AdamW, lr 0.001 at batch 256 from the first step (no warmup), cosine to 0, weight decay 0.01, 20 epochs
    return OptimConfig(blr=1e-3, betas=(0.9, 0.999), weight_decay=0.01, epochs=20, warmup_epochs=0, min_lr=0.0,
                       warmup_lr=0.0)


def _attentive_data() -> DataConfig:
    # V-JEPA's training clips: random resized crops of area 0.3-1, flipped
    return DataConfig(train_augment=AugmentConfig(kind="random_resized", rrc_scale=(0.3, 1.0)))


@dataclass
class AttentiveProbeConfig:
    model: AttentiveModelConfig = field(default_factory=AttentiveModelConfig)  # frozen encoder, probe, classes
    data: DataConfig = field(default_factory=_attentive_data)  # video lists, clip sampling, augmentation
    grid: AttentiveGridConfig = field(default_factory=AttentiveGridConfig)  # the probes trained in one pass
    eval: EvalConfig = field(default_factory=EvalConfig)  # validation of every probe and the final test
    batch: BatchConfig = field(default_factory=BatchConfig)  # videos per rank and micro-step, workers
    optim: OptimConfig = field(default_factory=_attentive_optim)  # AdamW and its schedule
    ds: ds.DeepSpeedConfig = field(default_factory=ds.DeepSpeedConfig)  # ZeRO stage and precision
    run: RunConfig = field(default_factory=RunConfig)  # output directory, seed, logging, checkpoints

    def __post_init__(self) -> None:
        if self.data.num_classes is not None and self.data.num_classes != self.model.num_classes:
            raise ValueError(f"data.num_classes {self.data.num_classes} differs from model.num_classes "
                             f"{self.model.num_classes}")
        if self.optim.lr is not None or self.optim.layer_decay is not None:
            raise ValueError("a probe's learning rates are grid.lrs: leave optim.lr and optim.layer_decay null")


def probe_param_groups(model: AttentiveProbeGrid, lrs: list[float], optim: OptimConfig) -> list[dict]:
    """The probes' parameters only (the encoder is frozen), each probe's groups (decay / no decay) at its own
    learning rate (``lr_scale`` = its base lr / ``optim.blr``, the base lr the schedule runs at)."""
    groups = []
    for index, (lr, probe) in enumerate(zip(lrs, model.probes)):
        for group in param_groups(probe, optim.weight_decay):
            group.update(lr_scale=lr / optim.blr, name=f"probe{index}.{group['name']}")
            groups.append(group)
    return groups


class AttentiveProbeTask(Task):
    """Attentive probes on every token of a frozen encoder, for ``engine.loop.train``."""

    config_class = AttentiveProbeConfig
    outputs = ("config.yaml, derived.yaml, metrics.jsonl, tb/, checkpoints/, weights.pt, best_probe.pt, "
               "probe_results.json, probe_results.md")

    def __init__(self, cfg: AttentiveProbeConfig):
        super().__init__(cfg)
        torch.manual_seed(cfg.run.seed)  # the same encoder (at random initialisation) and probes on every rank
        encoder = build_feature_encoder(cfg.model, last_k=1)
        self.model = AttentiveProbeGrid(encoder, len(cfg.grid.lrs), cfg.model.num_classes, cfg.model.num_heads)
        self.train_set = train_clips(cfg.data, cfg.model.encoder, cfg.batch.repeats, cfg.run.seed)
        self.val_set = validation_set(cfg.data, cfg.model.encoder) if cfg.eval.every_epochs or cfg.eval.final_test else None
        self.names = [f"attentive lr={lr:g}" for lr in cfg.grid.lrs]
        self.best = -1.0

    def token_grid(self) -> tuple[int, int, int]:
        return self.cfg.model.encoder.grid

    def build_optimizer(self) -> torch.optim.Optimizer:
        return optimizer_over(probe_param_groups(self.model, self.cfg.grid.lrs, self.cfg.optim), self.cfg.optim)

    def loss(self, engine, batch: dict, generator: torch.Generator) -> torch.Tensor:
        logits = engine(model_input(batch["video"], self.cfg.data, torch.float32))
        return per_head_loss(logits, batch["label"])

    def train_flops_per_clip(self) -> float:
        grid = self.cfg.model.encoder.grid
        return self.model.backbone.forward_flops(grid) + 3 * self.model.probe_flops(grid)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best", -1.0)

    def _score(self, engine, dataset) -> list[dict]:
        engine.eval()
        try:
            return evaluate_columns(engine, dataset, len(self.names), num_classes=self.cfg.model.num_classes,
                                    micro_batch=self.cfg.eval.micro_batch, num_workers=self.cfg.batch.num_workers,
                                    device=engine.device, dtype=ds.input_dtype(engine),
                                    collective_forward=ds.parameters_partitioned(engine))
        finally:
            engine.train()

    def on_epoch_end(self, engine, epoch: int, output_dir: str, generator: torch.Generator) -> Optional[dict]:
        every = self.cfg.eval.every_epochs
        if not every or (epoch % every and epoch < self.cfg.optim.epochs):
            return None
        val = self._score(engine, self.val_set)
        best = choose_on_validation(val)
        log.info("epoch %d validation: best probe %s, top-1 %.2f", epoch, self.names[best], 100 * val[best]["top1"])
        return {"val_top1_best_probe": val[best]["top1"], "val_best_probe": best,
                "val_unreadable": len(val[best]["unscored"])}

    def finish(self, engine, output_dir: str) -> None:
        """Export the weights, score every probe on validation and the multi-view test, choose on validation and
        write the results and the chosen probe (``best_probe.pt``: its parameters alone)."""
        out = Path(output_dir)
        step = export_final_weights(engine, out)
        if not self.cfg.eval.final_test:
            return
        val = self._score(engine, self.val_set)
        test = self._score(engine, multiview_test_set(self.cfg.data, self.cfg.model.encoder))
        weights = ds.full_parameters(engine)  # a collective under ZeRO-3: every rank
        if not is_main_process():
            return
        chosen = choose_on_validation(val)
        prefix = f"probes.{chosen}."
        checkpoint.export_weights({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                                  out / "best_probe.pt")
        results: dict[str, Any] = {"step": step, "encoder": self.cfg.model.init, "attentive": {
            "chosen": {**result_entry(self.names[chosen], val[chosen], test[chosen], index=chosen),
                       "weights": "best_probe.pt"},
            "all": [result_entry(name, v, t, lr=lr)
                    for name, lr, v, t in zip(self.names, self.cfg.grid.lrs, val, test)]}}
        write_text_atomic(out / "probe_results.json", json.dumps(results, indent=2) + "\n")
        write_text_atomic(out / "probe_results.md", results_table(results) + "\n")
        log.info("%s", describe_results(results))
        log.info("wrote %s, %s and %s", out / "probe_results.json", out / "probe_results.md", out / "best_probe.pt")

"""Masked video pre-training: the task's configuration and what one training step of it costs.

The training loop itself (``engine.loop``) is shared by every task; this module only says what pre-training
is made of: the VideoMAE model, its masks, the training clips, its pictures and its exported weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from datasets.video_dataset import DataConfig, collate_clips, model_input
from engine import ds
from engine.config import BatchConfig
from engine.data import train_clips
from engine.dist import is_main_process
from engine.eval.knn import KNNMonitor, KNNMonitorConfig, monitor_after_epoch
from engine.eval.pictures import reconstruction_from_prediction, save_loss_curve
from engine.loop import RunConfig
from engine.metrics import read_metrics
from engine.optim import OptimConfig
from engine.task import Task, export_final_weights
from models.masking import MaskConfig, build_mask_generator
from models.videomae import PretrainModelConfig, VideoMAE

log = logging.getLogger("pretrain")


@dataclass
class PretrainConfig:
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)  # encoder, decoder, targets
    mask: MaskConfig = field(default_factory=MaskConfig)  # which tokens the encoder and decoder drop
    data: DataConfig = field(default_factory=DataConfig)  # videos, clip sampling, augmentation
    batch: BatchConfig = field(default_factory=BatchConfig)  # videos per rank and step
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer, lr and its schedule
    ds: ds.DeepSpeedConfig = field(default_factory=ds.DeepSpeedConfig)  # ZeRO stage and precision (the template)
    run: RunConfig = field(default_factory=RunConfig)  # output directory, seed, logging, checkpoints
    knn: KNNMonitorConfig = field(default_factory=KNNMonitorConfig)  # optional k-NN accuracy every few epochs


def build_model_and_masks(cfg: PretrainConfig):
    """The pre-training model and the mask generator for its token grid."""
    tokenizer = None
    if cfg.model.target.kind == "tokens":
        from engine.frozen import load_trained_tokenizer

        tokenizer = load_trained_tokenizer(cfg.model.target.tokenizer)
        log.info("token targets: the frozen tokenizer of %s (%d codes, %d-pixel cells)", cfg.model.target.tokenizer,
                 tokenizer.cfg.codebook_size, tokenizer.cfg.downsample)
    model = VideoMAE(cfg.model, pixel_mean=cfg.data.mean, pixel_std=cfg.data.std, tokenizer=tokenizer)
    return model, build_mask_generator(cfg.mask, cfg.model.encoder.grid)


class PretrainTask(Task):
    """VideoMAE / MAE-ST pre-training for ``engine.loop.train``."""

    config_class = PretrainConfig
    outputs = "config.yaml, derived.yaml, metrics.jsonl, tb/, vis/, checkpoints/, weights.pt, loss_curve.png"

    def __init__(self, cfg: PretrainConfig):
        super().__init__(cfg)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank and in every run
        self.model, self.masks = build_model_and_masks(cfg)
        self.train_set = train_clips(cfg.data, cfg.model.encoder, cfg.batch.repeats, cfg.run.seed)
        self.knn = KNNMonitor(cfg.knn, cfg.data, cfg.model.encoder, cfg.optim.epochs) if cfg.knn.every_epochs else None

    def _inputs(self, engine, video_uint8: torch.Tensor, generator: torch.Generator):
        # float32 whatever the engine's precision: the model casts the clip to its weights' dtype itself, and
        # computes its targets from these unrounded pixels.
        video = model_input(video_uint8, self.cfg.data, torch.float32)
        mask, decoder_mask = self.masks(video.shape[0], device=video.device, generator=generator)
        return video, mask, decoder_mask

    def loss(self, engine, batch: dict, generator: torch.Generator) -> torch.Tensor:
        loss, _, _ = engine(*self._inputs(engine, batch["video"], generator))
        return loss

    def token_grid(self) -> tuple[int, int, int]:
        return self.cfg.model.encoder.grid

    def train_flops_per_clip(self) -> float:
        masks = self.masks
        decoded = masks.num_decoder_kept if self.cfg.mask.decoder_kind != "none" else None
        return 3 * self.model.forward_flops(self.cfg.model.encoder.grid, masks.num_visible, decoded)

    def on_epoch_end(self, engine, epoch: int, output_dir: str, generator: torch.Generator) -> Optional[dict]:
        every = self.cfg.run.vis_every_epochs
        if every and epoch % every == 0:
            self.save_pictures(engine, Path(output_dir) / "vis" / f"epoch_{epoch:04d}.png")
        return monitor_after_epoch(self.knn, engine, epoch)

    def save_pictures(self, engine, path: Path) -> None:
        """Reconstructions of the first training videos under fixed masks. Every rank runs the forward (ZeRO-3
        gathers parameters collectively); rank 0 draws."""
        items = [self.train_set[i] for i in range(min(4, len(self.train_set)))]
        batch = collate_clips(items)
        if batch["video"] is None:
            return
        fixed = torch.Generator(device=engine.device).manual_seed(0)
        video, mask, decoder_mask = self._inputs(engine, batch["video"].to(engine.device), fixed)
        engine.eval()
        with torch.no_grad():
            _, pred, _ = engine(video, mask, decoder_mask)
        engine.train()
        if is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            reconstruction_from_prediction(engine.module, video, pred, mask, decoder_mask,
                                           subtract_clip_mean=self.cfg.data.subtract_clip_mean).save(path)
            log.info("wrote %s", path)

    def finish(self, engine, output_dir: str) -> None:
        """Pictures of the final model, the weights exported for fine-tuning, and the loss curve."""
        out = Path(output_dir)
        self.save_pictures(engine, out / "vis" / "final.png")
        export_final_weights(engine, out)
        if is_main_process():
            records = [r for r in read_metrics(out) if "loss" in r]
            if records:
                save_loss_curve([r["step"] for r in records], [r["loss"] for r in records], out / "loss_curve.png")

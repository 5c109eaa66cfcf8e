"""Training of the video tokenizer (``models.tokenizer.VQTokenizer``) as a task of the shared loop.

Every frame of the training clips is one image for the tokenizer: reconstruction MSE + commitment loss. After each
epoch the run logs the epoch's reconstruction error, the share of the codebook its codes used and their perplexity
(summed over the ranks), warns loudly when the share falls under ``collapse.min_code_usage`` (a collapsed codebook
makes poor targets: most positions get one of a few codes), and draws original and reconstructed frames. The
export (``weights.pt``) holds the encoder, decoder and codebook (the codebook is a buffer, updated by moving
averages): what ``model.target.tokenizer`` of a pre-training loads, frozen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from datasets.transforms import AugmentConfig
from datasets.video_dataset import DataConfig, TrainClips, load_records, model_input, unnormalize
from engine import ds
from engine.config import BatchConfig, require
from engine.dist import is_main_process, sum_over_ranks_
from engine.loop import RunConfig
from engine.optim import OptimConfig
from engine.task import Task, export_final_weights
from models.tokenizer import TokenizerConfig, VQTokenizer, codebook_statistics

log = logging.getLogger("tokenizer")


@dataclass
class ClipConfig:
    # frames per training clip; each is one image for the tokenizer
    num_frames: int = 4
    # side of the square training crops (a multiple of the tokenizer's downsampling)
    img_size: int = 224

    def __post_init__(self) -> None:
        require(self.num_frames >= 1 and self.img_size >= 1, f"num_frames and img_size must be >= 1, got "
                f"{self.num_frames}, {self.img_size}")


@dataclass
class CollapseConfig:
    # warn (loudly, every epoch) when an epoch's codes use less than this share of the codebook
    min_code_usage: float = 0.25

    def __post_init__(self) -> None:
        require(0 <= self.min_code_usage <= 1, f"min_code_usage must lie in [0, 1], got {self.min_code_usage}")


def _tokenizer_optim() -> OptimConfig:
    # VQ autoencoders train with Adam at a few 1e-4 and little weight decay (VQ-VAE, DALL-E's dVAE)
    return OptimConfig(blr=2e-4, betas=(0.9, 0.99), weight_decay=0.0, epochs=20, warmup_epochs=1)


def _tokenizer_data() -> DataConfig:
    # random resized crops of area 0.5-1 with flips: frames as images
    return DataConfig(train_augment=AugmentConfig(kind="random_resized"))


@dataclass
class TokenizerTrainConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)  # the VQ autoencoder
    clip: ClipConfig = field(default_factory=ClipConfig)  # frames per clip and their size
    data: DataConfig = field(default_factory=_tokenizer_data)  # video lists, clip sampling, augmentation
    collapse: CollapseConfig = field(default_factory=CollapseConfig)  # codebook-collapse warning
    batch: BatchConfig = field(default_factory=BatchConfig)  # clips per rank and micro-step, workers
    optim: OptimConfig = field(default_factory=_tokenizer_optim)  # AdamW and its schedule
    ds: ds.DeepSpeedConfig = field(default_factory=ds.DeepSpeedConfig)  # ZeRO stage and precision
    run: RunConfig = field(default_factory=RunConfig)  # output directory, seed, logging, checkpoints, pictures

    def __post_init__(self) -> None:
        if self.clip.img_size % self.model.downsample:
            raise ValueError(f"clip.img_size {self.clip.img_size} is not a multiple of the tokenizer's downsampling "
                             f"{self.model.downsample}")
        if ds.zero_stage(self.ds) == 3:
            raise ValueError("the codebook's moving averages are buffers, which ZeRO-3 does not partition: use "
                             "ZeRO stage 0-2")


def frames_of(video: torch.Tensor) -> torch.Tensor:
    """Clips (B, C, T, H, W) → frames (B·T, C, H, W)."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)


class TokenizerTask(Task):
    """VQ tokenizer training for ``engine.loop.train``, with codebook statistics and pictures per epoch."""

    config_class = TokenizerTrainConfig
    outputs = "config.yaml, derived.yaml, metrics.jsonl, tb/, vis/, checkpoints/, weights.pt"

    def __init__(self, cfg: TokenizerTrainConfig):
        super().__init__(cfg)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank and in every run
        self.model = VQTokenizer(cfg.model)
        self.train_set = TrainClips(load_records(cfg.data, "train"), cfg.data, clip_len=cfg.clip.num_frames,
                                    size=cfg.clip.img_size, repeats=cfg.batch.repeats, seed=cfg.run.seed)
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.code_counts = torch.zeros(self.cfg.model.codebook_size, dtype=torch.float64)
        self.squared_error, self.pixels = 0.0, 0

    def loss(self, engine, batch: dict, generator: torch.Generator) -> torch.Tensor:
        frames = frames_of(model_input(batch["video"], self.cfg.data, torch.float32))
        loss, mse, codes, _ = engine(frames)
        with torch.no_grad():  # kept on the device: read once per epoch, not per step
            counts = torch.bincount(codes.reshape(-1), minlength=self.cfg.model.codebook_size)
            self._accumulate(counts, mse * frames.numel(), frames.numel())
        return loss

    def _accumulate(self, counts: torch.Tensor, squared_error: torch.Tensor, pixels: int) -> None:
        if self.code_counts.device != counts.device:
            self.code_counts = self.code_counts.to(counts.device)
        self.code_counts += counts
        self.squared_error = self.squared_error + squared_error
        self.pixels += pixels

    def on_epoch_end(self, engine, epoch: int, output_dir: str, generator: torch.Generator) -> Optional[dict]:
        counts = self.code_counts.to(engine.device)
        totals = torch.stack([torch.as_tensor(self.squared_error, dtype=torch.float64, device=engine.device),
                              torch.tensor(float(self.pixels), dtype=torch.float64, device=engine.device)])
        sum_over_ranks_(counts)  # every rank's codes and errors
        sum_over_ranks_(totals)
        stats = codebook_statistics(counts)
        record = {"mse": (totals[0] / totals[1].clamp(min=1)).item(), **stats}
        self._reset_epoch()
        log.info("epoch %d: reconstruction MSE %.4f, codebook usage %.1f%% (%d of %d codes), perplexity %.1f", epoch,
                 record["mse"], 100 * stats["code_usage"], round(stats["code_usage"] * len(counts)), len(counts),
                 stats["perplexity"])
        if stats["code_usage"] < self.cfg.collapse.min_code_usage:
            log.warning("CODEBOOK COLLAPSE: epoch %d used %.1f%% of the %d codes, under collapse.min_code_usage="
                        "%.0f%%: the codes are poor targets. Lower model.codebook_size, raise "
                        "model.dead_code_threshold (dead-code restarts), or train longer.", epoch,
                        100 * stats["code_usage"], len(counts), 100 * self.cfg.collapse.min_code_usage)
        every = self.cfg.run.vis_every_epochs
        if every and (epoch % every == 0 or epoch >= self.cfg.optim.epochs):
            self.save_pictures(engine, Path(output_dir) / "vis" / f"epoch_{epoch:04d}.png")
        return record

    def save_pictures(self, engine, path: Path) -> None:
        """Original frames over their reconstructions, for the first training clips (rank 0)."""
        if not is_main_process():
            return
        from torchvision.utils import save_image

        items = [self.train_set.item(i, 0) for i in range(min(2, len(self.train_set)))]
        clips = [item["video"] for item in items if isinstance(item, dict)]
        if not clips:
            return
        video = torch.cat(clips).to(engine.device)
        frames = frames_of(model_input(video, self.cfg.data, torch.float32))
        engine.eval()
        try:
            with torch.no_grad():
                reconstruction = engine.module(frames)[3]
        finally:
            engine.train()
        rows = unnormalize(torch.cat([frames, reconstruction.float()]), self.cfg.data.mean, self.cfg.data.std)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(rows.clamp(0, 1).cpu(), path, nrow=len(frames))
        log.info("wrote %s (top: frames, bottom: reconstructions)", path)

    def state_dict(self) -> dict:
        return {"code_counts": self.code_counts.cpu(), "squared_error": float(self.squared_error),
                "pixels": self.pixels}

    def load_state_dict(self, state: dict) -> None:
        if "code_counts" in state:
            self.code_counts = state["code_counts"].clone()
            self.squared_error, self.pixels = state["squared_error"], state["pixels"]

    def finish(self, engine, output_dir: str) -> None:
        """The weights and the codebook (a persistent buffer) in weights.pt."""
        export_final_weights(engine, Path(output_dir))

"""Smoke run of masked video pre-training on CPU: a few AdamW steps of a tiny VideoMAE on real decoded clips.

    python run_scripts/smoke.py --config run_scripts/configs/pretrain/tiny_cpu.yaml [--steps=60] [key=value ...]

The tiny recipe trains on the built-in synthetic dataset (generated into ``data.root`` on first use): clips
are decoded from H.264 files, cropped as uint8 in DataLoader workers, normalized and masked here, as the
engine will do on the device. The loss must fall over the run; the script fails otherwise. It writes the
resolved config and the derived values to ``run.output_dir``. The pre-training engine replaces this script.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time

import torch
from torch.utils.data import DataLoader

from datasets.sampler import ResumableDistributedSampler
from datasets.video_dataset import collate_clips
from engine.config import config_from_cli, save_config
from engine.pretrain import PretrainConfig, build_model_and_masks, build_train_clips, derive_pretrain

log = logging.getLogger("smoke")


def batches(dataset, cfg: PretrainConfig):
    """Endless uint8 batches, epoch after epoch, as a resumable sampler orders them."""
    sampler = ResumableDistributedSampler(len(dataset), seed=cfg.run.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch.micro_batch, sampler=sampler, collate_fn=collate_clips,
                        num_workers=cfg.batch.num_workers, drop_last=True)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        yield from loader


def normalize(video: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """What the engine does on the device: uint8 → float in [0, 1] → per-channel mean/std (B, C, 1, 1, 1)."""
    return (video.float() / 255 - mean) / std


@torch.no_grad()
def probe_loss(model, video: torch.Tensor, masks: tuple) -> float:
    model.eval()
    loss = model(video, *masks)[0].item()
    model.train()
    return loss


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg, flags = config_from_cli(PretrainConfig, argv)
    steps = int(flags.get("steps", 60))
    torch.manual_seed(cfg.run.seed)
    dataset = build_train_clips(cfg)
    derived = derive_pretrain(cfg, world_size=1, num_train_samples=len(dataset))
    save_config(cfg, cfg.run.output_dir, derived)

    model, masks = build_model_and_masks(cfg)
    grid = cfg.model.encoder.grid
    decoded = masks.num_decoder_kept if cfg.mask.decoder_kind != "none" else None
    gflops = model.forward_flops(grid, masks.num_visible, decoded) / 1e9
    log.info("model: %s encoder, %.2fM parameters, grid %s, %s (%.3f GFLOP forward per clip)",
             cfg.model.encoder.arch, sum(p.numel() for p in model.parameters()) / 1e6, grid, masks, gflops)
    log.info("data: %d training videos from %s; derived: %s", len(dataset), cfg.data.root or cfg.data.train_list,
             derived.as_dict())

    generator = torch.Generator().manual_seed(cfg.run.seed)
    stream = batches(dataset, cfg)
    probe = normalize(next(stream)["video"], model.pixel_mean, model.pixel_std)
    probe_masks = masks(probe.shape[0], generator=torch.Generator().manual_seed(1))
    probe_before = probe_loss(model, probe, probe_masks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=derived.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    losses, clips, unreadable = [], 0, 0
    start = time.perf_counter()
    for step, batch in enumerate(itertools.islice(stream, steps), start=1):
        unreadable += len(batch["failures"])
        video = normalize(batch["video"], model.pixel_mean, model.pixel_std)
        mask, decoder_mask = masks(video.shape[0], generator=generator)
        loss, _, _ = model(video, mask, decoder_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        clips += video.shape[0]
        if step == 1 or step % 10 == 0 or step == steps:
            log.info("step %3d/%d  loss %.4f", step, steps, losses[-1])
    elapsed = time.perf_counter() - start
    log.info("%d steps, %d clips in %.1f s (%.1f clips/s, %.2f GFLOP/s); unreadable videos skipped: %d",
             steps, clips, elapsed, clips / elapsed, 3 * gflops * clips / elapsed, unreadable)
    log.info("wrote %s/config.yaml and derived.yaml", cfg.run.output_dir)

    # Training batches differ a lot from each other; a fixed batch with fixed masks shows the trend.
    probe_after = probe_loss(model, probe, probe_masks)
    if not probe_after < probe_before:
        log.error("the loss on a fixed batch did not fall (%.4f → %.4f): something is wrong with the model or "
                  "the objective", probe_before, probe_after)
        return 1
    log.info("loss on a fixed batch fell from %.4f to %.4f", probe_before, probe_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())

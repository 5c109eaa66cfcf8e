"""Smoke run of masked video pre-training on CPU: a few AdamW steps of a tiny VideoMAE on a fixed batch.

    python run_scripts/smoke.py --config run_scripts/configs/pretrain/tiny_cpu.yaml [--steps=60] [key=value ...]

The clips are smooth random videos (low-resolution noise upsampled in space and time), so hidden patches
can be inferred from their neighbours and the loss must fall; the run fails otherwise. It writes the
resolved config and the derived values to ``run.output_dir``. The pre-training engine replaces this script.
"""

from __future__ import annotations

import logging
import sys
import time

import torch
import torch.nn.functional as F

from engine.config import config_from_cli, save_config
from engine.pretrain import PretrainConfig, build_model_and_masks, derive_pretrain

log = logging.getLogger("smoke")


def smooth_clips(batch: int, cfg, generator: torch.Generator) -> torch.Tensor:
    """uint8 clips (B, C, T, H, W): coarse noise upsampled, like the natural videos' spatial coherence."""
    enc = cfg.model.encoder
    coarse = torch.rand(batch, enc.in_chans, enc.num_frames // 4 + 1, enc.img_size // 8, enc.img_size // 8,
                        generator=generator)
    video = F.interpolate(coarse, size=(enc.num_frames, enc.img_size, enc.img_size), mode="trilinear")
    return (video * 255).round().to(torch.uint8)


def normalize(video: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """What the engine does on the device: uint8 → float in [0, 1] → per-channel mean/std (B, C, 1, 1, 1)."""
    return (video.float() / 255 - mean) / std


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg, flags = config_from_cli(PretrainConfig, argv)
    steps = int(flags.get("steps", 60))
    derived = derive_pretrain(cfg, world_size=1)
    save_config(cfg, cfg.run.output_dir, derived)

    torch.manual_seed(cfg.run.seed)
    model, masks = build_model_and_masks(cfg)
    grid = cfg.model.encoder.grid
    gflops = model.forward_flops(grid, masks.num_visible, masks.num_decoder_kept if cfg.mask.decoder_kind != "none"
                                 else None) / 1e9
    log.info("model: %s encoder, %.2fM parameters, grid %s, %s (%.3f GFLOP forward per clip)",
             cfg.model.encoder.arch, sum(p.numel() for p in model.parameters()) / 1e6, grid, masks, gflops)
    log.info("derived: %s", derived.as_dict())

    generator = torch.Generator().manual_seed(cfg.run.seed)
    video = normalize(smooth_clips(cfg.batch.micro_batch, cfg, generator), model.pixel_mean, model.pixel_std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=derived.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    losses = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        mask, decoder_mask = masks(video.shape[0], generator=generator)
        loss, _, _ = model(video, mask, decoder_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % 5 == 0 or step == steps:
            log.info("step %3d/%d  loss %.4f", step, steps, losses[-1])
    elapsed = time.perf_counter() - start
    clips_per_s = steps * video.shape[0] / elapsed
    log.info("%d steps in %.1f s (%.1f clips/s, %.2f GFLOP/s)", steps, elapsed, clips_per_s, 3 * gflops * clips_per_s)
    log.info("wrote %s/config.yaml and derived.yaml", cfg.run.output_dir)

    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    if not last < first:
        log.error("the loss did not fall (%.4f → %.4f): something is wrong with the model or the objective",
                  first, last)
        return 1
    log.info("loss fell from %.4f to %.4f", first, last)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reconstruction pictures of any pre-training checkpoint: original / masked / reconstructed frames as a PNG.

    python run_scripts/visualize.py --config <recipe>.yaml --weights=runs/x/weights.pt [--out=vis.png] [key=value ...]
    python run_scripts/visualize.py --config <recipe>.yaml --weights=runs/x/checkpoints/step_300 ...

``--weights`` is an exported weights file (ours or an official VideoMAE pre-training checkpoint), a DeepSpeed
step directory, whose ZeRO partitions are gathered, or a Hugging Face ``VideoMAEForPreTraining`` checkpoint. The
recipe's model must match the checkpoint: an official checkpoint built with ``init_values`` needs
``model.encoder.layer_scale_init`` / ``model.decoder.layer_scale_init`` set, and the error says so. Clips come
from the recipe's training data (the first ``--videos`` videos, 4 by default) with masks drawn from ``--seed`` (0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from datasets.video_dataset import collate_clips, model_input  # noqa: E402
from engine.checkpoint import read_checkpoint  # noqa: E402
from engine.config import config_from_cli  # noqa: E402
from engine.pictures import save_reconstructions  # noqa: E402
from engine.data import train_clips  # noqa: E402
from engine.pretrain import PretrainConfig, build_model_and_masks  # noqa: E402
from models.convert import load_into_pretrain  # noqa: E402


def main(argv=None) -> int:
    cfg, flags = config_from_cli(PretrainConfig, argv)
    if "weights" not in flags:
        raise SystemExit("usage: visualize.py --config RECIPE --weights=PATH [--out=PNG] [--videos=N] [--seed=S]")
    model, masks = build_model_and_masks(cfg)
    try:
        load_into_pretrain(model, read_checkpoint(flags["weights"]))
    except ValueError as error:  # the checkpoint does not fit the recipe's model: the message says what to set
        raise SystemExit(f"cannot load {flags['weights']}: {error}") from None
    dataset = train_clips(cfg.data, cfg.model.encoder, cfg.batch.repeats, cfg.run.seed)
    batch = collate_clips([dataset[i] for i in range(min(int(flags.get("videos", 4)), len(dataset)))])
    if batch["video"] is None:
        raise SystemExit("none of the first videos could be read: " + "; ".join(f.reason for f in batch["failures"]))
    video = model_input(batch["video"], cfg.data)
    mask, decoder_mask = masks(video.shape[0], generator=torch.Generator().manual_seed(int(flags.get("seed", 0))))
    out = save_reconstructions(model, video, mask, flags.get("out", "reconstruction.png"), decoder_mask)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

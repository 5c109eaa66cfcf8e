"""Reconstruction pictures of any pre-training checkpoint: original / masked / reconstructed frames as a PNG.

    python run_scripts/visualize.py --config <recipe>.yaml --weights runs/x/weights.pt [--out vis.png] [key=value ...]
    python run_scripts/visualize.py --config <recipe>.yaml --weights runs/x/checkpoints/step_300 ...

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
from engine.launch import USER_ERRORS, entry_parser, parse_command_line, user_error  # noqa: E402
from engine.eval.pictures import save_reconstructions  # noqa: E402
from engine.data import prepare_synthetic, train_clips  # noqa: E402
from engine.tasks.pretrain import PretrainTask, build_model_and_masks  # noqa: E402
from models.convert import load_into_pretrain  # noqa: E402


def add_flags(parser) -> None:
    parser.add_argument("--weights", required=True, metavar="PATH",
                        help="exported weights, a DeepSpeed step directory or a Hugging Face checkpoint")
    parser.add_argument("--out", default="reconstruction.png", metavar="PNG", help="picture to write")
    parser.add_argument("--videos", type=int, default=4, help="first training videos to show (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks (default 0)")


def main(argv=None) -> int:
    parser = entry_parser(PretrainTask, __doc__, add_flags)
    try:
        flags, cfg = parse_command_line(parser, PretrainTask.config_class, argv)
    except USER_ERRORS as err:
        return user_error(err)
    model, masks = build_model_and_masks(cfg)
    try:
        load_into_pretrain(model, read_checkpoint(flags.weights))
    except ValueError as error:  # the checkpoint does not fit the recipe's model: the message says what to set
        raise SystemExit(f"cannot load {flags.weights}: {error}") from None
    prepare_synthetic(cfg.data)
    dataset = train_clips(cfg.data, cfg.model.encoder, cfg.batch.repeats, cfg.run.seed)
    batch = collate_clips([dataset[i] for i in range(min(flags.videos, len(dataset)))])
    if batch["video"] is None:
        raise SystemExit("none of the first videos could be read: " + "; ".join(f.reason for f in batch["failures"]))
    video = model_input(batch["video"], cfg.data)
    mask, decoder_mask = masks(video.shape[0], generator=torch.Generator().manual_seed(flags.seed))
    out = save_reconstructions(model, video, mask, flags.out, decoder_mask,
                               subtract_clip_mean=cfg.data.subtract_clip_mean)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

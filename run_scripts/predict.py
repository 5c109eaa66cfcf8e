"""Top-k classes of one video under a fine-tuned classifier: softmax averaged over the config's test views.

    python run_scripts/predict.py --weights runs/ft/best.pt --video clip.mp4 [--labels labels.txt] [--topk 5]
                                  [--config runs/ft/config.yaml] [--views K]

``--config`` is a fine-tuning recipe or a run's ``config.yaml``; without it, the ``config.yaml`` next to
``--weights`` is used (a fine-tuning run writes it beside ``weights.pt``, ``best.pt`` and ``weights_ema.pt``).
The video is cut into the config's test views (``data.test_temporal_views`` clips along time, ``--views``
overriding it, each into ``data.eval_augment.num_spatial_views`` crops), decoded with ``data.backend``; the
softmax of every view is averaged. ``--labels`` is a file with the name of class i on line i (the synthetic
dataset's ``labels.txt``); without it the class ids are printed.

Exit status: 0 printed; 1 the video cannot be read; 2 wrong input (config, weights without a classification
head, a label file that does not fit the model).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, installed or not

from datasets.annotations import VideoRecord  # noqa: E402
from datasets.video_dataset import EvalClips  # noqa: E402
from engine.config import ConfigError, load_config  # noqa: E402
from engine.eval.multiview import score_views  # noqa: E402
from engine.tasks.finetune import FinetuneConfig, load_trained_model  # noqa: E402
from engine.tasks.pretrain import PretrainConfig  # noqa: E402


class PredictError(Exception):
    """A message for the user and the exit status that goes with it."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Top-k classes of one video under a fine-tuned classifier.")
    parser.add_argument("--weights", required=True, help="fine-tuned weights (weights.pt, best.pt, ...)")
    parser.add_argument("--video", required=True, help="the video file to classify")
    parser.add_argument("--labels", help="class names, the name of class i on line i; default: class ids")
    parser.add_argument("--topk", type=int, default=5, help="classes to print (clipped to the class count)")
    parser.add_argument("--config", help="fine-tuning recipe or run config.yaml; default: config.yaml beside "
                                         "--weights")
    parser.add_argument("--views", type=int, help="temporal views (default: the config's data.test_temporal_views)")
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk must be >= 1, got {args.topk}")
    if args.views is not None and args.views < 1:
        parser.error(f"--views must be >= 1, got {args.views}")
    return args


def read_config(config: str | None, weights: str) -> FinetuneConfig:
    """``config``, else the ``config.yaml`` beside ``weights``, read as a fine-tuning config."""
    path = Path(config) if config else Path(weights).parent / "config.yaml"
    if not path.is_file():
        where = f"--config {config}" if config else f"no config.yaml beside {weights}"
        raise PredictError(f"{where}: no such file; pass --config with the fine-tuning recipe or run config.yaml")
    try:
        return load_config(FinetuneConfig, str(path))
    except ConfigError as err:
        if _is_pretrain_config(path):
            raise PredictError(f"{path} is a pre-training config: pre-training weights are not fine-tuned for "
                               "classification; fine-tune them first, or pass --config with a fine-tuning "
                               "recipe") from None
        raise PredictError(f"config error: {err}") from None


def _is_pretrain_config(path: Path) -> bool:
    try:
        load_config(PretrainConfig, str(path))
    except ConfigError:
        return False
    return True


def load_model(cfg: FinetuneConfig, weights: str) -> torch.nn.Module:
    """The config's classifier holding ``weights``; weights without a classification head are refused."""
    try:
        return load_trained_model(cfg.model, weights).eval()
    except (OSError, RuntimeError, TypeError, ValueError, pickle.UnpicklingError) as err:
        raise PredictError(str(err) if weights in str(err) else f"{weights}: {err}") from None


def read_labels(path: str, num_classes: int) -> list[str]:
    """Line i of ``path`` = name of class i (blank lines ignored); the count must be the model's."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as err:
        raise PredictError(f"--labels {path}: {err.strerror or err}") from None
    if len(names) != num_classes:
        raise PredictError(f"--labels {path} names {len(names)} classes but the model has {num_classes}")
    return names


@torch.no_grad()
def predict(model: torch.nn.Module, cfg: FinetuneConfig, video: str, temporal_views: int | None = None,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, int, EvalClips]:
    """(class probabilities (C,) float64, views scored, the views' dataset) for ``video``: the mean of the
    softmax of every test view of ``cfg``. Raises PredictError(status 1) when no view can be read."""
    encoder = cfg.model.encoder
    clips = EvalClips([VideoRecord(path=os.path.abspath(video))], cfg.data, clip_len=encoder.num_frames,
                      size=encoder.img_size, temporal_views=temporal_views)
    scores = score_views(model.to(device), clips, num_classes=cfg.model.num_classes,
                         micro_batch=cfg.eval.micro_batch, num_workers=0, device=torch.device(device),
                         dtype=torch.float32)
    reasons = "; ".join(sorted({reason for _, _, reason in scores.failures}))
    if not scores.counts[0]:
        raise PredictError(f"cannot read {video}: {reasons}", status=1)
    if reasons:
        expected = clips.views_per_video
        print(f"warning: {expected - int(scores.counts[0])} of {expected} views of {video} could not be read: "
              f"{reasons}", file=sys.stderr)
    return scores.scores[0] / scores.counts[0], int(scores.counts[0]), clips


def format_topk(probs: torch.Tensor, names: list[str], k: int) -> list[str]:
    """``  1. name   0.8123`` lines for the ``k`` most probable classes (k clipped to the class count)."""
    top = probs.topk(min(k, probs.numel()))
    shown = [names[i] for i in top.indices.tolist()]
    width = max(map(len, shown))
    return [f"{rank:>3}. {name:<{width}}  {p:.4f}" for rank, (name, p) in enumerate(zip(shown, top.values.tolist()), 1)]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = read_config(args.config, args.weights)
        model = load_model(cfg, args.weights)
        num_classes = cfg.model.num_classes
        names = read_labels(args.labels, num_classes) if args.labels else [str(i) for i in range(num_classes)]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        probs, scored, clips = predict(model, cfg, args.video, args.views, device)
    except PredictError as err:
        print(err, file=sys.stderr)
        return err.status
    expected = clips.views_per_video
    views = f"{scored} views" if scored == expected else f"{scored} of {expected} views"
    print(f"{args.video}: {views} ({clips.temporal_views} temporal x {clips.num_spatial_views} spatial)")
    print("\n".join(format_topk(probs, names, args.topk)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

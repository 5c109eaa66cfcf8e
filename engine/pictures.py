"""PNG pictures of a run: reconstructions (original / masked / reconstructed frames) and the loss curve.

Drawn with Pillow (a torchvision dependency), so no plotting library is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def _frames_row(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) in [0, 1] → one uint8 (H, T·W, C) strip of its frames, side by side."""
    strip = video.permute(2, 1, 3, 0).reshape(video.shape[2], -1, video.shape[0])
    return (strip.clamp(0, 1) * 255).round().byte().cpu().numpy()


def reconstruction_picture(original: torch.Tensor, masked: torch.Tensor, reconstructed: torch.Tensor,
                           max_clips: int = 4, scale: int = 2) -> Image.Image:
    """Rows per clip: the input, the input with hidden tubelets greyed, the model's reconstruction.

    All arguments are pixel clips (B, C, T, H, W) in [0, 1]; ``scale`` enlarges small clips for viewing.
    """
    rows = []
    for clip in range(min(max_clips, original.shape[0])):
        for video in (original, masked, reconstructed):
            rows.append(_frames_row(video[clip]))
        rows.append(np.full((4, rows[-1].shape[1], rows[-1].shape[2]), 255, np.uint8))  # separator
    picture = Image.fromarray(np.concatenate(rows[:-1]))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def reconstruction_from_prediction(model, video: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                                   decoder_mask=None) -> Image.Image:
    """The picture of a VideoMAE forward that was already run: ``pred`` for the normalized ``video``."""
    reconstructed = model.reconstruct(video, pred, mask, decoder_mask)
    original = (video.float() * model.pixel_std + model.pixel_mean).clamp(0, 1)
    masked = torch.where(model.pixel_mask(mask, video), torch.full_like(original, 0.5), original)
    return reconstruction_picture(original, masked, reconstructed)


def save_reconstructions(model, video: torch.Tensor, mask: torch.Tensor, path: str | os.PathLike,
                         decoder_mask=None) -> Path:
    """Run ``model`` (a bare VideoMAE) on a normalized batch and save its reconstruction picture to ``path``."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, pred, _ = model(video, mask, decoder_mask)
        picture = reconstruction_from_prediction(model, video, pred, mask, decoder_mask)
    model.train(was_training)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def save_loss_curve(steps: list[int], losses: list[float], path: str | os.PathLike,
                    size: tuple[int, int] = (640, 400)) -> Path:
    """A plain line plot of the training loss against the step, with min/max labels on the y axis."""
    width, height = size
    margin = 50
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    draw.rectangle([margin, margin // 2, width - margin // 2, height - margin], outline="black")
    if len(steps) >= 2:
        lo, hi = min(losses), max(losses)
        span_y, span_x = (hi - lo) or 1.0, (steps[-1] - steps[0]) or 1

        def point(step, loss):
            x = margin + (step - steps[0]) / span_x * (width - 1.5 * margin)
            y = height - margin - (loss - lo) / span_y * (height - 1.5 * margin)
            return x, y

        draw.line([point(s, l) for s, l in zip(steps, losses)], fill=(31, 119, 180), width=2)
        draw.text((4, margin // 2), f"{hi:.3g}", fill="black")
        draw.text((4, height - margin - 10), f"{lo:.3g}", fill="black")
        draw.text((margin, height - margin + 8), f"step {steps[0]}", fill="black")
        draw.text((width - margin * 2, height - margin + 8), f"step {steps[-1]}", fill="black")
    draw.text((width // 2 - 30, 4), "training loss", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path

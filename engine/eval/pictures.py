"""PNG pictures of a run: what a VideoMAE sees, is asked to predict and predicts; and the loss curve.

Drawn with Pillow (a torchvision dependency), so no plotting library is needed.

The reconstruction picture shows values in the spaces the model works in rather than only pixels: a model trained
on small signals (clips with their mean over time removed, pixel targets of a few hundredths) predicts values that
look like a flat grey fill at plain contrast although they carry structure. Every group of rows therefore has one
affine value → brightness map (a :class:`DisplayScale`), amplified when the values it shows span little, and the
legend under the picture says which value maps to black, grey and white.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from models.videomae import unpatchify

# ---- colour scales -------------------------------------------------------------------------------------------

# Amplifications are taken from a 1-2-5 series so the factor written on the picture is a round number.
_GAINS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# The spread of a group of values is the 99.9th percentile of their distance from the centre: a few outlying pixels
# (an object edge) saturate instead of squashing everything else into grey.
_SPREAD_QUANTILE = 0.999


@dataclass(frozen=True)
class DisplayScale:
    """``centre[c] - half_range`` → black, ``centre[c]`` → mid grey, ``centre[c] + half_range`` → white, for
    every channel ``c`` with the same ``half_range``, so that equal differences look equal in every channel.

    ``pixel``: the values are pixel intensities (``gain`` is the contrast relative to showing them as they are);
    otherwise they are in the units of a per-patch normalized target (standard deviations of the patch).
    """

    centre: tuple[float, ...]
    half_range: float
    pixel: bool

    @property
    def gain(self) -> float:
        """Contrast relative to plain pixels (0 → black, 1 → white); 1 for normalized values."""
        return 0.5 / self.half_range if self.pixel else 1.0

    @property
    def is_identity(self) -> bool:
        return self.pixel and self.half_range == 0.5 and all(c == 0.5 for c in self.centre)

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) values → display brightness in [0, 1]."""
        centre = torch.tensor(self.centre, dtype=torch.float32).view(1, -1, *[1] * (values.dim() - 2))
        return ((values.float() - centre) / (2 * self.half_range) + 0.5).clamp(0, 1)


def _nice_at_least(value: float) -> float:
    """The smallest number of the 1-2-5 series (…, 0.5, 1, 2, 5, 10, …) that is >= ``value`` (> 0)."""
    exponent = math.floor(math.log10(value))
    for mantissa in (1, 2, 5, 10):
        candidate = mantissa * 10.0**exponent
        if candidate >= value * (1 - 1e-9):
            return float(f"{candidate:.12g}")
    return 10.0 ** (exponent + 1)


def choose_scale(values: torch.Tensor, pixel: bool, centre_at_zero: Optional[bool] = None) -> DisplayScale:
    """The display scale for ``values`` (C, M): channel first, any number of values per channel.

    Pixels are shown as they are when they spread over a good part of [0, 1]; otherwise they are amplified by the
    largest round factor that keeps 99.9% of them inside black..white, around each channel's median (so that a
    per-channel offset such as the normalization mean does not turn into a strong colour cast). Normalized values
    are shown around zero (their patch mean) over a round range that holds 99.9% of them. ``centre_at_zero=False``
    centres normalized values at their medians too (a prediction shown on its own scale).
    """
    values = values.detach().reshape(values.shape[0], -1)
    if values.shape[1] > 1_000_000:  # large clips: an evenly strided sample has the same median and percentile
        values = values[:, :: values.shape[1] // 500_000]
    values = values.float().cpu()
    channels = values.shape[0]
    if centre_at_zero is None:
        centre_at_zero = not pixel
    values = values[:, torch.isfinite(values).all(dim=0)]  # a diverged model's NaNs must not decide the scale
    if values.shape[1] == 0:
        return DisplayScale((0.5,) * channels, 0.5, True) if pixel else DisplayScale((0.0,) * channels, 1.0, False)
    if centre_at_zero:
        centre = torch.zeros(channels)
    else:
        centre = values.median(dim=1).values
    distance = (values - centre[:, None]).abs().flatten().numpy()
    spread = float(np.quantile(distance, _SPREAD_QUANTILE))
    if pixel:
        gain = max([g for g in _GAINS if g * spread <= 0.5] or [_GAINS[0]])
        if gain == 1:
            return DisplayScale((0.5,) * channels, 0.5, True)
        return DisplayScale(tuple(centre.tolist()), 0.5 / gain, True)
    half_range = _nice_at_least(max(spread, 1e-3))
    return DisplayScale(tuple(centre.tolist()), half_range, False)


def _scale_words(scale: DisplayScale) -> str:
    """A short description for a row title: the amplification, or the range shown."""
    if scale.pixel:
        return "plain contrast" if scale.gain == 1 else f"contrast x{scale.gain:g}"
    return f"range ±{scale.half_range:g}"


# ---- drawing helpers -----------------------------------------------------------------------------------------

_TITLE_WIDTH = 170  # the column of row titles left of the frames
_FRAME_GAP = 2  # white pixels between frames, so frames of a clip with its still background removed stay apart
_ROW_GAP = 3  # between the rows of one clip
_CHECKER = 4  # side of the checker squares that mean "no value here"
_CHECKER_COLOURS = (np.array([236, 236, 236], np.uint8), np.array([200, 200, 200], np.uint8))
_TEXT = (0, 0, 0)
_FAINT = (90, 90, 90)


def _font(size: int = 11) -> ImageFont.ImageFont:
    return ImageFont.load_default(size)


def _text_width(font, text: str) -> float:
    return font.getlength(text)


def _wrap(font, text: str, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (a single word longer than that stays whole)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        words, line = paragraph.split(), ""
        for word in words:
            trial = f"{line} {word}".strip()
            if line and _text_width(font, trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ag")[1::2]
    return int(bottom - top) + 3


def _checker(height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 checkerboard: the mark for "no value" (hidden from the encoder, not scored)."""
    ys, xs = np.indices((height, width))
    light = ((ys // _CHECKER + xs // _CHECKER) % 2 == 0)[..., None]
    return np.where(light, _CHECKER_COLOURS[0], _CHECKER_COLOURS[1])


def _strip(display: torch.Tensor, empty: Optional[torch.Tensor], scale: int) -> np.ndarray:
    """One row of a clip: display values (C, T, H, W) in [0, 1] → uint8 (H·s, T·(W·s + gap) - gap, 3) with the
    frames side by side, enlarged ``scale`` times; pixels where ``empty`` (T, H, W) is True are checkered."""
    c, t, h, w = display.shape
    frames = (display.float().clamp(0, 1) * 255).round().byte().cpu().numpy()  # (C, T, H, W)
    frames = np.repeat(frames, 3, axis=0) if c == 1 else frames[:3]
    frames = frames.transpose(1, 2, 3, 0).repeat(scale, axis=1).repeat(scale, axis=2)  # (T, Hs, Ws, 3)
    if empty is not None:
        holes = empty.cpu().numpy().repeat(scale, axis=1).repeat(scale, axis=2)
        frames = np.where(holes[..., None], _checker(h * scale, w * scale)[None], frames)
    hs, ws = h * scale, w * scale
    out = np.full((hs, t * (ws + _FRAME_GAP) - _FRAME_GAP, 3), 255, np.uint8)
    for i in range(t):
        out[:, i * (ws + _FRAME_GAP) : i * (ws + _FRAME_GAP) + ws] = frames[i]
    return out


def default_scale(height: int) -> int:
    """Enlargement that shows a frame at least 64 pixels tall, so 8-pixel patches of small clips stay visible."""
    return max(1, math.ceil(64 / height))


@dataclass
class PictureRow:
    """One titled row of the reconstruction picture, for every clip."""

    lines: list[str]  # title: the row's name, then what it shows and on which scale
    display: torch.Tensor  # (B, C, T, H, W) brightness in [0, 1], as painted
    empty: Optional[torch.Tensor]  # (B, T, H, W) bool: no value there (checkered)

    @property
    def name(self) -> str:
        return self.lines[0]


@dataclass
class _Legend:
    rows: str  # which rows use the scale
    scale: DisplayScale
    unit: str  # what the values are


def _draw_bar(draw: ImageDraw.ImageDraw, font, x: int, y: int, scale: DisplayScale, width: int = 256,
              height: int = 12) -> None:
    """A black → white ramp with the values of its ends, quarters and middle written under it."""
    for i in range(width):
        level = round(255 * i / (width - 1))
        draw.line([(x + i, y), (x + i, y + height - 1)], fill=(level, level, level))
    draw.rectangle([x - 1, y - 1, x + width, y + height], outline=_TEXT)
    same_centre = len(set(scale.centre)) == 1
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        offset = (2 * fraction - 1) * scale.half_range
        if same_centre:
            label = f"{scale.centre[0] + offset:.4g}"
        else:  # a different centre per channel: the ticks are distances from it
            label = "centre" if fraction == 0.5 else f"{offset:+.3g}"
        tx = x + fraction * (width - 1)
        draw.line([(tx, y + height), (tx, y + height + 3)], fill=_TEXT)
        draw.text((tx - _text_width(font, label) / 2, y + height + 4), label, fill=_TEXT, font=font)


def _legend_text(legend: _Legend) -> str:
    scale = legend.scale
    words = f"{legend.rows}: {legend.unit}"
    if scale.pixel and not scale.is_identity:
        words += f", contrast x{scale.gain:g}"
    if len(set(scale.centre)) > 1:
        centre = ", ".join(f"{c:.4g}" for c in scale.centre)
        words += f"; centre per channel ({centre})"
    return words


# ---- the reconstruction picture ------------------------------------------------------------------------------


def _compose(caption: str, rows: list[PictureRow], legends: list[_Legend], scale: int) -> Image.Image:
    """Caption, frame numbers, then per clip its titled rows, then the legends of the colour scales."""
    font, small = _font(11), _font(10)
    line = _line_height(font)
    clips, _, frames, height, width = rows[0].display.shape
    strip_width = frames * (width * scale + _FRAME_GAP) - _FRAME_GAP
    total_width = max(_TITLE_WIDTH + strip_width, 560)
    caption_lines = _wrap(font, caption, total_width - 8)
    caption_height = line * len(caption_lines) + 4
    header_height = line + 2  # frame numbers
    clip_label_height = line + 6
    row_height = height * scale
    clip_height = clip_label_height + len(rows) * (row_height + _ROW_GAP)
    legend_height = 12 + sum(2 * line + 12 + line + 8 for _ in legends) + line + 4
    total_height = caption_height + header_height + clips * clip_height + legend_height
    picture = Image.new("RGB", (total_width, total_height), "white")
    draw = ImageDraw.Draw(picture)

    y = 2
    for text in caption_lines:
        draw.text((4, y), text, fill=_TEXT, font=font)
        y += line
    y = caption_height
    for t in range(frames):
        label = f"frame {t}" if width * scale >= _text_width(small, "frame 00") + 4 else f"{t}"
        x = _TITLE_WIDTH + t * (width * scale + _FRAME_GAP)
        draw.text((x + 2, y + 1), label, fill=_FAINT, font=small)
    y += header_height
    for clip in range(clips):
        draw.line([(0, y + 1), (total_width, y + 1)], fill=(170, 170, 170))
        draw.text((4, y + 3), f"clip {clip}", fill=_TEXT, font=font)
        y += clip_label_height
        for row in rows:
            strip = _strip(row.display[clip], None if row.empty is None else row.empty[clip], scale)
            picture.paste(Image.fromarray(strip), (_TITLE_WIDTH, y))
            # Titles are drawn on their own tile, so a title longer than the row is cut off instead of
            # running into the next one.
            tile = Image.new("RGB", (_TITLE_WIDTH - 6, row_height), "white")
            tile_draw = ImageDraw.Draw(tile)
            ty = 0
            for i, text in enumerate(row.lines):
                for part in _wrap(font if i == 0 else small, text, _TITLE_WIDTH - 10):
                    tile_draw.text((0, ty), part, fill=_TEXT if i == 0 else _FAINT, font=font if i == 0 else small)
                    ty += line
            picture.paste(tile, (4, y))
            y += row_height + _ROW_GAP

    y += 8
    draw.line([(0, y - 4), (total_width, y - 4)], fill=(170, 170, 170))
    for legend in legends:
        texts = _wrap(small, _legend_text(legend), total_width - 8)[:2]
        for i, text in enumerate(texts):
            draw.text((4, y + i * line), text, fill=_TEXT, font=small)
        y += 2 * line
        _draw_bar(draw, small, 24, y, legend.scale)
        y += 12 + line + 8
    swatch = Image.fromarray(_checker(12, 24))
    picture.paste(swatch, (12, y))
    draw.text((44, y), "no value: hidden from the encoder (input rows) or not scored by the loss (target rows)",
              fill=_TEXT, font=small)
    return picture


def _tokens_to_video(model, tokens: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Per-token values (B, N, pred_frames·patch²·C) laid out as a clip (B, C, T, H, W); a target of one time
    slice per tubelet is shown on every frame of its tubelet."""
    grid = model.encoder.patch_embed.grid(video)
    if model.pred_frames == model.tubelet:
        return unpatchify(tokens, grid, model.tubelet, model.patch)
    slices = unpatchify(tokens, grid, 1, model.patch)
    return slices.repeat_interleave(model.tubelet, dim=2)


def _looks_clip_mean_removed(video: torch.Tensor) -> bool:
    """Whether every pixel of every clip averages to ~0 over time (``subtract_clip_mean``), up to the rounding of
    a bfloat16 input."""
    mean = video.float().mean(dim=2).abs().max()
    return bool(video.shape[2] > 1 and mean <= 0.02 * video.float().abs().max() + 1e-6)


def reconstruction_from_prediction(model, video: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                                   decoder_mask=None, *, max_clips: int = 4, scale: Optional[int] = None,
                                   subtract_clip_mean: Optional[bool] = None,
                                   prediction_own_scale: Optional[bool] = None) -> Image.Image:
    """The picture of a VideoMAE forward that was already run: ``pred`` for the normalized ``video``.

    Rows per clip (the first ``max_clips``), described at :func:`reconstruction_rows`; under them a legend per
    colour scale. ``scale`` enlarges the frames (None: to at least 64 pixels).
    """
    rows, legends, caption = _reconstruction_parts(model, video, pred, mask, decoder_mask, max_clips,
                                                   subtract_clip_mean, prediction_own_scale)
    return _compose(caption, rows, legends, default_scale(video.shape[3]) if scale is None else scale)


def reconstruction_rows(model, video: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, decoder_mask=None, *,
                        max_clips: int = 4, subtract_clip_mean: Optional[bool] = None,
                        prediction_own_scale: Optional[bool] = None) -> list[PictureRow]:
    """The rows of :func:`reconstruction_from_prediction`, as painted:

    * input: the clip exactly as the model receives it (normalization undone per channel so that its numbers are
      pixel values; with ``subtract_clip_mean`` the still background is gone and only motion is left);
    * encoder input: the same with the tubelets hidden from the encoder checkered;
    * target and prediction: what the loss compares, in the target space (per-patch normalized pixels, or pixels
      with ``normalize: none``), on the scored tubelets, on ONE shared scale chosen from the target's spread;
    * prediction, own scale: only when the prediction spans far less than the target (None = then), so that its
      structure is visible; the title says how much more it is amplified;
    * reconstruction: visible tubelets from the input and decoded ones from the prediction mapped back to
      pixels, on the input's scale.

    ``subtract_clip_mean`` (None: detected from ``video``) only changes the words.
    """
    return _reconstruction_parts(model, video, pred, mask, decoder_mask, max_clips, subtract_clip_mean,
                                 prediction_own_scale)[0]


def _input_parts(model, video, mask, subtract_clip_mean) -> tuple[list[PictureRow], list[_Legend], str]:
    """The rows of a model whose targets are not pixels (HOG, tokens): its input and what the encoder saw; such a
    target has no picture of its own."""
    with torch.no_grad():
        pixels = model.pixels(video).cpu()
        hidden = model.pixel_mask(mask, video)[:, 0].cpu()
    if subtract_clip_mean is None:
        subtract_clip_mean = _looks_clip_mean_removed(video)
    scale = choose_scale(pixels.transpose(0, 1), pixel=True)
    words = "normalization undone" + (", clip mean over time removed" if subtract_clip_mean else "")
    rows = [PictureRow(["input", f"as the model gets it ({words}); {_scale_words(scale)}"], scale.apply(pixels), None),
            PictureRow(["encoder input", f"visible tubelets only; {_scale_words(scale)}"], scale.apply(pixels), hidden)]
    what = {"hog": "histograms of oriented gradients", "tokens": "the tokenizer's codes"}[model.cfg.target.kind]
    caption = (f"VideoMAE with {model.cfg.target.kind} targets: {video.shape[0]} clip(s), "
               f"{mask.float().mean().item():.0%} of the tubelets hidden; the decoder predicts {what} of the hidden "
               "ones, which have no picture here")
    return rows, [_Legend("input, encoder input", scale, "pixel values of the model input")], caption


def _reconstruction_parts(model, video, pred, mask, decoder_mask, max_clips, subtract_clip_mean,
                          prediction_own_scale) -> tuple[list[PictureRow], list[_Legend], str]:
    count = min(max_clips, video.shape[0])
    video, pred, mask = video[:count], pred[:count], mask[:count]
    decoder_mask = None if decoder_mask is None else decoder_mask[:count]
    if model.cfg.target.kind != "pixels":
        return _input_parts(model, video, mask, subtract_clip_mean)
    with torch.no_grad():
        pixels = model.pixels(video).cpu()  # the model input in pixel units
        reconstructed = model.reconstruct(video, pred, mask, decoder_mask).float().cpu()
        targets = model.targets(video).float().cpu()  # (B, N, P): what the loss compares the prediction with
        hidden = model.pixel_mask(mask, video)[:, 0].cpu()
        decoded = (mask if decoder_mask is None else ~decoder_mask).cpu()
        mask = mask.cpu()
        scored = mask & decoded
        predicted = torch.zeros_like(targets)
        predicted[decoded] = pred.detach().float().cpu().reshape(-1, targets.shape[-1])
        unscored = ~model.pixel_mask(scored.to(video.device), video)[:, 0].cpu()
        dropped = model.pixel_mask((mask & ~decoded).to(video.device), video)[:, 0].cpu()
    target_video = _tokens_to_video(model, targets, video.cpu())
    pred_video = _tokens_to_video(model, predicted, video.cpu())
    channels = video.shape[1]

    def per_channel(values: torch.Tensor) -> torch.Tensor:  # (B, N, P·C) tokens → (C, B·N·P) values
        return values.reshape(*values.shape[:2], -1, channels).permute(3, 0, 1, 2).reshape(channels, -1)

    normalize = model.cfg.target.normalize
    pixel_target = normalize == "none"
    target_values, predicted_values = per_channel(targets[scored][None]), per_channel(predicted[scored][None])
    input_scale = choose_scale(pixels.transpose(0, 1), pixel=True)
    target_scale = choose_scale(target_values, pixel=pixel_target)
    own_scale = choose_scale(predicted_values, pixel=pixel_target, centre_at_zero=False)
    if prediction_own_scale is None:
        prediction_own_scale = bool(scored.any()) and own_scale.half_range * 4 <= target_scale.half_range
    if subtract_clip_mean is None:
        subtract_clip_mean = _looks_clip_mean_removed(video)

    target_unit = "pixels" if pixel_target else f"per-patch normalized pixels ({normalize})"
    slice_words = "" if model.pred_frames == model.tubelet else ", first frame of each tubelet"
    input_words = "normalization undone" + (", clip mean over time removed" if subtract_clip_mean else "")
    spreads = f"RMS spread: target {_rms_spread(target_values):.2g}, prediction {_rms_spread(predicted_values):.2g}"
    rows = [
        PictureRow(["input", f"as the model gets it ({input_words}); {_scale_words(input_scale)}"],
                   input_scale.apply(pixels), None),
        PictureRow(["encoder input", f"visible tubelets only; {_scale_words(input_scale)}"],
                   input_scale.apply(pixels), hidden),
        PictureRow(["target", f"{target_unit}{slice_words}; {_scale_words(target_scale)}"],
                   target_scale.apply(target_video), unscored),
        PictureRow(["prediction", f"same scale as target; {_scale_words(target_scale)}; {spreads}"],
                   target_scale.apply(pred_video), unscored),
    ]
    legends = [
        _Legend("input, encoder input, reconstruction", input_scale,
                "pixel values of the model input (normalization undone)"),
        _Legend("target, prediction", target_scale, target_unit),
    ]
    if prediction_own_scale:
        ratio = target_scale.half_range / own_scale.half_range
        rows.append(PictureRow(["prediction, own scale",
                                f"{ratio:.3g}x the target's contrast; shows its structure, not its size"],
                               own_scale.apply(pred_video), unscored))
        legends.append(_Legend("prediction, own scale", own_scale, target_unit))
    how = "prediction mapped back with each patch's mean and std" if not pixel_target else "prediction"
    rows.append(PictureRow(["reconstruction", f"visible: input; hidden: {how}; {_scale_words(input_scale)}"],
                           input_scale.apply(reconstructed), dropped))

    grid = model.encoder.patch_embed.grid(video)
    hidden_share = mask.float().mean().item()
    caption = (f"VideoMAE: {count} clip(s), {video.shape[2]} frames of {video.shape[3]}x{video.shape[4]}, "
               f"tubelets {model.tubelet}x{model.patch}x{model.patch} ({math.prod(grid)} per clip), "
               f"{hidden_share:.0%} hidden from the encoder; the loss compares prediction and target on the "
               f"{'hidden' if decoder_mask is None else 'hidden and decoded'} tubelets "
               f"(mean squared error there: {_scored_mse(targets, predicted, scored):.4g}).")
    return rows, legends, caption


def _rms_spread(values: torch.Tensor) -> float:
    """Root mean square distance of (C, M) values from their channel means: how much there is to see."""
    if values.shape[1] == 0:
        return float("nan")
    return float((values - values.mean(dim=1, keepdim=True)).pow(2).mean().sqrt())


def _scored_mse(targets: torch.Tensor, predicted: torch.Tensor, scored: torch.Tensor) -> float:
    if not scored.any():
        return float("nan")
    return float(((targets[scored] - predicted[scored]) ** 2).mean())


def save_reconstructions(model, video: torch.Tensor, mask: torch.Tensor, path: str | os.PathLike,
                         decoder_mask=None, **picture_options) -> Path:
    """Run ``model`` (a bare VideoMAE) on a normalized batch and save its reconstruction picture to ``path``;
    ``picture_options`` go to :func:`reconstruction_from_prediction`."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, pred, _ = model(video, mask, decoder_mask)
        picture = reconstruction_from_prediction(model, video, pred, mask, decoder_mask, **picture_options)
    model.train(was_training)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


# ---- the loss curve ------------------------------------------------------------------------------------------


def use_log_scale(losses: Sequence[float], ratio: float = 3.0) -> bool:
    """A log loss axis when the (finite) losses are all positive and span more than ``ratio`` times: the late,
    slow part of the curve is then still readable next to the first steps."""
    finite = [float(v) for v in losses if math.isfinite(v)]
    if len(finite) < 2 or min(finite) <= 0:
        return False
    return max(finite) / min(finite) > ratio


def save_loss_curve(steps: list[int], losses: list[float], path: str | os.PathLike,
                    size: tuple[int, int] = (640, 400), log_scale: Optional[bool] = None) -> Path:
    """Training loss against the optimizer step, drawn by matplotlib; the loss axis is logarithmic when the losses
    span more than 3 times (``log_scale`` None: :func:`use_log_scale` decides). Non-finite losses are left out and
    counted in the title."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only: no display, whatever the machine has
    from matplotlib import pyplot as plt

    points = [(float(s), float(v)) for s, v in zip(steps, losses) if math.isfinite(v)]
    if log_scale is None:
        log_scale = use_log_scale([v for _, v in points])
    log = log_scale and bool(points) and min(v for _, v in points) > 0  # zero or negative values have no log
    title = "training loss" + (" (log scale)" if log else "")
    if points:
        title += f"; last {points[-1][1]:.4g} at step {points[-1][0]:g}"
    if len(points) < len(losses):
        title += f"; {len(losses) - len(points)} non-finite left out"
    dpi = 100
    figure, axes = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    try:
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) == 1 else None, linewidth=1.5)
        else:
            axes.text(0.02, 0.95, "no finite loss recorded", transform=axes.transAxes, va="top")
        if log:
            axes.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")  # 0.2, not 2 x 10^-1
            axes.yaxis.set_major_formatter(plain)
            axes.yaxis.set_minor_formatter(plain)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("training loss" + (" (log)" if log else ""))
        axes.grid(True, which="both", color="0.9")
        figure.tight_layout()
        figure.canvas.draw()
        picture = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3])
    finally:
        plt.close(figure)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path

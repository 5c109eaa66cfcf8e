"""Run pictures and metric records."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.eval.pictures import (
    choose_scale,
    reconstruction_from_prediction,
    reconstruction_rows,
    save_loss_curve,
    save_reconstructions,
    use_log_scale,
)
from engine.metrics import MetricsWriter, Throughput, read_metrics, utilization
from models.masking import tube_mask
from models.videomae import DecoderConfig, PretrainModelConfig, TargetConfig, VideoMAE
from models.vit import ViTConfig


def _model(frames=4, size=32, normalize="per_channel", target_frames="tubelet"):
    return VideoMAE(PretrainModelConfig(ViTConfig(arch="vit_debug", num_frames=frames, img_size=size, patch_size=8),
                                        DecoderConfig(depth=1), TargetConfig(normalize, target_frames)))


def normalized(model, pixels):
    """What the model is given for clips of ``pixels`` in [0, 1]."""
    mean, std = model.pixel_stats(pixels.device)
    return (pixels - mean) / std


def _scored_pixels(row, clip=0):
    """The painted values (C, M) of a row where it has values."""
    return row.display[clip][:, ~row.empty[clip]]


def test_reconstruction_rows_show_what_the_model_sees(tmp_path):
    model = _model()
    pixels = torch.rand(2, 3, 4, 32, 32)
    video, mask = normalized(model, pixels), tube_mask(2, (2, 4, 4), 0.5)
    path = save_reconstructions(model, video, mask, tmp_path / "vis" / "rec.png", prediction_own_scale=False)
    assert Image.open(path).mode == "RGB"
    assert model.training  # the picture does not leave the model in eval mode
    model.eval()
    with torch.no_grad():
        _, pred, _ = model(video, mask)
    rows = {row.name: row for row in reconstruction_rows(model, video, pred, mask, prediction_own_scale=False)}
    assert list(rows) == ["input", "encoder input", "target", "prediction", "reconstruction"]
    hidden = model.pixel_mask(mask, video)[:, 0]
    assert rows["input"].empty is None
    assert torch.equal(rows["encoder input"].empty, hidden)  # checkered where the encoder saw nothing
    assert torch.equal(rows["target"].empty, ~hidden) and torch.equal(rows["prediction"].empty, ~hidden)
    assert not rows["reconstruction"].empty.any()  # every hidden tubelet was decoded
    # pixels spanning [0, 1] are shown as they are: the input row is the clip itself
    assert torch.allclose(rows["input"].display, pixels, atol=1e-5)
    assert "plain contrast" in rows["input"].lines[1]
    # the target row is the model's own target (per-patch normalized), around 0 = grey
    target = model.targets(video)[mask]
    half_range = float(rows["target"].lines[1].split("range ±")[1])
    assert half_range >= 2  # per-patch normalized noise reaches beyond 2 standard deviations
    shown = _scored_pixels(rows["target"])
    assert abs(shown.mean() - 0.5) < 0.02
    assert float(shown.std()) == pytest.approx(float(target.std()) / (2 * half_range), rel=0.05)


def test_small_signal_is_amplified_on_one_scale_for_target_and_prediction():
    """A clip that varies by ±0.008 around grey (pixel targets): its target and a prediction of half its size
    must be visibly non-flat, on the same scale, with the factor written on the row."""
    model = _model(normalize="none")
    generator = torch.Generator().manual_seed(0)
    pixels = 0.45 + 0.008 * (2 * torch.rand(2, 3, 4, 32, 32, generator=generator) - 1)
    video = normalized(model, pixels)
    mask = tube_mask(2, (2, 4, 4), 0.5, generator=generator)
    target = model.targets(video)[mask].reshape(2, -1, 2 * 8 * 8 * 3)
    centre = target.mean()
    pred = centre + 0.5 * (target - centre)
    rows = {row.name: row for row in reconstruction_rows(model, video, pred, mask)}
    shown_target, shown_pred = _scored_pixels(rows["target"]), _scored_pixels(rows["prediction"])
    assert shown_target.std() > 0.15  # the raw values have a spread of ~0.005: without amplification ~flat
    assert 0.35 < shown_pred.std() / shown_target.std() < 0.65  # one scale: half the signal, half the contrast
    assert "x50" in " ".join(rows["target"].lines) and "x50" in " ".join(rows["prediction"].lines)
    assert "prediction, own scale" not in rows  # the prediction is not much smaller than the target
    # the same clip's pixels are amplified in the input rows as well
    assert rows["input"].display.std() > 0.2

    # a prediction 100 times weaker than the target looks flat on the shared scale; its own row shows it
    weak = centre + 1e-2 * (target - centre)
    rows = {row.name: row for row in reconstruction_rows(model, video, weak, mask)}
    assert _scored_pixels(rows["prediction"]).std() < 0.01
    own = rows["prediction, own scale"]
    assert _scored_pixels(own).std() > 0.2 and "x the target's contrast" in own.lines[1]


def test_choose_scale():
    plain = choose_scale(torch.rand(3, 1000), pixel=True)
    assert plain.is_identity and plain.gain == 1
    faint = choose_scale(torch.tensor([0.48, 0.45, 0.40])[:, None] + 0.004 * torch.randn(3, 10000), pixel=True)
    assert faint.gain == 20 and faint.centre == pytest.approx((0.48, 0.45, 0.40), abs=1e-3)
    values = faint.apply(torch.tensor([0.48, 0.45, 0.40]).view(1, 3, 1) + torch.tensor([-1.0, 0.0, 1.0]))
    # the centre is grey in every channel, far values clip
    assert values.flatten().tolist() == pytest.approx([0.0, 0.5, 1.0] * 3, abs=0.05)
    normalized = choose_scale(3 * torch.randn(3, 10000).clamp(-1, 1), pixel=False)
    assert normalized.centre == (0.0, 0.0, 0.0) and normalized.half_range == 5
    assert choose_scale(torch.empty(3, 0), pixel=False).half_range == 1


def test_picture_size_follows_clips_and_frames():
    def picture(frames, clips, own):
        model = _model(frames=frames)
        video = torch.rand(clips, 3, frames, 32, 32)
        mask = tube_mask(clips, (frames // 2, 4, 4), 0.5)
        with torch.no_grad():
            _, pred, _ = model(video, mask)
        return reconstruction_from_prediction(model, video, pred, mask, prediction_own_scale=own)

    one, two, three = (picture(8, n, False) for n in (1, 2, 3))
    clip_height = two.height - one.height
    assert three.height - two.height == clip_height and one.width == two.width == three.width
    # 32-pixel frames are enlarged ×2; 5 rows per clip, with a title band, so a clip is taller than its frames
    assert clip_height > 5 * 64
    # the optional sixth row adds one 64-pixel row (and a small gap) to every clip
    row_height = (picture(8, 2, True).height - picture(8, 1, True).height) - clip_height
    assert 64 <= row_height < 70
    wide = picture(16, 1, False)
    frame_width = (wide.width - one.width) / 8  # 8 more frames
    assert frame_width == int(frame_width) and 64 <= frame_width < 70
    assert wide.width > 16 * 64 + 100  # the frames and the column of titles


def test_dual_masking_and_first_frame_targets():
    model = _model(target_frames="first")
    video, mask = torch.rand(2, 3, 4, 32, 32), tube_mask(2, (2, 4, 4), 0.5)
    hidden_index = mask.nonzero()[:, 1].reshape(2, -1)
    decoder_mask = torch.zeros_like(mask)
    decoder_mask[torch.arange(2)[:, None], hidden_index[:, :4]] = True  # the decoder drops 4 hidden tokens each
    with torch.no_grad():
        _, pred, _ = model(video, mask, decoder_mask)
    rows = {row.name: row for row in reconstruction_rows(model, video, pred, mask, decoder_mask)}
    scored = model.pixel_mask(mask & ~decoder_mask, video)[:, 0]
    assert torch.equal(rows["target"].empty, ~scored)
    assert torch.equal(rows["reconstruction"].empty, model.pixel_mask(decoder_mask, video)[:, 0])
    # one target slice per tubelet, shown on both of its frames
    assert torch.equal(rows["target"].display[:, :, 0], rows["target"].display[:, :, 1])
    assert reconstruction_from_prediction(model, video, pred, mask, decoder_mask).width > 0


def test_titles_say_when_the_clip_mean_was_removed():
    model = _model(normalize="none")
    video = torch.randn(1, 3, 4, 32, 32)
    mask = tube_mask(1, (2, 4, 4), 0.5)
    pred = torch.zeros(1, int(mask.sum()), 2 * 8 * 8 * 3)
    removed = video - video.mean(dim=2, keepdim=True)
    assert "clip mean over time removed" in reconstruction_rows(model, removed, pred, mask)[0].lines[1]
    assert "clip mean" not in reconstruction_rows(model, video, pred, mask)[0].lines[1]


def test_log_scale_decision():
    assert use_log_scale([1.0, 0.5, 0.01])  # spans 100x
    assert not use_log_scale([0.37, 0.36, 0.35])  # flat
    assert not use_log_scale([1.0, 0.0, 0.01])  # zero has no logarithm
    assert not use_log_scale([1.0, float("nan"), 0.5])  # NaNs are left out, 2x remains
    assert not use_log_scale([0.3])


def test_loss_curve_is_written(tmp_path):
    steps = list(range(1, 101))
    for name, losses in [("log", [1.0 / s for s in steps]), ("flat", [0.3 + 0.001 * (s % 3) for s in steps]),
                         ("nan", [float("nan")] * 100), ("one", [0.5] + [float("nan")] * 99)]:
        picture = np.asarray(Image.open(save_loss_curve(steps, losses, tmp_path / f"{name}.png")))
        assert picture.shape == (400, 640, 3)
        assert (picture < 128).any()  # axes and labels are drawn
    assert Image.open(save_loss_curve([], [], tmp_path / "empty.png")).size == (640, 400)


def test_metrics_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(10, {"loss": torch.tensor(0.5), "lr": 1e-3})
    writer.write(20, {"loss": 0.25, "lr": 2e-3})
    writer.close()
    assert [r["loss"] for r in read_metrics(tmp_path)] == [0.5, 0.25]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 10
    assert list((tmp_path / "tb").iterdir())
    MetricsWriter(tmp_path / "other", enabled=False).write(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()


def test_throughput_and_utilization():
    meter = Throughput()
    meter.add(clips=8, data_wait=0.0)
    assert meter.read()["clips_per_s"] > 0
    values = utilization(train_flops_per_clip=1e9, clips_per_s=10, peak_flops=1e12)
    assert values == {"gflops_per_s": 10.0, "mfu": 0.01}
    assert "mfu" not in utilization(1e9, 10, None)

"""Run pictures and metric records."""

import json

import numpy as np
import torch
from PIL import Image

from engine.metrics import MetricsWriter, Throughput, read_metrics, utilization
from engine.pictures import save_loss_curve, save_reconstructions
from models.masking import tube_mask
from models.videomae import DecoderConfig, PretrainModelConfig, VideoMAE
from models.vit import ViTConfig


def test_reconstruction_picture_rows(tmp_path):
    model = VideoMAE(PretrainModelConfig(ViTConfig(arch="vit_debug", num_frames=4, img_size=32, patch_size=8),
                                         DecoderConfig(depth=1)))
    video, mask = torch.rand(2, 3, 4, 32, 32), tube_mask(2, (2, 4, 4), 0.5)
    path = save_reconstructions(model, video, mask, tmp_path / "vis" / "rec.png")
    picture = np.asarray(Image.open(path))
    # 2 clips × 3 rows of 32 px (+ one 4 px separator), frames side by side, enlarged ×2.
    assert picture.shape == (2 * (2 * 3 * 32 + 4), 2 * 4 * 32, 3)
    masked_row = picture[2 * 32 : 2 * 64]
    hidden = mask[0].reshape(2, 4, 4)[0]  # tube: the same in every frame
    r, c = map(int, hidden.nonzero()[0])
    assert (masked_row[2 * 8 * r + 3, 2 * 8 * c + 3] == 128).all()  # grey where the encoder saw nothing
    assert model.training  # the picture does not leave the model in eval mode


def test_loss_curve_is_written(tmp_path):
    path = save_loss_curve(list(range(10)), [1.0 / (i + 1) for i in range(10)], tmp_path / "loss.png")
    assert Image.open(path).size == (640, 400)


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

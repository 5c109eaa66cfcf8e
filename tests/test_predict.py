"""run_scripts/predict.py: top-k classes of one real video under a tiny fine-tuned classifier, on CPU."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.annotations import VideoRecord
from datasets.transforms import AugmentConfig
from datasets.video_dataset import DataConfig, EvalClips, collate_clips, normalize
from datasets.video_io import write_video
from engine.checkpoint import export_weights
from engine.config import save_config
from engine.tasks.finetune import FinetuneConfig, FinetuneModelConfig
from engine.tasks.pretrain import PretrainConfig
from models.videomae import PretrainModelConfig, VideoMAE
from models.vit import ViTConfig, build_classifier

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_scripts" / "predict.py"
NUM_CLASSES = 5
NAMES = ["move_left", "move_right", "move_up", "move_down", "rotate_clockwise"]
ENCODER = dict(arch="vit_debug", num_frames=8, img_size=32)

spec = importlib.util.spec_from_file_location("predict", SCRIPT)
predict = importlib.util.module_from_spec(spec)
spec.loader.exec_module(predict)


def finetune_config(output_dir) -> FinetuneConfig:
    # 2 temporal x 3 spatial test views; no annotation lists: predict reads only the video it is given.
    data = DataConfig(sampling_rate=2, test_temporal_views=2,
                      eval_augment=AugmentConfig(kind="eval", short_side=32, num_spatial_views=3))
    model = FinetuneModelConfig(encoder=ViTConfig(**ENCODER), num_classes=NUM_CLASSES)
    cfg = FinetuneConfig(model=model, data=data)
    cfg.run.output_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fine-tuning run's outputs: config.yaml, weights.pt (a random classifier with a confident head),
    labels.txt, and a 24-frame video of a bright square moving across noise."""
    root = tmp_path_factory.mktemp("predict")
    cfg = finetune_config(root / "run")
    save_config(cfg, cfg.run.output_dir)
    torch.manual_seed(1)
    model = build_classifier(cfg.model)
    torch.nn.init.normal_(model.head.weight, std=1.0)  # the fresh head's 0.001 scale gives near-uniform probs
    export_weights(model.state_dict(), root / "run" / "weights.pt")
    (root / "labels.txt").write_text("\n".join(NAMES) + "\n")
    rng = np.random.default_rng(0)
    frames = []
    for i in range(24):
        frame = rng.integers(0, 120, (48, 64, 3), dtype=np.uint8)
        frame[10:30, 2 * i : 2 * i + 16] = 250
        frames.append(frame)
    write_video(str(root / "clip.mp4"), frames, fps=25)
    return root


def call(argv, capsys) -> tuple[int, str, str]:
    status = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def parse(out: str) -> list[tuple[str, float]]:
    """(name, probability) of every ``  1. name   0.8123`` line."""
    rows = []
    for line in out.splitlines()[1:]:
        rank, name, prob = line.split()
        assert rank == f"{len(rows) + 1}."
        rows.append((name, float(prob)))
    return rows


def expected_probs(run_dir: Path, video: Path, temporal_views=None) -> torch.Tensor:
    """The softmax of every test view, averaged: computed here from the model and EvalClips directly."""
    cfg = finetune_config(run_dir)
    model = build_classifier(cfg.model)
    model.load_state_dict(torch.load(run_dir / "weights.pt", weights_only=True))
    clips = EvalClips([VideoRecord(str(video))], cfg.data, clip_len=8, size=32, temporal_views=temporal_views)
    batch = collate_clips([clips[i] for i in range(len(clips))])
    with torch.no_grad():
        logits = model.eval()(normalize(batch["video"], cfg.data.mean, cfg.data.std))
    assert logits.shape[0] == clips.temporal_views * 3
    return logits.softmax(dim=1).mean(dim=0)


def test_prints_the_view_averaged_softmax_in_descending_order(run, capsys):
    status, out, _ = call(["--weights", run / "run/weights.pt", "--video", run / "clip.mp4"], capsys)
    assert status == 0
    assert out.splitlines()[0] == f"{run / 'clip.mp4'}: 6 views (2 temporal x 3 spatial)"
    rows = parse(out)
    probs = expected_probs(run / "run", run / "clip.mp4")
    assert [int(name) for name, _ in rows] == probs.argsort(descending=True).tolist()  # config beside weights
    assert [p for _, p in rows] == pytest.approx(probs.sort(descending=True).values.tolist(), abs=1e-4)
    assert [p for _, p in rows] == sorted((p for _, p in rows), reverse=True)
    assert probs.max() - probs.min() > 0.05  # the check above is not trivially met by near-uniform scores


def test_views_labels_and_topk(run, capsys):
    argv = ["--weights", run / "run/weights.pt", "--video", run / "clip.mp4", "--config", run / "run/config.yaml",
            "--labels", run / "labels.txt", "--views", 1]
    status, out, _ = call([*argv, "--topk", 2], capsys)
    assert status == 0 and out.splitlines()[0].endswith(": 3 views (1 temporal x 3 spatial)")
    probs = expected_probs(run / "run", run / "clip.mp4", temporal_views=1)
    top = probs.topk(2)
    assert parse(out) == [(NAMES[i], pytest.approx(p, abs=1e-4)) for i, p in zip(top.indices.tolist(),
                                                                                 top.values.tolist())]
    status, out, _ = call([*argv, "--topk", 99], capsys)
    assert status == 0 and len(parse(out)) == NUM_CLASSES
    assert sorted(name for name, _ in parse(out)) == sorted(NAMES)


def test_a_label_file_of_another_size_is_an_error_naming_both_counts(run, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    status, out, err = call(["--weights", run / "run/weights.pt", "--video", run / "clip.mp4", "--labels", labels],
                            capsys)
    assert status == 2 and out == ""
    assert "3 classes" in err and f"has {NUM_CLASSES}" in err


@pytest.mark.parametrize("video", ["corrupt.mp4", "missing.mp4"])
def test_an_unreadable_video_exits_1_with_the_reason(run, tmp_path, capsys, video):
    path = tmp_path / video
    if video == "corrupt.mp4":
        path.write_bytes(b"\x00not a video" * 100)
    status, out, err = call(["--weights", run / "run/weights.pt", "--video", path], capsys)
    assert status == 1 and out == ""
    assert err.startswith(f"cannot read {path}: ") and len(err.strip()) > len(f"cannot read {path}: ")
    if video == "missing.mp4":
        assert "no such file" in err


def pretrain_weights(directory: Path) -> Path:
    model = VideoMAE(PretrainModelConfig(encoder=ViTConfig(**ENCODER)))
    return export_weights(model.state_dict(), directory / "weights.pt")


def test_pretraining_weights_exit_2(run, tmp_path, capsys):
    weights = pretrain_weights(tmp_path)
    status, out, err = call(["--weights", weights, "--video", run / "clip.mp4", "--config", run / "run/config.yaml"],
                            capsys)
    assert status == 2 and out == ""
    assert "no classification head" in err and "not fine-tuned" in err
    # A pre-training run's own config.yaml beside its weights says the same.
    save_config(PretrainConfig(model=PretrainModelConfig(encoder=ViTConfig(**ENCODER))), str(tmp_path))
    status, _, err = call(["--weights", weights, "--video", run / "clip.mp4"], capsys)
    assert status == 2 and "is a pre-training config" in err and "not fine-tuned" in err


def test_without_a_config_beside_the_weights_it_asks_for_one(run, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    weights.write_bytes((run / "run/weights.pt").read_bytes())
    status, _, err = call(["--weights", weights, "--video", run / "clip.mp4"], capsys)
    assert status == 2 and "config.yaml" in err and "--config" in err


@pytest.mark.e2e
def test_command_line(run):
    result = subprocess.run([sys.executable, str(SCRIPT), "--weights", str(run / "run/weights.pt"), "--video",
                             str(run / "clip.mp4"), "--labels", str(run / "labels.txt"), "--topk", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[1].startswith("  1. ") and lines[1].split()[1] in NAMES

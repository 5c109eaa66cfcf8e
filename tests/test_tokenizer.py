"""The video tokenizer: codes and their decoding, statistics against a direct count, training through the entry
point with kill -9 and an exact resume (the codebook's moving averages and dead-code restarts included), its export,
and the codebook-collapse warning."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import complete_steps
from engine.tokenizer import load_tokenizer
from models.tokenizer import TokenizerConfig, VQTokenizer, code_statistics
from test_finetune import data_root  # noqa: F401  (fixture: synthetic videos)
from test_pretrain import losses

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_scripts" / "tokenizer.py"
RECIPE = ROOT / "run_scripts" / "configs" / "tokenizer" / "tiny_cpu.yaml"
SPEC = "{num_videos: 40, frames: 16, num_classes: 4}"
TINY = TokenizerConfig(channels=[8, 16, 16], codebook_size=32, code_dim=8)


def test_codes_decode_to_the_reconstruction_and_tokenize_never_moves_the_codebook():
    torch.manual_seed(0)
    model = VQTokenizer(TINY).train()
    video = torch.randn(2, 3, 4, 32, 32)
    codebook = model.quantizer.codebook.clone()
    codes = model.tokenize(video)
    assert codes.shape == (2, 4, 4, 4) and codes.dtype == torch.int64 and model.training
    assert torch.equal(model.quantizer.codebook, codebook)  # eval inside: no moving average, no restart
    model.eval()
    with torch.no_grad():
        loss, mse, frame_codes, reconstruction = model(video[:, :, 1])
    assert torch.equal(frame_codes, codes[:, 1])
    torch.testing.assert_close(model.decode_codes(frame_codes), reconstruction)
    assert loss >= mse


def test_code_statistics_count_the_codes():
    codes = torch.tensor([[0, 0, 1], [1, 1, 3]])
    stats = code_statistics(codes, 8)
    assert stats["code_usage"] == pytest.approx(3 / 8)
    p = torch.tensor([2, 3, 1]) / 6
    assert stats["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


def command(out: Path, data_root: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--config", str(RECIPE), f"run.output_dir={out}", f"data.root={data_root}",
            f"data.synthetic={SPEC}", "model.channels=[8,16,16]", "model.codebook_size=32", "model.code_dim=8",
            "clip.num_frames=2", "clip.img_size=32", "batch.micro_batch=4", "batch.num_workers=0", "optim.epochs=2",
            "run.log_every=1", "run.save_every_epochs=1", "run.vis_every_epochs=1", *overrides]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_training_resumes_exactly_after_kill_9_and_exports_the_codebook(tmp_path, data_root):
    reference = tmp_path / "reference"
    run(command(reference, data_root, "run.save_every_steps=3"))
    out = tmp_path / "killed"
    process = subprocess.Popen(command(out, data_root, "run.save_every_steps=3"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if 9 in complete_steps(out) and max(losses(out), default=0) >= 10:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert max(complete_steps(out)) % 8, "not killed mid-epoch"
    run(command(out, data_root, "run.save_every_steps=3"))
    assert losses(out) == losses(reference)  # fp32 on CPU: the same losses, step by step
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [{k: r[k] for k in ("mse", "code_usage", "perplexity")} for r in records if "code_usage" in r]
    assert epochs == [{k: r[k] for k in ("mse", "code_usage", "perplexity")} for r in resumed if "code_usage" in r]
    assert len(epochs) == 2 and all(0 < e["code_usage"] <= 1 and e["perplexity"] >= 1 for e in epochs)
    a, b = (torch.load(path / "weights.pt", weights_only=True) for path in (reference, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "quantizer._codebook.embed" in a  # the codebook (a buffer, moved by moving averages) is exported
    tokenizer = load_tokenizer(TINY, str(reference / "weights.pt"))
    assert torch.equal(tokenizer.quantizer.codebook, a["quantizer._codebook.embed"][0])
    assert not tokenizer.training and not any(p.requires_grad for p in tokenizer.parameters())
    assert (reference / "vis" / "epoch_0002.png").is_file()


def test_a_collapsed_codebook_is_reported_loudly(tmp_path, data_root):
    result = run(command(tmp_path / "collapsed", data_root, "optim.epochs=1", "model.codebook_size=4096",
                         "model.dead_code_threshold=0", "collapse.min_code_usage=0.9"))
    assert "CODEBOOK COLLAPSE: epoch 1 used" in result.stderr
    usage = [json.loads(line)["code_usage"] for line in (tmp_path / "collapsed" / "metrics.jsonl").read_text()
             .splitlines() if "code_usage" in line]
    assert usage and usage[0] < 0.9

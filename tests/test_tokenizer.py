"""The video tokenizer: codes and their decoding, statistics against a direct count, training through the entry
point with kill -9 and an exact resume (the codebook's moving averages and dead-code restarts included), its export,
and the codebook-collapse warning."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import complete_steps
from engine.frozen import load_tokenizer
from models.tokenizer import TokenizerConfig, VQTokenizer, code_statistics

from helpers import CONFIGS, ROOT, SYNTHETIC, entry_command, kill_after_checkpoint, losses, run

SCRIPT = ROOT / "run_scripts" / "tokenizer.py"
RECIPE = CONFIGS / "tokenizer" / "tiny_cpu.yaml"
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
    return entry_command("tokenizer.py", RECIPE, out, f"data.root={data_root}", f"data.synthetic={SYNTHETIC}",
            "model.channels=[8,16,16]", "model.codebook_size=32", "model.code_dim=8",
            "clip.num_frames=2", "clip.img_size=32", "batch.micro_batch=4", "batch.num_workers=0", "optim.epochs=2",
            "run.log_every=1", "run.save_every_epochs=1", "run.vis_every_epochs=1", *overrides)


@pytest.mark.e2e
def test_training_resumes_exactly_after_kill_9_and_exports_the_codebook(tmp_path, data_root):
    reference = tmp_path / "reference"
    run(command(reference, data_root, "run.save_every_steps=3"))
    out = tmp_path / "killed"
    process = subprocess.Popen(command(out, data_root, "run.save_every_steps=3"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_after_checkpoint(process, out, 9, 10)
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


@pytest.mark.e2e
def test_a_collapsed_codebook_is_reported_loudly(tmp_path, data_root):
    result = run(command(tmp_path / "collapsed", data_root, "optim.epochs=1", "model.codebook_size=4096",
                         "model.dead_code_threshold=0", "collapse.min_code_usage=0.9"))
    assert "CODEBOOK COLLAPSE: epoch 1 used" in result.stderr
    usage = [json.loads(line)["code_usage"] for line in (tmp_path / "collapsed" / "metrics.jsonl").read_text()
             .splitlines() if "code_usage" in line]
    assert usage and usage[0] < 0.9


# ---- token targets of the masked autoencoder -------------------------------------------------------------------


def token_model(frames: str, patch: int = 16):
    from models.videomae import PretrainModelConfig, TargetConfig, VideoMAE
    from models.vit import ViTConfig

    torch.manual_seed(0)
    tokenizer = VQTokenizer(TINY)
    encoder = ViTConfig(arch="vit_debug", num_frames=4, img_size=32, patch_size=patch, tubelet_size=2)
    cfg = PretrainModelConfig(encoder, target=TargetConfig(kind="tokens", frames=frames, tokenizer="unused.pt"))
    return VideoMAE(cfg, tokenizer=tokenizer), tokenizer


@pytest.mark.parametrize("frames, per_token", [("tubelet", 2), ("first", 1)])
def test_a_known_code_map_is_the_target_at_the_right_positions(frames, per_token):
    model, tokenizer = token_model(frames)
    video = torch.randn(2, 3, 4, 32, 32)
    seen = {}

    def known_codes(clip):  # code of (b, t, y, x) = a different number everywhere, remembered per input frame
        seen["frames"] = clip.shape[2]
        b, _, t, h, w = clip.shape
        index = torch.arange(b * t * (h // 8) * (w // 8)).reshape(b, t, h // 8, w // 8)
        return index % TINY.codebook_size

    tokenizer.tokenize = known_codes
    targets = model.targets(video)  # (B, N = 2 x 2 x 2 tokens, per_token frames x 2 x 2 codes)
    assert seen["frames"] == (4 if frames == "tubelet" else 2) and targets.shape == (2, 8, per_token * 4)
    codes = known_codes(video if frames == "tubelet" else video[:, :, ::2])
    for b in range(2):
        for t in range(2):
            for y in range(2):
                for x in range(2):
                    token = t * 4 + y * 2 + x
                    expected = [codes[b, t * per_token + f, 2 * y + cy, 2 * x + cx]
                                for f in range(per_token) for cy in range(2) for cx in range(2)]
                    assert targets[b, token].tolist() == [int(c) for c in expected], (b, t, y, x)


def test_token_targets_are_cross_entropy_on_the_hidden_positions_and_the_tokenizer_stays_frozen_and_unsaved():
    from models.masking import MaskConfig, build_mask_generator

    model, tokenizer = token_model("first")
    assert model.decoder.head.out_features == 4 * TINY.codebook_size  # 2 x 2 codes, a logit per code each
    tokenizer_state = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    assert not any(k.startswith("tokenizer") for k in model.state_dict())
    assert all(p is not q for p in model.parameters() for q in tokenizer.parameters())
    video = torch.randn(2, 3, 4, 32, 32)
    mask, _ = build_mask_generator(MaskConfig(kind="random", ratio=0.75), (2, 2, 2))(2, torch.device("cpu"),
                                                                                    torch.Generator())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss, pred, _ = model(video, mask)
    codes = model.targets(video)[mask].reshape(2, -1, 4)
    expected = torch.nn.functional.cross_entropy(pred.reshape(-1, TINY.codebook_size), codes.reshape(-1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    optimizer.step()
    model.to(torch.bfloat16)  # what a bf16 engine does to the model: the tokenizer keeps float32
    assert all(v.dtype == torch.float32 for v in tokenizer.state_dict().values() if v.is_floating_point())
    assert all(torch.equal(v, tokenizer_state[k]) for k, v in tokenizer.state_dict().items())


@pytest.mark.e2e
def test_pretraining_on_tokens_trains_without_saving_the_tokenizer(tmp_path, data_root):
    tokenizer_run = tmp_path / "tokenizer"
    run(command(tokenizer_run, data_root, "optim.epochs=1", "clip.img_size=64", "run.vis_every_epochs=0"))
    before = (tokenizer_run / "weights.pt").read_bytes()
    out = tmp_path / "pretrain"
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_scripts" / "pretrain.py"), "--config",
         str(ROOT / "run_scripts" / "configs" / "pretrain" / "tiny_cpu.yaml"), f"run.output_dir={out}",
         f"data.root={data_root}", f"data.synthetic={SYNTHETIC}", "batch.micro_batch=8", "batch.num_workers=0",
         "optim.epochs=1", "optim.warmup_epochs=0", "run.vis_every_epochs=0", "run.log_every=1",
         "model.target.kind=tokens", f"model.target.tokenizer={tokenizer_run / 'weights.pt'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "token targets: the frozen tokenizer" in result.stderr
    first = min(losses(out).items())[1]
    assert abs(first - torch.log(torch.tensor(32.0)).item()) < 1.0  # cross-entropy over 32 codes starts near ln 32
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert not any("quantizer" in k or k.startswith("tokenizer") for k in weights)
    assert weights["decoder.head.weight"].shape[0] == 2 * 32  # a tubelet's 2 frames x 1 code x 32 logits
    assert (tokenizer_run / "weights.pt").read_bytes() == before


@pytest.mark.parametrize("text, says", [("model: [unclosed\n", "is not valid yaml"), ("- a list\n", "no model section"),
                                        ("run: {}\n", "no model section"),
                                        ("model: {codebook_sise: 8}\n", "the model section of")])
def test_a_tokenizer_whose_config_is_not_a_tokenizer_runs_is_one_line(tmp_path, text, says):
    from engine.config import ConfigError
    from engine.frozen import load_trained_tokenizer

    (tmp_path / "weights.pt").write_bytes(b"")
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=says) as error:
        load_trained_tokenizer(str(tmp_path / "weights.pt"), "model.tokenizer")
    assert "\n" not in str(error.value) and str(error.value).startswith("model.tokenizer=")

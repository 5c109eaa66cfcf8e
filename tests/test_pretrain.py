"""Pre-training end to end on CPU through the real entry point: DeepSpeed engines, checkpoints, kill -9 and
resume, two ranks under torchrun, ZeRO-3 and bf16, exported weights that fine-tuning can load."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import MARKER, checkpoint_root, complete_steps
from engine.config import ConfigError, load_config
from engine.tasks.pretrain import PretrainConfig

from helpers import CONFIGS, ROOT, SYNTHETIC, entry_command, kill_after_checkpoint, losses, run, wait_for_step

RECIPE = CONFIGS / "pretrain" / "tiny_cpu.yaml"


def command(out: Path, data_root: Path, *overrides: str, launcher=(sys.executable,)) -> list[str]:
    return entry_command("pretrain.py", RECIPE, out, f"data.root={data_root}", f"data.synthetic={SYNTHETIC}",
                         "batch.micro_batch=4", "optim.epochs=2", "optim.warmup_epochs=1", "run.log_every=1",
                         "run.vis_every_epochs=1", "run.save_every_epochs=1", *overrides, launcher=launcher)


@pytest.mark.e2e
def test_tiny_run_writes_everything_and_knows_when_it_is_done(tmp_path, data_root):
    out = tmp_path / "run"
    run(command(out, data_root))
    for name in ("config.yaml", "derived.yaml", "metrics.jsonl", "loss_curve.png", "weights.pt",
                 "vis/epoch_0001.png", "vis/final.png"):
        assert (out / name).is_file(), name
    assert list((out / "tb").iterdir())
    assert complete_steps(out) == [8, 16]  # 8 steps per epoch: 32 training videos / 4 per micro-batch
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "lr", "grad_norm", "clips_per_s", "gflops_per_s", "data_wait", "peak_mem_gib"} <= record.keys()
    again = run(command(out, data_root))
    assert "is complete" in again.stdout + again.stderr


@pytest.mark.e2e
def test_exported_weights_load_into_the_fine_tuning_model(tmp_path, data_root):
    out = tmp_path / "run"
    run(command(out, data_root, "optim.epochs=1"))
    from models.convert import official_to_classifier
    from models.vit import ClassifierConfig, build_classifier

    weights = torch.load(out / "weights.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in weights.values())
    cfg = load_config(PretrainConfig, str(RECIPE))
    classifier = build_classifier(ClassifierConfig(cfg.model.encoder, num_classes=4))
    state, report = official_to_classifier(weights)
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"] and not unexpected
    torch.testing.assert_close(classifier.blocks[0].attn.qkv.weight, weights["encoder.blocks.0.attn.qkv.weight"])

    # Pictures from the exported weights and from the DeepSpeed step directory are the same.
    visualize = [sys.executable, str(ROOT / "run_scripts" / "visualize.py"), "--config", str(RECIPE),
                 f"data.root={data_root}", "data.synthetic={num_videos: 40, frames: 16, num_classes: 4}"]
    run(visualize + [f"--weights={out / 'weights.pt'}", f"--out={tmp_path / 'a.png'}"])
    run(visualize + [f"--weights={checkpoint_root(out) / 'step_8'}", f"--out={tmp_path / 'b.png'}"])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.e2e
def test_a_diverging_run_stops_with_the_step_and_keeps_its_checkpoints(tmp_path, data_root):
    out = tmp_path / "diverged"
    result = subprocess.run(command(out, data_root, "optim.lr=1e12", "run.save_every_steps=1", "run.keep_last=50"),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    message = next(line for line in result.stderr.splitlines() if "non-finite loss" in line)
    failed_step = int(message.split(" at step ")[1].split(";")[0])
    assert complete_steps(out) and max(complete_steps(out)) < failed_step
    assert not (out / "weights.pt").exists()


@pytest.mark.e2e
def test_kill_9_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, data_root):
    overrides = ("run.save_every_steps=3", "run.keep_last=3")
    reference = tmp_path / "reference"
    run(command(reference, data_root, *overrides))

    out = tmp_path / "killed"
    process = subprocess.Popen(command(out, data_root, *overrides), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    # Kill in the second epoch (8 steps each) once step 9's checkpoint is complete and training went on.
    kill_after_checkpoint(process, out, 9, 10)
    resume_step = max(complete_steps(out))
    assert resume_step < 16 and resume_step % 8, f"not killed mid-epoch (newest checkpoint: step {resume_step})"
    # A checkpoint killed while being written must be ignored on resume.
    partial = checkpoint_root(out) / "step_999"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")

    resumed = run(command(out, data_root, *overrides))
    assert "resumed from step" in resumed.stdout + resumed.stderr
    expected, got = losses(reference), losses(out)
    assert got.keys() == expected.keys()
    assert got == expected  # fp32 on CPU: bit-identical losses after the resume
    assert not (checkpoint_root(out) / "step_999" / MARKER).exists()


@pytest.mark.e2e
@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_sgd_and_lars_resume_after_the_first_epoch_exactly(tmp_path, data_root, optimizer):
    """Momentum buffers and the step-indexed schedule come back from the checkpoint: the resumed second epoch
    repeats the uninterrupted run's losses bit for bit. LARS runs under ZeRO-0 (ZeRO 1-3 would flatten its
    per-tensor trust ratios)."""
    overrides = (f"optim.name={optimizer}", "optim.lr=0.05", "optim.weight_decay=0")
    overrides += ("ds.template=zero0_fp32",) if optimizer == "lars" else ()
    reference = tmp_path / "reference"
    run(command(reference, data_root, *overrides))

    out = tmp_path / "interrupted"
    process = subprocess.Popen(command(out, data_root, *overrides), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_step(process, out, 9)  # the end-of-epoch checkpoint (step 8) is written before step 9 trains
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert max(complete_steps(out)) == 8, f"not killed in the second epoch: {complete_steps(out)}"

    resumed = run(command(out, data_root, *overrides))
    assert "resumed from step 8" in resumed.stdout + resumed.stderr
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 17))
    assert losses(out) == expected  # fp32 on CPU: bit-identical losses after the resume
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["name"] == optimizer


@pytest.mark.e2e
def test_two_ranks_zero2_under_torchrun(tmp_path, data_root):
    out = tmp_path / "two"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    run(command(out, data_root, "optim.epochs=1", launcher=torchrun))
    import yaml

    assert yaml.safe_load((out / "derived.yaml").read_text())["world_size"] == 2
    assert complete_steps(out) == [4]  # 32 training videos over 2 ranks x 4 per micro-batch
    assert (out / "weights.pt").is_file()


@pytest.mark.e2e
@pytest.mark.parametrize("template", ["zero3_fp32", "zero2_bf16", "zero2_offload_bf16"])
def test_zero3_bf16_and_offload_single_rank(tmp_path, data_root, template):
    out = tmp_path / template
    run(command(out, data_root, "optim.epochs=1", f"ds.template={template}"))
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert weights["encoder.blocks.0.attn.qkv.weight"].dtype == torch.float32
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_precision_is_the_templates_and_stated_nowhere_else():
    with pytest.raises(ConfigError, match="unknown config key 'ds.precision'.*valid keys under 'ds': template"):
        load_config(PretrainConfig, str(RECIPE), ["ds.precision=bf16"])


@pytest.mark.e2e
def test_gradient_accumulation_counts_optimizer_steps(tmp_path, data_root):
    out = tmp_path / "accum"
    run(command(out, data_root, "optim.epochs=1", "batch.grad_accum=2"))
    import yaml

    derived = yaml.safe_load((out / "derived.yaml").read_text())
    assert derived["steps_per_epoch"] == 4 and derived["global_batch"] == 8
    assert complete_steps(out) == [4]  # 8 micro-batches, one optimizer step per 2
    assert sorted(losses(out)) == [1, 2, 3, 4]


@pytest.mark.e2e
def test_fp16_logs_the_loss_scale(tmp_path, data_root):
    from engine.ds import check_precision_supported

    try:
        check_precision_supported("fp16")
    except ValueError as reason:
        pytest.skip(f"this CPU has no native fp16: {reason}")
    out = tmp_path / "fp16"
    run(command(out, data_root, "optim.epochs=1", "ds.template=zero2_fp16"))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["loss_scale"] > 0 and "skipped_steps" in record


@pytest.mark.e2e
def test_compiled_model_trains_and_exports_the_same_names(tmp_path, data_root):
    """torch.compile through DeepSpeed (about a minute on 2 cores, most of it compiling)."""
    out = tmp_path / "compiled"
    run(command(out, data_root, "optim.epochs=1", "run.compile=true"), timeout=600)
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert not any("_orig_mod" in name for name in weights)
    assert "encoder.blocks.0.attn.qkv.weight" in weights and len(losses(out)) == 8

"""Fine-tuning end to end on CPU through the real entry point: validation, best/last/EMA exports, the
multi-view test (one rank and two), an unreadable test video reported, resume equality with an EMA, and
--eval-only."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.checkpoint import checkpoint_root, complete_steps, step_tag
from engine.config import ConfigError, load_config
from engine.optim import build_optimizer
from engine.tasks.finetune import FinetuneConfig, FinetuneMaskConfig
from models.vit import build_classifier

from helpers import CONFIGS, ROOT, SYNTHETIC, entry_command, losses, records, run, wait_for_step

RECIPE = CONFIGS / "finetune" / "tiny_cpu.yaml"
SCRIPT = ROOT / "run_scripts" / "finetune.py"


def command(out: Path, data_root: Path, *overrides: str, launcher=(sys.executable,)) -> list[str]:
    return entry_command("finetune.py", RECIPE, out, f"data.root={data_root}", f"data.synthetic={SYNTHETIC}",
                         "model.num_classes=4", "data.num_classes=4", "batch.micro_batch=4", "optim.epochs=2",
                         "eval.every_epochs=1", "run.save_every_epochs=1", "run.log_every=1", "ema.decay=0.9",
                         *overrides, launcher=launcher)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("finetune") / "run"
    run(command(out, data_root))
    return out


@pytest.mark.e2e
def test_a_run_validates_exports_and_tests_every_video_once(finished_run):
    out = finished_run
    for name in ("config.yaml", "metrics.jsonl", "weights.pt", "best.pt", "weights_ema.pt", "best_ema.pt",
                 "test_results.json", "finished.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "test_results.json").read_text())
    assert results["views"] == "2x3 views"
    for variant in ("model", "ema"):
        summary = results[variant]
        assert summary["num_videos"] == summary["num_scored"] == 8  # 20% of 40 synthetic videos
        assert not summary["unscored"] and not summary["partially_scored"]
        assert 0 <= summary["top1"] <= summary["top5"] <= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "val_top1" in r]
    assert [r["epoch"] for r in validations] == [1, 2]
    assert all("val_ema_top1" in r for r in validations)
    # The EMA is its own set of weights, not a copy of the model's.
    model, ema = weights(out / "weights.pt"), weights(out / "weights_ema.pt")
    assert model.keys() == ema.keys()
    assert any(not torch.equal(model[k], ema[k]) for k in model)


@pytest.mark.e2e
def test_a_complete_run_is_not_trained_or_tested_again(finished_run, data_root):
    before = (finished_run / "test_results.json").stat().st_mtime_ns
    again = run(command(finished_run, data_root))
    assert "is complete" in again.stdout + again.stderr
    assert (finished_run / "test_results.json").stat().st_mtime_ns == before


@pytest.mark.e2e
def test_eval_only_reproduces_the_final_test(finished_run, data_root):
    run(command(finished_run, data_root, "--eval-only"))
    evaluated = json.loads((finished_run / "eval_weights.json").read_text())["model"]
    tested = json.loads((finished_run / "test_results.json").read_text())["model"]
    for key in ("top1", "top5", "mean_class_accuracy", "num_scored"):
        assert evaluated[key] == pytest.approx(tested[key]), key


@pytest.mark.e2e
def test_an_unreadable_test_video_is_listed_on_one_and_two_ranks_alike(finished_run, data_root, tmp_path):
    """9 videos x 3 temporal views = 27 items: an uneven split over two ranks; every video is scored once and
    the broken one is reported, not replaced."""
    overrides = (f"data.test_list={data_root / 'test_with_broken.csv'}", "data.test_temporal_views=3")
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):  # --eval-only writes its report next to the weights it tested: one copy each
        folder.mkdir()
        shutil.copy(finished_run / "weights.pt", folder / "weights.pt")
    run(command(one, data_root, "--eval-only", f"--weights={one / 'weights.pt'}", *overrides))
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631")
    run(command(tmp_path / "run", data_root, "--eval-only", f"--weights={two / 'weights.pt'}", *overrides,
                launcher=torchrun))
    single = json.loads((one / "eval_weights.json").read_text())["model"]
    double = json.loads((two / "eval_weights.json").read_text())["model"]
    assert single["num_videos"] == 9 and single["num_scored"] == 8
    assert [path for path, _ in single["unscored"]] == [str(data_root / "broken.mp4")]
    assert not single["partially_scored"]
    assert double["num_scored"] == 8 and double["unscored"] == single["unscored"]
    for key in ("top1", "top5", "mean_class_accuracy"):
        assert double[key] == pytest.approx(single[key], abs=1e-12), key


@pytest.mark.e2e
def test_resuming_from_an_earlier_checkpoint_gives_the_same_model_and_ema(finished_run, data_root, tmp_path):
    """Drop the last checkpoint and the exports: the rerun replays epoch 2 from step 1's checkpoint (model,
    optimizer, sampler, RNGs, EMA and best score) and must end with identical weights."""
    out = tmp_path / "run"
    run(command(out, data_root))
    reference = {name: weights(out / name) for name in ("weights.pt", "weights_ema.pt")}
    steps = complete_steps(out)
    assert len(steps) == 2
    import shutil

    shutil.rmtree(checkpoint_root(out) / step_tag(steps[-1]))
    for name in ("weights.pt", "weights_ema.pt", "test_results.json", "finished.json"):
        (out / name).unlink()
    again = run(command(out, data_root))
    assert f"resumed from step {steps[0]}" in again.stdout + again.stderr
    for name, expected in reference.items():
        got = weights(out / name)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


@pytest.mark.e2e
def test_from_pretrained_weights_of_another_frame_count(tmp_path, data_root):
    """A 16-frame pre-training export fine-tunes at 8 frames (the sin-cos table is rebuilt)."""
    from engine.checkpoint import export_weights
    from models.videomae import PretrainModelConfig, VideoMAE
    from models.vit import ViTConfig

    pretrained = VideoMAE(PretrainModelConfig(encoder=ViTConfig(arch="vit_debug", num_frames=16, img_size=64, patch_size=8)))
    export_weights(pretrained.state_dict(), tmp_path / "pre.pt")
    out = tmp_path / "run"
    result = run(command(out, data_root, f"model.init={tmp_path / 'pre.pt'}", "optim.epochs=1",
                         "eval.final_test=false"))
    log = result.stdout + result.stderr
    assert "initial weights from" in log and "fresh: fc_norm.bias, fc_norm.weight, head.bias, head.weight" in log
    tuned = weights(out / "weights.pt")
    assert tuned["patch_embed.proj.weight"].shape == pretrained.state_dict()["encoder.patch_embed.proj.weight"].shape


@pytest.mark.e2e
def test_zero3_on_two_ranks_validates_and_tests_with_collective_forwards(tmp_path, data_root):
    """ZeRO-3 gathers parameters in every forward: with an uneven split of the views every rank must still make
    the same number of forwards, or the run hangs (the timeout would fail this test)."""
    out = tmp_path / "run"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29632")
    run(command(out, data_root, "ds.template=zero3_fp32", "ema.decay=null", "optim.epochs=1",
                "data.test_temporal_views=3", launcher=torchrun), timeout=400)
    results = json.loads((out / "test_results.json").read_text())
    assert set(results) == {"step", "views", "model"}
    assert results["model"]["num_scored"] == 8 and not results["model"]["partially_scored"]


# ---- configuration -----------------------------------------------------------------------------------------


def test_the_fine_tuning_defaults_have_videomae_layer_decay_groups():
    cfg = FinetuneConfig()
    model = build_classifier(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.layer_decay)
    scales = {group["lr_scale"] for group in optimizer.param_groups}
    depth = model.depth
    assert scales == {0.75 ** (depth + 1 - i) for i in range(depth + 2)}  # depth + 2 layer ids
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["patch_embed.proj.weight"])] == pytest.approx(0.75 ** (depth + 1))
    assert scale_of[id(named["blocks.0.mlp.fc1.weight"])] == pytest.approx(0.75 ** depth)
    assert scale_of[id(named["head.weight"])] == scale_of[id(named["fc_norm.weight"])] == 1.0


def test_a_recipe_section_overrides_the_fine_tuning_defaults_not_the_class_defaults():
    cfg = load_config(FinetuneConfig, str(RECIPE))
    assert cfg.data.train_augment.kind == "finetune" and cfg.data.eval_augment.kind == "eval"
    assert cfg.model.encoder.drop_path == 0.1  # the fine-tuning default survives `model.encoder.arch=...`


@pytest.mark.parametrize("overrides, message", [
    (["batch.micro_batch=3"], "must be even"),
    (["data.num_classes=7"], "differs from model.num_classes"),
    (["ds.template=zero3_fp32"], "ema.decay needs whole parameters"),
    (["mask.start_ratio=1.0"], "start_ratio"),
])
def test_inconsistent_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, str(RECIPE), ["ema.decay=0.99", "mixup.mixup_alpha=0.8", *overrides])


def test_fine_tuning_mask_ratio_anneals_from_its_start_to_zero_on_a_cosine():
    mask = FinetuneMaskConfig(start_ratio=0.5)
    ratios = [mask.ratio_at(step, 100) for step in range(101)]
    assert ratios[0] == 0.5 and ratios[-1] == pytest.approx(0.0, abs=1e-12)
    assert ratios[50] == pytest.approx(0.25)
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))
    assert ratios[25] == pytest.approx(0.25 * (1 + math.cos(math.pi / 4)))


@pytest.mark.e2e
def test_the_main_job_runs_the_whole_story_and_prints_the_table(tmp_path, data_root):
    """transfer_demo.py: pre-train, fine-tune from it and from scratch, detect from it and from scratch, test all
    four, two tables (tiny budget). The classification overrides (--set) must not reach detect.py, whose data
    section is AVA's: it refuses the classification data.synthetic spec, and data.root would point at the clips."""
    overrides = [f"--set=data.root={data_root}", f"--set=data.synthetic={SYNTHETIC}", "--set=batch.micro_batch=4",
                 "--set=optim.warmup_epochs=1"]
    finetune_only = ["model.num_classes=4", "data.num_classes=4", "eval.every_epochs=1"]
    detect_only = [f"data.root={tmp_path / 'ava'}", "data.synthetic.num_videos=12", "data.synthetic.num_val_videos=4"]
    probe_only = ["model.num_classes=4", "data.num_classes=4", "features.train_views=1", "features.shard_items=64"]
    out = tmp_path / "demo"
    result = run([sys.executable, str(ROOT / "run_scripts" / "transfer_demo.py"), "--out", str(out),
                  "--pretrain-epochs", "1", "--finetune-epochs", "1", "--probe-epochs", "1", "--detect-epochs", "1",
                  *overrides, *(f"--finetune-set={o}" for o in finetune_only),
                  *(f"--probe-set={o}" for o in probe_only), *(f"--detect-set={o}" for o in detect_only)],
                 timeout=900)
    summary = (out / "summary.md").read_text()
    assert summary in result.stdout
    classification, rest = summary.split("Frozen encoder")
    probes, detection = rest.split("Synthetic AVA action detection")
    for table, all_scored, second in ((classification, r"\| 8/8 \|$", "| scratch"),
                                      (probes, r"\| 8/8 \|$", "| random initialisation"),
                                      (detection, r"\| ([1-9]\d*)/\1 \|$", "| scratch")):
        rows = [line for line in table.splitlines() if line.startswith(("| pre-trained", second))]
        assert len(rows) == 2 and all(re.search(all_scored, line) for line in rows), table
    for task, other in (("finetune", "scratch"), ("probe", "random"), ("detect", "scratch")):
        configs = {init: yaml.safe_load((out / f"{task}_{init}" / "config.yaml").read_text())
                   for init in ("pretrained", other)}
        assert configs["pretrained"]["model"]["init"] == str(out / "pretrain" / "weights.pt")
        assert not configs[other]["model"]["init"]
    assert configs["scratch"]["data"]["root"] == str(tmp_path / "ava")  # the detection data, not the --set one


@pytest.mark.e2e
def test_a_signal_mid_run_stops_after_a_checkpoint_and_the_rerun_ends_like_the_uninterrupted_run(
        finished_run, data_root, tmp_path):
    """Preemption is the loop's, so fine-tuning has it too: SIGUSR1 to every process (loader workers included, as
    Slurm does) -> checkpoint, exit 75; the rerun resumes with the EMA and the best score and ends with the same
    metrics, weights and test results as the uninterrupted run."""
    out = tmp_path / "stopped"
    process = subprocess.Popen(command(out, data_root, "batch.num_workers=1"), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_step(process, out, 3)
    os.killpg(process.pid, signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output[-3000:]
    stopped = int(re.search(r"stopped on SIGUSR1 after step (\d+)", output).group(1))
    assert max(complete_steps(out)) == stopped < 16

    run(command(out, data_root, "batch.num_workers=1"))
    assert losses(out) == losses(finished_run)
    validation = {name: [(r["step"], r["val_top1"], r["val_ema_top1"]) for r in records(name) if "val_top1" in r]
                  for name in (out, finished_run)}
    assert validation[out] == validation[finished_run]
    for name in ("weights.pt", "weights_ema.pt", "best.pt"):
        got, expected = weights(out / name), weights(finished_run / name)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    results = [json.loads((d / "test_results.json").read_text()) for d in (out, finished_run)]
    assert results[0]["model"]["top1"] == results[1]["model"]["top1"]

"""AVA action detection end to end on CPU through the real entry point (run_scripts/detect.py): training on the
synthetic AVA data, validation by frame mAP, the final test's test_results.json and detections.csv, a model that
beats random scores on the same boxes, config errors, an unreadable keyframe listed, kill -9 and exact resume,
and --eval-only."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datasets.ava.files import read_excluded_timestamps, read_label_map
from datasets.ava.splits import detected_keyframes, ground_truth
from engine.checkpoint import complete_steps
from engine.config import load_config
from engine.eval.detection import DetectionScores, average_precision, rank_batches
from engine.tasks.detection import DetectionConfig

from helpers import CONFIGS, ROOT, entry_command, losses, run

RECIPE = CONFIGS / "detect" / "tiny_cpu.yaml"
SCRIPT = ROOT / "run_scripts" / "detect.py"
SMALL = "{num_videos: 24, num_val_videos: 6}"  # the default synthetic size: runs in seconds, learns little


def command(out: Path, data_root: Path, *overrides: str) -> list[str]:
    return entry_command("detect.py", RECIPE, out, f"data.root={data_root}", "run.log_every=1", *overrides)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """The tiny recipe as shipped (its own synthetic data, its epochs), in a temporary folder."""
    base = tmp_path_factory.mktemp("detect")
    out, data = base / "run", base / "data"
    started = time.perf_counter()
    run(command(out, data))
    return out, data, time.perf_counter() - started


def random_baseline(data_root: Path, seeds: int = 5) -> list[float]:
    """Frame mAP of uniformly random action scores on the same detected boxes, for a few seeds."""
    cfg = load_config(DetectionConfig, str(RECIPE), [f"data.root={data_root}"])
    label_map = read_label_map(cfg.data.path("label_map"))
    keyframes = detected_keyframes(cfg.data)
    truth = ground_truth(cfg.data, "val", label_map)
    excluded = read_excluded_timestamps(cfg.data.path("val_excluded"))
    keys = [k.key for k in keyframes for _ in k.boxes]
    boxes = np.concatenate([k.boxes for k in keyframes])
    ids = sorted(label_map)
    maps = []
    for seed in range(seeds):
        scores = np.random.default_rng(seed).random((len(boxes), len(ids)))
        result = DetectionScores(keys, boxes, scores, ids, len(keyframes), [])
        maps.append(average_precision(result, truth, excluded)["mAP"])
    return maps


@pytest.mark.e2e
def test_the_tiny_recipe_validates_tests_and_beats_random_scores(recipe_run):
    out, data, seconds = recipe_run
    for name in ("config.yaml", "metrics.jsonl", "weights.pt", "best.pt", "test_results.json", "detections.csv",
                 "finished.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "test_results.json").read_text())
    assert math.isfinite(results["mAP"]) and 0 < results["mAP"] <= 1
    assert set(results["ap"]) == {"stand still", "move left", "move right", "move up", "move down", "flash"}
    assert results["num_scored"] == results["num_keyframes"] > 0 and results["unscored"] == []
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validated = [r for r in records if "val_mAP" in r]
    assert [r["epoch"] for r in validated] == [2, 4, 6, 8, 10]
    assert validated[-1]["val_mAP"] == pytest.approx(results["mAP"])  # the test scores the same last weights
    baseline = random_baseline(data)
    print(f"tiny recipe: test mAP {results['mAP']:.4f}, random scores {np.mean(baseline):.4f} "
          f"(max {max(baseline):.4f} over {len(baseline)} seeds), {seconds:.0f} s")
    assert results["mAP"] > max(baseline) + 0.1


@pytest.mark.e2e
def test_detections_csv_is_the_official_8_column_format(recipe_run):
    out, data, _ = recipe_run
    cfg = load_config(DetectionConfig, str(RECIPE), [f"data.root={data}"])
    class_ids = sorted(read_label_map(cfg.data.path("label_map")))
    rows = list(csv.reader((out / "detections.csv").open()))
    results = json.loads((out / "test_results.json").read_text())
    assert len(rows) == results["num_boxes"] * len(class_ids)
    for video_id, timestamp, *coords, action, score in rows[:: len(class_ids)]:
        assert video_id.startswith("ava-syn_") and len(timestamp) == 4 and timestamp.isdigit()
        x1, y1, x2, y2 = map(float, coords)
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        assert int(action) in class_ids and 0 <= float(score) <= 1
    assert {int(row[6]) for row in rows} == set(class_ids)


@pytest.mark.e2e
def test_eval_only_scores_exported_weights_like_the_final_test(recipe_run):
    out, data, _ = recipe_run
    run(command(out, data, "--eval-only"))
    evaluated = json.loads((out / "eval_weights.json").read_text())
    tested = json.loads((out / "test_results.json").read_text())
    assert evaluated["mAP"] == pytest.approx(tested["mAP"], abs=1e-6)
    assert (out / "eval_weights_detections.csv").is_file()


@pytest.mark.e2e
def test_an_unknown_key_exits_2_naming_the_valid_ones(tmp_path):
    result = subprocess.run(command(tmp_path / "run", tmp_path / "data", "data.detection_min_scor=0.5"), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "did you mean 'data.detection_min_score'" in result.stderr and "val_detections" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_mismatched_classes_are_a_config_error(tmp_path):
    result = subprocess.run(command(tmp_path / "run", tmp_path / "data", "model.num_classes=8"), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "num_classes" in result.stderr


def test_rank_batches_cover_every_keyframe_once_without_mixing_videos():
    class K:
        def __init__(self, video_id):
            self.video_id = video_id

    keyframes = [K(v) for v in "aaaaabbbccccccd"]
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            for batch in rank_batches(keyframes, 4, world, rank):
                assert len(batch) <= 4 and len({keyframes[i].video_id for i in batch}) == 1
                seen += batch
        assert sorted(seen) == list(range(len(keyframes)))


@pytest.mark.e2e
def test_an_unreadable_keyframe_is_listed_as_unscored(tmp_path):
    """A detection on a video without frames: the run goes on and names the keyframe."""
    from datasets.synthetic.ava import SyntheticAVASpec, ensure_synthetic_ava

    data = tmp_path / "data"
    paths = ensure_synthetic_ava(data, SyntheticAVASpec(num_videos=24, num_val_videos=6))
    with paths.val_detections.open("a") as f:
        f.write("ava-syn_999,0903,0.1,0.1,0.5,0.5,,0.99\n")
    out = tmp_path / "run"
    run(command(out, data, f"data.synthetic={SMALL}", "optim.epochs=1", "eval.every_epochs=1"))
    results = json.loads((out / "test_results.json").read_text())
    assert results["num_scored"] == results["num_keyframes"] - 1
    assert [key for key, _ in results["unscored"]] == ["ava-syn_999,0903"]
    assert math.isfinite(results["mAP"])


@pytest.mark.e2e
def test_kill_9_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path):
    overrides = (f"data.synthetic={SMALL}", "optim.epochs=2", "eval.every_epochs=1", "batch.micro_batch=4",
                 "run.save_every_steps=5", "run.keep_last=3")
    data = tmp_path / "data"
    reference = tmp_path / "reference"
    run(command(reference, data, *overrides))
    steps_per_epoch = max(r["step"] for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
                          if r.get("epoch") == 1 and "val_mAP" in r)

    out = tmp_path / "killed"
    process = subprocess.Popen(command(out, data, *overrides), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    target = (steps_per_epoch // 5 + 1) * 5  # the first periodic checkpoint of the second epoch
    while time.time() < deadline and process.poll() is None:
        if target in complete_steps(out) and max(losses(out), default=0) >= target + 1:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resume_step = max(complete_steps(out))
    assert steps_per_epoch < resume_step < 2 * steps_per_epoch, f"not killed mid-epoch 2: step {resume_step}"

    resumed = run(command(out, data, *overrides))
    assert "resumed from step" in resumed.stdout + resumed.stderr
    assert losses(out) == losses(reference)  # fp32 on CPU: bit-identical losses after the resume
    got, expected = (json.loads((path / "test_results.json").read_text()) for path in (out, reference))
    assert got["mAP"] == expected["mAP"]


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def detections(path: Path) -> dict[tuple, float]:
    with open(path, newline="") as f:
        return {tuple(row[:7]): float(row[7]) for row in csv.reader(f)}


@pytest.mark.e2e
def test_two_ranks_score_every_keyframe_once_and_give_the_map_of_one(recipe_run, tmp_path):
    """--eval-only of the same weights on one rank and on two: every keyframe scored once over the ranks (a
    contiguous share each, rows gathered), the same rows, the same AP for every class."""
    out, data, _ = recipe_run
    weights = {n: tmp_path / f"ranks{n}" / "weights.pt" for n in (1, 2)}
    for n, path in weights.items():
        path.parent.mkdir()
        path.write_bytes((out / "weights.pt").read_bytes())
        launcher = list(TORCHRUN[:-1]) + ["2"] if n == 2 else [sys.executable]
        run([*launcher, *command(path.parent, data, "--eval-only", "--weights", str(path))[1:]])
    one, two = (json.loads((weights[n].parent / "eval_weights.json").read_text()) for n in (1, 2))
    assert one["num_scored"] == two["num_scored"] == one["num_keyframes"] and one["num_boxes"] == two["num_boxes"]
    assert two["ap"] == pytest.approx(one["ap"], abs=1e-9) and two["mAP"] == pytest.approx(one["mAP"], abs=1e-9)
    rows = [detections(weights[n].parent / "eval_weights_detections.csv") for n in (1, 2)]
    assert rows[0].keys() == rows[1].keys()
    assert max(abs(rows[0][k] - rows[1][k]) for k in rows[0]) < 1e-5


@pytest.mark.e2e
def test_zero3_bf16_on_two_ranks_trains_validates_and_tests(tmp_path):
    """ZeRO-3 partitions the parameters, so every forward is a collective: validation and the final test run a
    blank forward on a rank that has fewer keyframes to score; here in bf16."""
    data, out = tmp_path / "data", tmp_path / "run"
    run([*TORCHRUN, *command(out, data, f"data.synthetic={SMALL}", "optim.epochs=2", "eval.every_epochs=1",
                             "ds.template=zero3_bf16", "batch.micro_batch=4", "eval.micro_batch=3")[1:]], timeout=600)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "val_mAP" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    results = json.loads((out / "test_results.json").read_text())
    assert results["num_scored"] == results["num_keyframes"] and math.isfinite(results["mAP"])
    assert (out / "best.pt").is_file() and (out / "weights.pt").is_file()

"""run_scripts/gpu_check.sh end to end at smoke sizes on the CPU, so that the GPU check still runs the day a GPU is
at hand; and the benchmark report's table for figures only a GPU produces."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from run_scripts import bench_gpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "run_scripts" / "gpu_check.sh"), "--smoke", "--out", str(out),
                             "--bench-s", "600"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return out, result


@pytest.mark.e2e
def test_the_smoke_check_runs_every_part_and_exits_0(smoke):
    out, result = smoke
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for name in ("gpu_check.log", "env.txt", "gpu_tests.txt", "gpu_bench.json", "gpu_bench.txt", "profile.txt"):
        assert (out / name).stat().st_size > 0, name
    assert "torch" in (out / "env.txt").read_text()
    assert "skipped" in (out / "gpu_tests.txt").read_text()  # the GPU tests were collected and skipped, none failed


@pytest.mark.e2e
def test_every_benchmark_reports_its_figures(smoke):
    out, _ = smoke
    report = json.loads((out / "gpu_bench.json").read_text())
    results = report["results"]
    assert list(results) == list(bench_gpu.BENCHMARKS)
    assert not {name: r["error"] for name, r in results.items() if "error" in r}
    assert results["t1"]["eta"] > 0 and results["t1"]["flop_ratio"] > 1
    assert results["t2"]["speedup"] > 0 and results["t2"]["transformers"]
    kinds = [run["kind"] for run in results["t3"]["runs"]]
    assert kinds == ["pretrain", "finetune"] and all(run["mfu"] > 0 for run in results["t3"]["runs"])
    assert sum(results["t3"]["runs"][0]["time_by_kernel_kind"].values()) == pytest.approx(1, abs=1e-3)
    assert results["t7"]["batch"] >= 2 and results["t7"]["clips_per_s"] > 0
    loader = results["loader"]
    assert loader["decord_clips_per_s"] > 0 and loader["pyav_clips_per_s"] > 0
    assert loader["pretrain_step_consumes_clips_per_s"] == results["t3"]["runs"][0]["clips_per_s"]
    assert results["probe"]["heads"] == 6 and results["probe"]["grid_over_one"] > 0
    assert results["vimpac"]["speedup"] > 0 and results["vimpac"]["params_m"]["t,h|w"] > 0
    table = (out / "gpu_bench.txt").read_text()
    for row in ("T1 sparse encoder eta", "T2 pre-training step vs transformers", "T3 MFU pretrain", "T7 largest batch",
                "loader", "probe grid of 6 heads", "VIMPAC t,h|w / full attention speed"):
        assert row in table


def test_the_table_shows_the_gpu_only_figures_against_their_targets():
    """Memory figures exist only on a GPU: the table must still print them when they come."""
    report = {"environment": {"device": "NVIDIA H200", "torch": "2.11.0"}, "smoke": False, "results": {
        "t5": {"arch": "vit_large", "batch": 8, "activation_ratio": 0.07, "peak_ratio": 0.3,
               "torch_activation_gib": 1.0, "none_activation_gib": 14.0},
        "t7": {"arch": "vit_huge", "frames": 32, "batch": 96, "clips_per_s": 20.0, "peak_mem_gib": 130.0,
               "predicted_batch": 100},
        "t2": {"error": "RuntimeError: something broke\nmore lines"}}}
    table = bench_gpu.summary(report)
    assert "T5 activation memory ckpt/none (vit_large, b8)" in table and "0.070" in table and "<= 0.2" in table
    assert "T7 largest batch vit_huge 32f + ckpt" in table and "96" in table and ">= 64" in table
    assert "t2: FAILED - RuntimeError: something broke" in table


def test_full_sizes_need_a_gpu(tmp_path, capsys):
    if bench_gpu.torch.cuda.is_available():
        pytest.skip("the refusal of full sizes without CUDA cannot show on a machine that has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        bench_gpu.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--smoke runs tiny sizes on the CPU" in capsys.readouterr().err


def test_unknown_benchmarks_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main(["--out", str(tmp_path), "--smoke", "--only", "t1,t4"])
    assert "unknown benchmark(s) ['t4']" in capsys.readouterr().err

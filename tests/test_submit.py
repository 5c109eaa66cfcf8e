"""run_scripts/submit.py without a cluster (--dry-run): the sbatch command it writes, and the errors it stops at
before anything is queued; the rendezvous that train.sbatch exports (python -m engine.dist)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = [sys.executable, str(ROOT / "run_scripts" / "submit.py")]
RECIPE = "run_scripts/configs/pretrain/videomae_l_k400.yaml"


def submit(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*SUBMIT, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def sbatch_words(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout.splitlines()[-1])


@pytest.mark.e2e
def test_dry_run_writes_the_8x8_command_from_the_recipe(tmp_path):
    relative = os.path.relpath(ROOT / RECIPE, tmp_path)  # from where the user stands
    result = submit("pretrain", "--config", relative, "--nodes", "8", "--gpus-per-node", "8", "--cpus-per-task", "12",
                    "--partition", "gpu", "--time", "48:00:00", "--sbatch-option=--account=vision",
                    f"run.output_dir={tmp_path}/l", "--dry-run", cwd=tmp_path)
    assert "64 ranks (srun); global batch 1024 (8 x 2 accumulation x 64)" in result.stdout
    words = sbatch_words(result)
    assert words[:2] == ["sbatch", "--parsable"]
    for option in ("--job-name=videomae_l_k400", "--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8",
                   "--cpus-per-task=12", "--partition=gpu", "--time=48:00:00", "--signal=USR1@180",
                   f"--output={tmp_path}/l/slurm-%j.out", "--account=vision"):
        assert option in words, option
    export = next(w for w in words if w.startswith("--export="))
    assert f"REPO={ROOT}" in export and f"PYTHON={sys.executable}" in export and "LAUNCHER=srun" in export
    script = words.index(str(ROOT / "run_scripts" / "slurm" / "train.sbatch"))
    # The config is made absolute (the job starts from Slurm's spool copy of the script).
    assert words[script + 1:] == ["pretrain", "--config", str((ROOT / RECIPE).resolve()),
                                  f"run.output_dir={tmp_path}/l"]
    assert not (tmp_path / "l").exists()  # a dry run creates nothing


@pytest.mark.e2e
def test_torchrun_launcher_takes_one_task_per_node_with_all_its_cpus():
    words = sbatch_words(submit("finetune", "--config", "run_scripts/configs/finetune/videomae_h_k400.yaml",
                                "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "10", "--launcher",
                                "torchrun", "run.requeue_signal=USR2", "--warning", "300", "--dry-run"))
    assert {"--ntasks-per-node=1", "--cpus-per-task=80", "--gpus-per-node=8", "--signal=USR2@300"} <= set(words)
    assert "LAUNCHER=torchrun" in " ".join(words) and "NPROC_PER_NODE=8" in " ".join(words)


@pytest.mark.e2e
def test_cpu_nodes_need_tasks_per_node_and_get_no_gpu_option():
    assert submit("pretrain", "--config", RECIPE, "--gpus-per-node", "0", "--dry-run").returncode == 2
    words = sbatch_words(submit("pretrain", "--config", RECIPE, "--gpus-per-node", "0", "--tasks-per-node", "2",
                                "--dry-run"))
    assert "--ntasks-per-node=2" in words and not any(w.startswith("--gpus") for w in words)


@pytest.mark.e2e
def test_a_config_error_stops_before_submitting():
    result = submit("pretrain", "--config", RECIPE, "optim.lrr=1", "--dry-run")
    assert result.returncode == 2
    assert "unknown config key 'optim.lrr'" in result.stderr and "did you mean 'optim.lr'" in result.stderr
    result = submit("pretrain", "--config", RECIPE, "run.requeue_signal=''", "run.stop_signal=''", "--dry-run")
    assert result.returncode != 0 and "both empty" in result.stderr


@pytest.mark.e2e
def test_engine_dist_prints_the_rendezvous_of_the_job():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(SLURM_JOB_ID="123457", SLURM_JOB_NODELIST="gpu-[007-008,010]", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "engine.dist"], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "export MASTER_ADDR=gpu-007 MASTER_PORT=13457"
    env["MASTER_PORT"] = "29500"
    out = subprocess.run([sys.executable, "-m", "engine.dist"], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "export MASTER_ADDR=gpu-007 MASTER_PORT=29500"

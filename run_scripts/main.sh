#!/usr/bin/env bash
# The main job, from a fresh machine: sets up .venv if needed, then pre-trains a tiny VideoMAE on CPU
# (DeepSpeed, built-in synthetic dataset). Running it again resumes, or reports that the run is complete.
# Extra arguments are config overrides, e.g. `bash run_scripts/main.sh optim.epochs=20 mask.kind=random`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/run_scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python run_scripts/pretrain.py --config run_scripts/configs/pretrain/tiny_cpu.yaml "$@"

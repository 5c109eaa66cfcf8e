#!/usr/bin/env bash
# The main job, from a fresh machine: sets up .venv if needed, then runs the CPU smoke run of a tiny VideoMAE.
# Extra arguments are config overrides, e.g. `bash run_scripts/main.sh run.steps=50 mask.kind=random`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/run_scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python run_scripts/smoke.py --config run_scripts/configs/pretrain/tiny_cpu.yaml "$@"

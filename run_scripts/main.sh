#!/usr/bin/env bash
# The main job, from a fresh machine: sets up .venv (or $VENV) if needed, then runs the whole story on CPU on
# the built-in synthetic datasets: pre-train a tiny VideoMAE, fine-tune it, fine-tune the same model from scratch
# with the same budget, train the AVA-style action detector from the same pre-trained encoder and from scratch,
# test all four and print the two tables (run_scripts/transfer_demo.py). Running it again resumes, or reports
# each stage complete. Extra arguments go to transfer_demo.py, e.g.
# `bash run_scripts/main.sh --pretrain-epochs 10 --finetune-epochs 5 --detect-epochs 5` for a quicker, weaker run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(bash "$root/run_scripts/bootstrap.sh" | tail -n 1)  # the python of $VENV (default .venv)
cd "$root"
exec "$python" run_scripts/transfer_demo.py "$@"

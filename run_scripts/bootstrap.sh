#!/usr/bin/env bash
# Creates or refreshes the project's virtual environment (.venv in the repository root).
#
# Idempotent: when .venv was built from the same setup.py, constraints and this script, it returns at once.
# Prints the environment's python as the last line of its standard output (main.sh and test.sh run it).
# Order matters: torch first (DeepSpeed imports it while building), then this project and its dependencies
# without build isolation.
#
# Environment knobs:
#   PYTHON=python3.11      interpreter for the venv (3.10 or newer)
#   VENV=/path/to/venv     where to build it (default: <repo>/.venv)
#   TORCH_INDEX_URL=...    extra index for another torch build (e.g. a CUDA-specific one)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
[[ $venv == /* ]] || venv=$PWD/$venv  # a relative VENV is the caller's, wherever the caller goes next
python=${PYTHON:-python3}
constraints=$root/run_scripts/constraints.txt
stamp=$venv/.bootstrap-stamp
fingerprint=$(cat "$root/setup.py" "$constraints" "$root/run_scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)

if [[ -f $stamp && $(cat "$stamp") == "$fingerprint" && -x $venv/bin/python ]]; then
    echo "$venv/bin/python"
    exit 0
fi

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "bootstrap: need Python >= 3.10 (found: $("$python" --version 2>&1 || echo none)); set PYTHON=..." >&2
    exit 1
fi

echo "bootstrap: building $venv (takes a few minutes the first time)" >&2
if [[ ! -x $venv/bin/python ]] && ! "$python" -m venv "$venv"; then
    echo "bootstrap: '$python -m venv' failed; on Debian/Ubuntu install the python3-venv package" >&2
    exit 1
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints")
"${pip[@]}" --upgrade pip setuptools wheel
torch_index=()
[[ -n ${TORCH_INDEX_URL:-} ]] && torch_index=(--extra-index-url "$TORCH_INDEX_URL")
"${pip[@]}" "${torch_index[@]}" torch torchvision
"${pip[@]}" --no-build-isolation -e "$root[dev]"
echo "$fingerprint" > "$stamp"
versions=$("$venv/bin/python" -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -n 1)
echo "bootstrap: ready: $versions" >&2
echo "$venv/bin/python"

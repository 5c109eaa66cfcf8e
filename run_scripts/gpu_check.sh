#!/usr/bin/env bash
# One prepared check of a GPU machine, about 8 minutes on one H200: the CUDA tests (pytest -m gpu) and the GPU
# benchmarks (run_scripts/bench_gpu.py), everything written to --out.
#
#   bash run_scripts/gpu_check.sh --out DIR [--smoke] [--tests-s 210] [--bench-s 270]
#
# On a GPU image without deepspeed, decord, av, tensorboardX, fairscale or omegaconf and without network, the wheels
# in .whl/ (made on a machine with network by `bash run_scripts/gpu_wheels.sh`, then copied along with the
# repository) are installed into a scratch folder first. --smoke runs the same steps at tiny sizes on the CPU (the
# GPU tests then skip): the test suite does so, so that this script keeps working while no GPU is at hand.
#
# DIR receives: gpu_check.log (everything printed), env.txt (versions, nvidia-smi), gpu_tests.txt (pytest's
# report), gpu_bench.json and gpu_bench.txt (the figures and the table against the targets), profile.txt (top
# kernels of a ViT-B pre-training step). Exit status: 0 when every test passed and every benchmark ran, else 1.
set -uo pipefail  # not -e: a failing part is reported and the remaining parts still run

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="" smoke=0 tests_s=210 bench_s=270
usage="usage: bash run_scripts/gpu_check.sh --out DIR [--smoke] [--tests-s SECONDS] [--bench-s SECONDS]"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?$usage}; shift 2 ;;
    --smoke) smoke=1; shift ;;
    --tests-s) tests_s=${2:?$usage}; shift 2 ;;
    --bench-s) bench_s=${2:?$usage}; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1; $usage" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "$usage" >&2; exit 2; }
mkdir -p "$out" && out=$(cd "$out" && pwd)
exec > >(tee "$out/gpu_check.log") 2>&1
started=$SECONDS
cd "$root" || exit 1

# The project's environment where there is one (a developer's checkout), else the image's python.
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
needed="import deepspeed, decord, av, tensorboardX, fairscale, omegaconf"
if ! "$python" -c "$needed" 2>/dev/null; then
  if ! ls "$root"/.whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: $python lacks deepspeed/decord/av/tensorboardX/fairscale/omegaconf and there is no .whl/;" \
         "run 'bash run_scripts/gpu_wheels.sh' where there is network and bring .whl/ along" >&2
    exit 2
  fi
  site=${TMPDIR:-/tmp}/gpu_check_site
  echo "[gpu_check] installing $(ls "$root"/.whl/*.whl | wc -l) wheels from .whl/ into $site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$root"/.whl/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  "$python" -c "$needed" || exit 1
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Fewer fragmentation failures near the memory limit (the largest-batch search of the benchmarks).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# cuBLAS with a fixed workspace picks the same kernels every run: the exact-resume test depends on it.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}

{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $(nproc)"
  "$python" - <<'EOF'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
for name in ("deepspeed", "timm", "transformers", "decord", "av", "fairscale", "omegaconf", "tensorboardX", "numpy"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # a report, not a check: the tests say what a missing package breaks
        print(f"{name}: {type(err).__name__}: {err}")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

status=0
echo "[gpu_check] GPU tests (up to ${tests_s} s)"
# SIGINT at the limit: pytest then still prints its summary of what ran.
timeout --signal=INT --kill-after=20 "$tests_s" "$python" -m pytest tests/test_gpu.py -m gpu -p no:cacheprovider -rs \
  -q 2>&1 | tee "$out/gpu_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "[gpu_check] benchmarks (up to ${bench_s} s)"
smoke_flag=()
[ "$smoke" = 1 ] && smoke_flag=(--smoke)
"$python" run_scripts/bench_gpu.py --out "$out" --budget-s "$bench_s" "${smoke_flag[@]}" || status=1

echo "[gpu_check] done in $((SECONDS - started)) s, status $status; results in $out"
exit $status

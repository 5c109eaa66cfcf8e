#!/usr/bin/env bash
# The test suite, from a fresh machine: sets up .venv (or $VENV) if needed, then runs pytest on CPU.
# Extra arguments go to pytest, e.g. `bash run_scripts/test.sh -k masking -x`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The environment bootstrap.sh builds (VENV, default .venv). bootstrap.sh reads a relative VENV from the
# caller's directory, so it is made absolute here before the cd below.
venv=${VENV:-$root/.venv}
[[ $venv == /* ]] || venv=$PWD/$venv
bash "$root/run_scripts/bootstrap.sh"
cd "$root"
# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code.
exec "$venv/bin/python" -m pytest tests -rs "$@"  # -rs: a skipped test says why in the summary

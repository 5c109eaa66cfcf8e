#!/usr/bin/env bash
# The test suite, from a fresh machine: sets up .venv (or $VENV) if needed, then runs pytest on CPU.
# Extra arguments go to pytest, e.g. `bash run_scripts/test.sh -k masking -x`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(bash "$root/run_scripts/bootstrap.sh" | tail -n 1)  # the python of $VENV (default .venv)
cd "$root"
# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code.
exec "$python" -m pytest tests -rs "$@"  # -rs: a skipped test says why in the summary

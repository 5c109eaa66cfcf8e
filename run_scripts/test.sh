#!/usr/bin/env bash
# The test suite, from a fresh machine: sets up .venv if needed, then runs pytest on CPU.
# Extra arguments go to pytest, e.g. `bash run_scripts/test.sh -k masking -x`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/run_scripts/bootstrap.sh"
cd "$root"
# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code.
exec .venv/bin/python -m pytest tests -rs "$@"  # -rs: a skipped test says why in the summary

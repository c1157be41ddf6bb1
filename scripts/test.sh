#!/usr/bin/env bash
# Install what is missing, then run the checks CI runs: ruff, mypy --strict, the layering
# contracts (lint-imports), the runtime wheel on its own (scripts/check_wheel.sh), pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not integration"` for the
# fast unit tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
# the wheel's own venv, made afresh by check_wheel.sh: test_wheel_pod.py runs a pod from it
export PODSHIM_WHEEL_VENV=$PWD/.venv-wheel
bash scripts/check_wheel.sh
exec .venv/bin/pytest "$@"

#!/usr/bin/env bash
# The accelerator check of issue 16 in one command, bounded to 8 minutes; prints one table at the end.
#   bash bench/device_check.sh              # full sizes on the GPU (and the many-core host for the all-reduce)
#   bash bench/device_check.sh --dry-run    # the same code paths at tiny sizes on the CPU, well under a minute
#   bash bench/device_check.sh --json out.json
# Python: $PYTHON, else the worktree's .venv, else python3; scalesgd is imported from src/ (no install needed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=10 480 "$py" bench/device_check.py "$@"

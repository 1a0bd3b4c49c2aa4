#!/usr/bin/env bash
# Set up a virtual environment for scalesgd: torch first (the pinned CPU wheel, unless a torch that
# satisfies the package's range is already importable there: a user's CUDA build stays), then the
# package with its test extras.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  # --system-site-packages: a torch already installed for this Python (say, a CUDA build) is reused.
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if "$PY" - <<'PYEOF'
import sys
try:
    import torch
except Exception:
    sys.exit(1)
major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 3) else 1)
PYEOF
then
  echo "setup: using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: installing $TORCH_PIN"
  "$PY" -m pip install -q "$TORCH_PIN"
fi
"$PY" -m pip install -q -e ".[test]"
echo "setup: done ($("$PY" -c 'import torch, scalesgd; print("scalesgd", scalesgd.__version__, "torch", torch.__version__)'))"

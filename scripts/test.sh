#!/usr/bin/env bash
# Set up with the test extras, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test scripts/setup.sh
export KILN_CACHE_DIR="${KILN_CACHE_DIR:-$PWD/.cache/kiln}"
exec .venv/bin/python -m pytest -q "$@"

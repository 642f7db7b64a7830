#!/usr/bin/env bash
# Set up with the test extras, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test scripts/setup.sh
# The metrics test runs a real Prometheus server: Debian's package.
if ! command -v prometheus >/dev/null 2>&1; then
  echo "installing prometheus (Debian package, for the metrics test)..." >&2
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q prometheus >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q prometheus >/dev/null; }
fi
export KILN_CACHE_DIR="${KILN_CACHE_DIR:-$PWD/.cache/kiln}"
exec .venv/bin/python -m pytest -q "$@"

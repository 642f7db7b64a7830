#!/usr/bin/env bash
# The main job: set up, then chat with the embedded default model (its engine is built on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/kiln chat "$@"

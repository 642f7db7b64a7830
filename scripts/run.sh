#!/usr/bin/env bash
# The main job: set up, then serve the embedded default model over the OpenAI-compatible HTTP API on
# http://127.0.0.1:8000 (its engine is built on first use). Extra arguments go to `kiln serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/kiln serve "$@"

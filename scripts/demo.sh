#!/usr/bin/env bash
# Set up, then train the tiny GPT on CPython's bundled help text (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}"
exec .venv/bin/lordo-compile train "$@"

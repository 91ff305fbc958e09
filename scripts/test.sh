#!/usr/bin/env bash
# Set up, then run the whole test suite (Inductor and 2-process gloo tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d -t lordo-inductor-XXXXXX)}"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"

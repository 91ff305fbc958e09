#!/usr/bin/env bash
# Create .venv and install lordo-compile with its test dependencies (idempotent, quick when done).
# galore-torch (the reference the GaLore tests train against) goes in without its declared
# dependencies: its AdamW needs only transformers (a dev extra); bitsandbytes serves its 8-bit
# optimizer, which the tests do not load.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.lordo-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (torch==2.13.0 CPU build and the package; about a minute)"
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --quiet --upgrade pip &&
         .venv/bin/python -m pip install --quiet -e '.[dev]' &&
         .venv/bin/python -m pip install --quiet --no-deps galore-torch==1.0; } >"$log" 2>&1; then
    cat "$log"
    echo "setup failed; the log above is in $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi

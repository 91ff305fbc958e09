#!/usr/bin/env bash
# On a machine with a CUDA GPU: the `gpu` test subset on the device, then the step-time
# benchmark on it. Writes benchmarks/results/gpu_tests.json (the subset's outcome) and
# benchmarks/results/gpu_step_time.json. Sized for under 8 minutes on one GPU.
#
# It uses a Python whose torch already sees the GPU (PYTHON, default python3): the pinned
# CPU build that scripts/setup.sh installs has no CUDA, and a GPU machine without internet
# cannot fetch another. lordo_compile itself is read from this checkout (PYTHONPATH).
#
#     bash scripts/gpu_check.sh            # exit status: the test subset's
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
RESULTS=benchmarks/results

"$PYTHON" - <<'EOF' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: {sys.executable}'s torch {torch.__version__} sees no CUDA GPU; set PYTHON to one that does")
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
if torch.__version__.split("+")[0] != "2.13.0":
    print(f"gpu_check: note: lordo_compile pins torch 2.13.0; this is {torch.__version__}")
EOF

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LORDO_TEST_DEVICE=cuda
export TORCHINDUCTOR_CACHE_DIR="$(mktemp -d -t lordo-inductor-XXXXXX)"
export PYTHONUNBUFFERED=1

# The subset's files are named so that test modules needing dev extras this machine may
# lack (expecttest, torchao) are not collected. At its time limit pytest gets SIGINT, so it
# stops like a Ctrl-C and still writes the outcome of the tests it ran.
timeout -s INT -k 20 150 "$PYTHON" -m pytest -p no:cacheprovider -m gpu -q --junitxml="$TORCHINDUCTOR_CACHE_DIR/gpu.xml" \
    tests/test_parity.py tests/test_inductor.py tests/test_distributed.py tests/test_nonfinite.py \
    tests/passes/test_fuzz.py
tests=$?
"$PYTHON" - "$TORCHINDUCTOR_CACHE_DIR/gpu.xml" "$RESULTS/gpu_tests.json" "$tests" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
import torch
path, out, status = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    cases = list(ET.parse(path).getroot().iter("testcase"))
except (OSError, ET.ParseError):
    cases = []
outcome = {}
for case in cases:
    bad = [child for child in case if child.tag in ("failure", "error", "skipped")]
    outcome[f"{case.get('classname')}::{case.get('name')}"] = (
        {"outcome": bad[0].tag, "message": (bad[0].get("message") or "")[:500]} if bad else {"outcome": "passed"})
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "pytest_status": status,
           "timed_out": status == 124, "tests": outcome}, open(out, "w"), indent=2)
print(f"gpu_check: {sum(v['outcome'] == 'passed' for v in outcome.values())} of {len(outcome)} passed -> {out}")
EOF

# reduce-overhead: the step as CUDA graphs where Inductor can (the launch overhead that
# dominates a model this small). The JSON is written after each batch size.
timeout -s INT -k 20 290 "$PYTHON" -m benchmarks.step_time --device cuda --steps 30 --warmup 5 --first-calls 1 \
    --batch-sizes 16 1 --modes default reduce-overhead \
    --json "$RESULTS/gpu_step_time.json"
exit "$tests"

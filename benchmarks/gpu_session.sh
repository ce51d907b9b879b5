#!/usr/bin/env bash
# Everything one lent GPU session checks, in one call (about 8 minutes): the GPU test suite, then
# benchmarks/gpu_check.sh (speed before/after). Output: $OUT/gpu_tests.log, $OUT/summary.md and $OUT/gpu_check.tgz
# (every raw log, markdown and JSON of the speed check).
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh
#
# Wheels in .whl/ (packages the machine's Python lacks, e.g. a newer transformers) are installed into /tmp/site
# first when present. PYTHON: the interpreter with CUDA torch (default python3).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:?set OUT to a folder for the results}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi -L
echo "== GPU test suite (tests/gpu)"
VLPROMPT_TEST_DEVICE=cuda timeout -k 5 "${GPU_TESTS_TIMEOUT_S:-75}" "$PY" -m pytest -q -p no:cacheprovider tests/gpu \
  > "$OUT/gpu_tests.log" 2>&1
echo "tests/gpu exit status $?"; tail -5 "$OUT/gpu_tests.log"
echo "== speed check"
mkdir -p /tmp/gpu_check
OUT=/tmp/gpu_check PYTHON="$PY" GPU_CHECK_BUDGET_S="${GPU_CHECK_BUDGET_S:-470}" bash benchmarks/gpu_check.sh \
  > /tmp/gpu_check/stdout.log 2>&1
echo "gpu_check exit status $?"
cp /tmp/gpu_check/summary.md "$OUT/summary.md" 2>/dev/null
tar czf "$OUT/gpu_check.tgz" -C /tmp gpu_check
cat "$OUT/summary.md" 2>/dev/null || tail -40 /tmp/gpu_check/stdout.log

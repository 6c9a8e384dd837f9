#!/usr/bin/env bash
# Run here (with package-registry access) before benchmarks/gpu.sh: puts in .gpu/ (git-ignored; pass it
# to the device tool's `carry`) what the device machine's Python 3.12 lacks for the GPU checks: wheels of
# pydantic and its own needs at this environment's versions (the machine has PyTorch, transformers, typer,
# scikit-learn, Pillow and pytest), learn2learn 0.2.0's source archive (its MAML is pure Python: used from
# the unpacked source, nothing to build) and the peer benchmark l2l_bench.py. About 3 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .gpu && mkdir -p .gpu/wheels
pin() { $PIP freeze | grep -i "^$1==" || echo "$1"; }
pure=(pydantic annotated-types typing-inspection typing-extensions)
binary=(pydantic-core)
$PIP download -q --no-deps --only-binary=:all: -d .gpu/wheels $(for p in "${pure[@]}"; do pin "$p"; done)
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .gpu/wheels $(for p in "${binary[@]}"; do pin "$p"; done)
$PIP download -q --no-deps --no-binary=:all: learn2learn==0.2.0 -d .gpu
cp ../shared/peer/l2l_bench.py .gpu/
du -sh .gpu && ls .gpu .gpu/wheels

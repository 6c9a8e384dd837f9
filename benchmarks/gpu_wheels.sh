#!/usr/bin/env bash
# Run here (with package-registry access) before benchmarks/gpu.sh: puts in .gpu/ (git-ignored; pass it
# to the device tool's `carry`) what the device machine's Python 3.12 lacks for the GPU checks: wheels of
# pydantic, Pillow, pytest and Cython at this environment's versions, learn2learn 0.2.0's source archive
# (built there, see ../shared/peer/INSTALL.md) and the peer benchmark l2l_bench.py. About 16 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .gpu && mkdir -p .gpu/wheels
pin() { $PIP freeze | grep -i "^$1==" || echo "$1"; }
pure=(pydantic annotated-types typing-inspection typing-extensions pytest pluggy iniconfig packaging)
binary=(pydantic-core pillow cython)
$PIP download -q --no-deps --only-binary=:all: -d .gpu/wheels $(for p in "${pure[@]}"; do pin "$p"; done)
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .gpu/wheels $(for p in "${binary[@]}"; do pin "$p"; done)
$PIP download -q --no-deps --no-binary=:all: learn2learn==0.2.0 -d .gpu
cp ../shared/peer/l2l_bench.py .gpu/
du -sh .gpu && ls .gpu .gpu/wheels

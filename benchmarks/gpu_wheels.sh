#!/usr/bin/env bash
# Run here (with package-registry access) before benchmarks/gpu.sh: puts in .gpu/ (git-ignored; pass it
# to the device tool's `carry`) what the device machine's Python 3.12 lacks for the GPU checks: wheels of
# pydantic and its own needs at this environment's versions (the machine has PyTorch, transformers, typer,
# scikit-learn, Pillow and pytest), learn2learn 0.2.0's source archive (its MAML is pure Python: used from
# the unpacked source, nothing to build) and the peer benchmark l2l_bench.py. About 10 MB.
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
# the archive itself, by its published address and sha256: `pip download` of a source archive first installs its
# build requirements, which for learn2learn pull in a CUDA torch of several GB
L2L=https://files.pythonhosted.org/packages/7c/6a/5d9b57c2aec439035f3e02f23454ae9cc888aa2388bfe9443476834ada2c
${PIP%pip}python -c "import pooch; pooch.retrieve('$L2L/learn2learn-0.2.0.tar.gz', fname='learn2learn-0.2.0.tar.gz', \
  known_hash='sha256:69f1d7cb0d0a6be7a2c6ad8e83e2ebbe70fb05e51d61e45e63078b40c75ea419', path='.gpu', progressbar=False)"
cp ../shared/peer/l2l_bench.py .gpu/
du -sh .gpu && ls .gpu .gpu/wheels

#!/usr/bin/env bash
# The GPU benchmark: one script, under 8 minutes, for a machine with CUDA GPUs and no network.
#
#   bash benchmarks/gpu_wheels.sh      # here, first: what that machine's Python lacks, into .gpu/
#   bash benchmarks/gpu.sh             # there, from the repository root, with .gpu/ carried along
#
# 1. what the machine has; 2. the carried wheels and learn2learn's source, unpacked into a folder of
# their own (the machine's Python is left as it is); 3. the CUDA tests (tests/test_cuda.py: CPU-vs-CUDA
# meta-gradient agreement for every method, train -> adapt -> predict with --device cuda) and the
# recompute tests; 4. benchmarks/gpu_checks.py: Conv-4 throughput against learn2learn on the same GPU
# (Omniglot- and mini-ImageNet-shaped), tasks looped, vmapped (inner.batch_tasks) and stacked along the channels
# (inner.stack_tasks), fp32/bf16 autocast,
# ResNet-12 throughput and memory, memory against inner steps; then benchmarks/vmap_tasks.py (a plain
# functional Conv-4's tasks looped or batched with vmap); 5. cli.py train on synthetic tasks, tasks looped,
# batched, and stacked along the channels (inner.stack_tasks), and on two NCCL ranks (torchrun) when there
# are two GPUs (with DEVICE=cpu, this part runs on a CPU).
# Figures go to stdout and, as JSON lines, to $OUT (the device tool's output folder) when it is set.
# The first run took 281 s on an H200 (docs/BENCHMARKS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
SITE=/tmp/mtl-gpu-site
started=$(date +%s)
say() { echo "== [$(( $(date +%s) - started )) s] $*"; }

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'PY'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPUs", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for m in ("pydantic", "yaml", "safetensors", "typer", "rich", "transformers", "sklearn", "numpy", "PIL", "pytest",
          "datasets", "pooch", "learn2learn"):
    try:
        importlib.import_module(m)
        print(f"  {m}: here")
    except Exception as e:
        print(f"  {m}: missing ({type(e).__name__})")
PY

say "carried packages -> $SITE"
mkdir -p "$SITE"
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target "$SITE" .gpu/wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .gpu/learn2learn-0.2.0.tar.gz ]; then  # l2l_bench.py loads learn2learn.algorithms alone: pure Python
  tar xzf .gpu/learn2learn-0.2.0.tar.gz -C "$SITE" && export PYTHONPATH="$PYTHONPATH:$SITE/learn2learn-0.2.0"
fi
peer=.gpu/l2l_bench.py; [ -f "$peer" ] || peer=../shared/peer/l2l_bench.py

say "CUDA tests"
# one process on the one GPU: pyproject's `-n auto` would need pytest-xdist, which that machine lacks
timeout 180 $PY -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_cuda.py tests/test_recompute.py 2>&1 | tail -15

say "figures (benchmarks/gpu_checks.py)"
timeout 300 $PY benchmarks/gpu_checks.py --peer "$peer" | tee "$OUT/gpu_checks.jsonl"

say "a plain functional Conv-4's tasks looped or batched with vmap (benchmarks/vmap_tasks.py)"
timeout 60 $PY benchmarks/vmap_tasks.py --device cuda --rounds 2

say "the trainer (cli.py train) on synthetic tasks: tasks looped, batched, stacked, and two NCCL ranks with two GPUs"
work=$(mktemp -d)
$PY - "$work" "${DEVICE:-cuda}" <<'PY'
import sys
from pathlib import Path
from tests.test_cuda import synthetic_tasks
work = Path(sys.argv[1])
(work / "tasks").mkdir()
synthetic_tasks(work / "tasks")
(work / "recipe.yaml").write_text("method: maml\ntasks: [synth-train]\nval_tasks: []\nways: 5\nshots: 1\nqueries: 5\n"
                                  "meta_batch: 32\niterations: 40\nval_every: 1000\ninner: {steps: 1, lr: 0.4}\n"
                                  f"precision: bf16\ndevice: {sys.argv[2]}\n")
PY
common=(cli.py train --config "$work/recipe.yaml" --tasks-dir "$work/tasks" --json)
rate() {  # the run's meta-iterations/s after its first 5, as one JSON line
  $PY - "$work/$1/metrics.jsonl" "$2" "$3" <<'PY' | tee -a "$OUT/gpu_checks.jsonl"
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if '"loss"' in x]
rate = (len(rows) - 5) / (rows[-1]["seconds"] - rows[4]["seconds"])
print(json.dumps({"setting": "cli.py train, synthetic 5-way 1-shot, 5 queries, meta-batch 32, bf16, support BN",
                  "run": sys.argv[1].split("/")[-2], "processes": int(sys.argv[2]), "tasks_together": int(sys.argv[3]),
                  "it_per_s": round(rate, 2), "last_loss": rows[-1].get("loss")}))
PY
}
timeout 120 $PY "${common[@]}" --out "$work/loop" >/dev/null && rate loop 1 1
timeout 120 $PY "${common[@]}" --set inner.batch_tasks=32 --out "$work/batched" >/dev/null && rate batched 1 32
timeout 120 $PY "${common[@]}" --set inner.stack_tasks=32 --out "$work/stacked" >/dev/null && rate stacked 1 32
gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
  timeout 150 $PY -m torch.distributed.run --nproc_per_node 2 "${common[@]}" --out "$work/p2" >/dev/null && rate p2 2 1
else
  say "one GPU: the two-rank NCCL check does not apply"
fi
say "done"

#!/usr/bin/env bash
# Meta-training throughput with 1 and 2 processes (`workers: 2`, which starts torchrun's ranks itself;
# gloo) on this machine: Omniglot 5-way 1-shot, 15 queries, meta-batch 32, second order; the two
# threads go one to each process for 2 processes.
# Prints the iterations per second each run reached (from its metrics.jsonl). Extra arguments
# go to both runs, e.g. `--set inner.bn=transductive`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
common=(train --config configs/omniglot_5way1shot.yaml --json --set iterations=12 --set val_every=1000 --set val_tasks=[] "$@")
python cli.py "${common[@]}" --set threads=2 --out "$out/p1" >/dev/null
python cli.py "${common[@]}" --set threads=2 --workers 2 --out "$out/p2" >/dev/null
for run in p1 p2; do
  python - "$out/$run/metrics.jsonl" "$run" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
rate = (len(rows) - 2) / (rows[-1]["seconds"] - rows[1]["seconds"])
print(json.dumps({"processes": 1 if sys.argv[2] == "p1" else 2, "it_per_s": round(rate, 3)}))
PY
done

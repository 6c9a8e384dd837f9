#!/usr/bin/env python3
"""Few-shot accuracy of ``cli.py adapt`` on held-out text tasks, over several support draws.

For each task, adapts the checkpoint to K shots per class drawn with seeds 0..S-1 (all classes of
the task: 15 for a CLINC150 domain, 77 for BANKING77) and measures accuracy on the task's whole test
split. Prints one JSON line per task: mean over seeds and its 95% CI, and what ``adapt`` chose on each
draw (the meta-learned adaptation, a linear probe, or the probe with token matching; ``--meta-only``:
always the first, as ``adapt`` did before stop 39).

    python benchmarks/text_fewshot.py --checkpoint runs/clinc \
        --tasks clinc150-kitchen-and-dining:5,clinc150-travel:5,clinc150-work:5,banking77:10 --seeds 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mtl.data.registry import Registry
from mtl.run.adapt import adapt
from mtl.run.evaluate import mean_ci
from mtl.run.learner import load_learner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--tasks", required=True, help="task:shots,...")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--head-init", default=None)
    ap.add_argument("--encoder-layers", type=int, default=0, help="also fine-tune this many top encoder layers")
    ap.add_argument("--encoder-epochs", type=int, default=30)
    ap.add_argument("--meta-only", action="store_true", help="the meta-learned adaptation, no probe weighed")
    ap.add_argument("--select", action="store_true", help="adapt --select: fine-tuning weighed too")
    a = ap.parse_args()
    torch.set_num_threads(2)
    reg = Registry()
    learner, _ = load_learner(a.checkpoint, torch.device("cpu"), hold_text=a.encoder_layers == 0)
    pooled: list[float] = []
    for item in a.tasks.split(","):
        name, shots = item.split(":")
        task = reg.load(name)
        accs, chosen, eces, seconds = [], [], [], []
        for seed in range(a.seeds):  # adaptation leaves the loaded learner unchanged: one load serves every seed
            r = adapt(learner, task, shots=int(shots), seed=seed, steps=a.steps, head_init=a.head_init,
                      encoder_layers=a.encoder_layers, encoder_epochs=a.encoder_epochs if a.encoder_layers else None,
                      meta_only=a.meta_only, select=a.select)
            accs.append(r.meta["test_accuracy"])
            chosen.append(r.meta.get("choice", {}).get("method", "meta-learned"))
            eces.append(r.meta["test_ece"])
            seconds.append(r.meta["seconds"])
        mean, ci = mean_ci(accs)
        pooled += accs
        print(json.dumps({"task": name, "shots": int(shots), "classes": len(task.classes), "seeds": a.seeds,
                          "encoder_layers": a.encoder_layers,
                          "accuracy": round(mean, 4), "ci95": round(ci, 4), "per_seed": [round(x, 4) for x in accs],
                          "chosen": chosen, "ece": round(sum(eces) / len(eces), 4),
                          "seconds": [round(x, 1) for x in seconds], "select": a.select}),
              flush=True)


if __name__ == "__main__":
    main()

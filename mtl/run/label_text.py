"""Class names as extra examples: a sentence encoder reads ``card_arrival`` as "card arrival", which
is, to it, one more labelled sentence of that class.

With 5 examples per class that extra one is worth points: BANKING77 5-shot, plain fine-tuning of
all-MiniLM-L6-v2, 80.07% -> 81.88% over three support draws (docs/BENCHMARKS.md). Names that say
nothing ("0", "1", "LABEL_3") are never used, and ``adapt --select`` leaves readable ones out only
when the linear probe's cross-validation on the support set does better without them by more than
its noise (:func:`mtl.run.alternatives.select`): the names raised the probe's test accuracy in 24 of
30 runs on development and held-out tasks, no run's folds were beyond that noise either way, and
following the folds' bare difference left them out where they were worth 6 points (TREC).
"""

from __future__ import annotations

import re

import numpy as np


def readable(name: str) -> str:
    """``AddToPlaylist``, ``card_arrival`` and ``sci/tech`` as words: "add to playlist", "card arrival",
    "sci / tech"."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    words = re.sub(r"[_\-./:]+", lambda m: " / " if m.group() == "/" else " ", words)
    return " ".join(words.lower().split())


def descriptive(names: list[str]) -> bool:
    """Whether every class name is words a sentence encoder can read (at least two letters, not a
    numbered label), and no two read the same."""
    texts = [readable(n) for n in names]
    if len(set(texts)) < len(texts):
        return False
    return all(len(re.findall(r"[^\W\d_]", t)) >= 2 and not re.fullmatch(r"(label|class)?\s*\d+", t) for t in texts)


def with_names(texts: list[str], ys: np.ndarray, names: list[str] | None) -> tuple[list[str], np.ndarray]:
    """``texts`` and labels ``ys`` (indices into ``names``) with each class's readable name added as one
    more example of it; unchanged when ``names`` is None."""
    if names is None:
        return texts, ys
    return texts + [readable(n) for n in names], np.concatenate([ys, np.arange(len(names))])

"""mtl: multi-task learning with a MAML initialization.

Data flows one way: YAML task file -> task -> episodes -> model -> algorithm -> checkpoint ->
adapted model. The public API (docs/API.md)::

    import mtl
    reg = mtl.Registry()                                   # list, load, validate task files
    run = mtl.train("configs/smoke.yaml", out="runs/a")    # meta-train a recipe (mtl.shipped_recipes() lists them)
    model = mtl.adapt("runs/a", task="mnist", shots=5)      # -> AdaptedModel
    model.predict(x); model.predict_proba(x); model.score(x, y); model.save("models/m")
    mtl.evaluate("runs/a", task="omniglot", ways=5, shots=1)
    mtl.compare(["omniglot"], [1, 5], 100, {"maml": "runs/a"})
    mtl.whiten("runs/a")                                   # distances that weigh what tells classes apart
    clf = mtl.FewShotClassifier(checkpoint="runs/a").fit(X, y)   # scikit-learn estimator

Names are imported on first use, so ``import mtl`` (and the CLI) stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from mtl.errors import MtlError, TaskFileError

__version__ = "0.1.0"

_LAZY = {
    "Registry": "mtl.data.registry",
    "train": "mtl.run.trainer",
    "shipped_recipes": "mtl.run.recipe",
    "adapt": "mtl.run.adapt",
    "AdaptedModel": "mtl.run.adapted",
    "evaluate": "mtl.run.evaluate",
    "compare": "mtl.run.compare",
    "whiten": "mtl.run.whitening",
    "FewShotClassifier": "mtl.run.estimator",
    "algorithm": "mtl.algorithms",
    "ALGORITHMS": "mtl.algorithms",
}

__all__ = ["MtlError", "TaskFileError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mtl' has no attribute {name!r}")

"""Experiment trackers beside ``metrics.jsonl``: TensorBoard event files and MLflow runs, each an
optional extra (``pip install 'mtl-fewshot[tracking]'``), chosen with ``log:`` in a recipe or
``--log`` on the command line. Nothing is needed for the default (no tracker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from mtl.errors import MtlError


class Tracker(Protocol):
    def log(self, row: dict[str, Any], step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    """Scalars of every logged row under ``<run>/tensorboard`` (``tensorboard --logdir <run>``)."""

    def __init__(self, out: Path, params: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MtlError("--log tensorboard needs the tensorboard package",
                           "pip install tensorboard (or the project's [tracking] extra)") from None
        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.writer.add_text("recipe", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log(self, row: dict[str, Any], step: int) -> None:
        for k, v in row.items():
            if k != "iteration" and isinstance(v, int | float):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """An MLflow run (to ``MLFLOW_TRACKING_URI``, else ``<run>/mlruns``) with the recipe as parameters."""

    def __init__(self, out: Path, params: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError:
            raise MtlError("--log mlflow needs the mlflow package", "pip install mlflow") from None
        import os

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        mlflow.start_run(run_name=out.name)
        mlflow.log_params({k: str(v)[:250] for k, v in params.items()})

    def log(self, row: dict[str, Any], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "iteration"
                                 and isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS: dict[str, type[TensorBoard] | type[MLflow]] = {"tensorboard": TensorBoard, "mlflow": MLflow}


def flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"inner": {"lr": 0.4}}`` -> ``{"inner.lr": 0.4}``."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_trackers(names: list[str], out: Path, recipe: dict[str, Any]) -> list[Tracker]:
    params = flat(recipe)
    return [TRACKERS[n](out, params) for n in names]

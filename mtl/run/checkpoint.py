"""Checkpoints: one safetensors file holding tensors and, in its metadata, a JSON document.

A single file means a single atomic rename: a reader sees the old checkpoint or the new one, never
a mix. Nothing is unpickled, so loading a checkpoint from elsewhere cannot run code. A JSON copy of
the metadata is written beside it for people and scripts.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from mtl import __version__
from mtl.data.cache import atomic_write_bytes
from mtl.errors import MtlError

FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"mtl": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("numpy", "transformers", "safetensors"):  # read from metadata: importing them is slow
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    meta = {**meta, "format_version": FORMAT_VERSION, "versions": versions()}
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"mtl": json.dumps(meta, sort_keys=True, default=str)})
    atomic_write_bytes(path, blob)
    text = json.dumps({k: v for k, v in meta.items() if k != "optimizer"}, indent=2, sort_keys=True, default=str)
    atomic_write_bytes(path.with_suffix(".json"), text.encode())


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors", "model.safetensors"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise MtlError(f"no checkpoint in {path}", "point at a run folder of `cli.py train` or `cli.py adapt`")
    if not path.exists():
        raise MtlError(f"checkpoint {path} not found", "check the path")
    try:
        raw = path.read_bytes()
        tensors = load(raw)
        from safetensors import safe_open  # metadata lives in the header

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header["mtl"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError, ValueError) as e:
        raise MtlError(f"{path} is not an mtl checkpoint or is damaged ({type(e).__name__})",
                       "use a checkpoint written by this tool; re-run training if it was cut off") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise MtlError(f"{path} has checkpoint format {meta.get('format_version')}, this mtl reads {FORMAT_VERSION}",
                       "re-create the checkpoint with this version")
    meta["path"] = str(path)
    return {k: v.to(device) for k, v in tensors.items()}, meta


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Load ``prefix``-ed tensors into ``module``, refusing mismatched names or shapes with one line."""
    own = module.state_dict()
    got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(got))
    extra = sorted(set(got) - set(own))
    bad = [k for k in set(own) & set(got) if own[k].shape != got[k].shape]
    if missing or extra or bad:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else
                  f"shape of {bad[0]} is {tuple(got[bad[0]].shape)}, the model needs {tuple(own[bad[0]].shape)}")
        raise MtlError(f"checkpoint does not fit the model: {detail}",
                       "use the checkpoint with the config it was trained with")
    module.load_state_dict(got)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as named tensors plus JSON (no pickle)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


__all__ = ["load_checkpoint", "load_into", "restore_optimizer", "save_checkpoint"]

"""Training recipes: one YAML file says what to train and how (torchtune-style), CLI flags override.

See ``configs/`` for the shipped recipes.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtl.algorithms import ALGORITHMS, InnerConfig, get_algorithm
from mtl.errors import MtlError
from mtl.models import ModelConfig
from mtl.run.whitening import SHRINK


class Whitening(BaseModel):
    """``cli.py whiten``'s options, by the same names, for whitening the finished checkpoint's features
    (:mod:`mtl.run.whitening`) as the last step of training, so that a recipe whose figures were measured whitened
    gives a whitened model by itself."""

    model_config = ConfigDict(extra="forbid")
    shrink: float = Field(default=SHRINK, ge=0.0, le=1.0)  # 0 whitens fully, 1 leaves the features as they are
    episodes: int = Field(default=200, ge=1)
    views: Literal[1, 4, 8] = 8  # images: each episode also turned (4) and mirrored (8)
    within_groups: float = Field(default=0.0, ge=0.0, le=1.0)  # as the new tasks will be: one alphabet each


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = "maml"  # a registered algorithm (`cli.py algorithms`)
    tasks: list[str] = Field(min_length=1)  # registry tasks trained on (their train split)
    val_tasks: list[str] = []  # meta-validation episodes, from each task's val split (else test split)
    tasks_dirs: list[str] = []
    ways: int = Field(default=5, ge=2)
    shots: int = Field(default=1, ge=1)
    queries: int = Field(default=15, ge=1)
    meta_batch: int = Field(default=32, ge=1)
    iterations: int = Field(default=1000, ge=1)
    outer_lr: float = Field(default=1e-3, gt=0)
    encoder_lr: float | None = Field(default=None, gt=0)  # outer lr of a pretrained text encoder's layers
    cosine: bool = False  # MAML++: cosine annealing of the outer learning rate
    min_outer_lr: float = 1e-5
    grad_clip: float | None = 10.0
    inner: InnerConfig = InnerConfig()
    model: ModelConfig = ModelConfig()
    augment: str | None = None  # distort training images: a name in mtl.data.augment.AUGMENTATIONS ("affine")
    # the share of training episodes whose classes all come from one group: the part of their names before
    # a "/" (Omniglot's alphabets), as the test problems may be (mtl.data.episodes.class_groups)
    within_groups: float = Field(default=0.0, ge=0.0, le=1.0)
    val_every: int = Field(default=100, ge=1)
    val_episodes: int = Field(default=100, ge=1)
    val_ways: int | None = Field(default=None, ge=2)
    val_shots: int | None = Field(default=None, ge=1)
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int | None = Field(default=None, ge=1)
    # processes sharing each meta-batch's tasks, started by `train` (torchrun's ranks, on this machine):
    # on a CPU each gets threads // workers threads, which is faster than one process with them all
    workers: int = Field(default=1, ge=1)
    # stop (and keep the best checkpoint) after this wall time
    time_limit_minutes: float | None = Field(default=None, gt=0)
    # write last.safetensors at least this often, whatever val_every says: a killed run resumes from it
    save_every_minutes: float | None = Field(default=10.0, gt=0)
    log: list[Literal["tensorboard", "mlflow"]] = []  # experiment trackers, beside metrics.jsonl
    choose_adaptation: bool = True  # at the end, pick adapt's steps and step size on validation episodes
    whiten: Whitening | None = None  # at the very end, whiten the features (nearest-prototype heads only)

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm '{name}'; registered: {', '.join(ALGORITHMS)}")
        return name

    @field_validator("augment")
    @classmethod
    def _augmentation(cls, name: str | None) -> str | None:
        from mtl.data.augment import AUGMENTATIONS

        if name is not None and name not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation '{name}'; known: {', '.join(AUGMENTATIONS)}")
        return name

    @field_validator("tasks", "val_tasks", "log", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        """``tasks: trec`` or ``--set tasks=trec,sst2``: one name, or names separated by commas."""
        return [n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else value

    @field_validator("whiten", mode="before")
    @classmethod
    def _whiten_switch(cls, value: Any) -> Any:
        """``whiten: true`` whitens with the defaults; ``--set whiten=false`` turns a recipe's whitening off."""
        if value is True:
            return {}
        return None if value is False else value

    @model_validator(mode="after")
    def _configured(self) -> Recipe:
        """The inner loop as the algorithm runs it (ANIL adapts the head only...), stored so that a
        checkpoint's recipe rebuilds the same state."""
        method = get_algorithm(self.method)
        if self.inner.cycle_support and not method.cycles_support:
            raise ValueError(f"method {self.method} does not train with inner.cycle_support; "
                             "use method: protonet or leave it out")
        inner = method.configure(self.inner)
        if inner != self.inner:
            object.__setattr__(self, "inner", InnerConfig.model_validate(inner.model_dump()))
        if self.whiten is not None and self.inner.head_init != "proto":
            raise ValueError("whitening serves a head that starts from the class prototypes; use method: protonet "
                             "or inner.head_init: proto, or leave whiten out")
        return self


def load_recipe(path: Path | str | dict[str, Any] | Recipe | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file (or take a dict or a recipe) and apply ``overrides`` (dotted keys, e.g.
    ``inner.steps``; ``None`` values are ignored)."""
    doc: dict[str, Any] = {}
    if isinstance(path, Recipe):
        doc, path = path.model_dump(mode="json"), None
    elif isinstance(path, dict):
        doc, path = dict(path), None
    elif path is not None:
        from mtl import settings

        path = Path(path)
        shipped = settings.BUILTIN_CONFIGS_DIR / path.name
        if not path.exists() and not path.is_absolute() and shipped.exists():  # `--config smoke.yaml`, installed
            path = shipped
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise MtlError(f"config {path} not found", "check the path; shipped recipes are in configs/") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise MtlError(f"{path}: invalid YAML ({str(e).splitlines()[0]})", "fix the syntax") from None
        if not isinstance(doc, dict):
            raise MtlError(f"{path}: a recipe is a mapping of settings", "start from a file in configs/")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = doc
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            child = node.get(p)
            if child is None or child is True:  # absent, or on with its defaults: a section of its own now
                child = node[p] = {}
            elif not isinstance(child, dict):
                section = ".".join(parents[:i + 1])
                raise MtlError(f"--set {key}: {section} is {child!r}, not a section of settings",
                               f"drop --set {section}=..., or set {section} as a whole")
            node = child
        node[leaf] = value
    try:
        return Recipe.model_validate(doc)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" ({len(e.errors())} problems)" if len(e.errors()) > 1 else ""
        msg = err["msg"].removeprefix("Value error, ")
        fix = "see configs/ for valid recipes"
        if err["type"] == "extra_forbidden":  # a misspelt setting: name the one meant
            msg = "unknown setting"
            near = difflib.get_close_matches(str(err["loc"][-1]), settings_at(err["loc"][:-1]), n=1, cutoff=0.6)
            fix = f"did you mean `{'.'.join(map(str, (*err['loc'][:-1], near[0])))}`? Otherwise {fix}" if near else fix
        raise MtlError(f"{path or 'recipe'}: {where}: {msg}", fix + more) from None


def settings_at(loc: tuple[Any, ...]) -> list[str]:
    """The setting names of the recipe's section at ``loc`` (``("inner",)``: the inner loop's), for suggestions."""
    model: Any = Recipe
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        kinds = (getattr(field.annotation, "__args__", None) or (field.annotation,)) if field else ()  # X | None
        model = next((t for t in kinds if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


# what may change when a run is resumed: its length, where it runs, and what happens after its last iteration
RESUMABLE = {"iterations", "time_limit_minutes", "device", "save_every_minutes", "log", "choose_adaptation", "whiten"}


def changed_settings(before: Recipe, now: Recipe) -> list[str]:
    """The settings (dotted names) in which ``now`` differs from ``before``, a run's recipe when it was started, other
    than those in :data:`RESUMABLE`: each as ``name was X, now Y``."""
    return _changes(before.model_dump(mode="json", exclude=RESUMABLE), now.model_dump(mode="json", exclude=RESUMABLE))


def _changes(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(before.keys() | now.keys()):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} was {a!r}, now {b!r}")
    return out


def shipped_recipes() -> list[dict[str, Any]]:
    """The recipes in ``configs/`` (a checkout's, or the installed wheel's), each with its method, tasks, length and
    the first sentence of its notes, so that ``cli.py recipes`` can say which to start from."""
    from mtl import settings

    found = []
    for path in sorted(settings.BUILTIN_CONFIGS_DIR.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        recipe = load_recipe(path)
        notes = " ".join(line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#"))
        limit = f"{recipe.time_limit_minutes:g} min" if recipe.time_limit_minutes else ""
        budget = " or ".join(x for x in (f"{recipe.iterations:,} it.", limit) if x)  # whichever ends the run first
        found.append({"name": path.stem, "path": str(path), "method": recipe.method, "tasks": recipe.tasks,
                      "budget": budget, "summary": _first_sentence(notes)})
    return found


def _first_sentence(notes: str, width: int = 110) -> str:
    """The notes up to the first full stop (not an abbreviation's), cut at a word within ``width``."""
    ends = (i for i, ch in enumerate(notes) if ch == "." and notes[i + 1:i + 2] in ("", " ")
            and not notes[:i].endswith((" al", "e.g", "i.e", " vs")))
    sentence = notes[:next(ends, len(notes) - 1) + 1]
    return sentence if len(sentence) <= width else sentence[:width - 4].rsplit(" ", 1)[0] + " ..."

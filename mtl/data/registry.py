"""The task registry: YAML files in one or more folders, each one task, names unique.

``Registry(dirs)`` parses and validates every file up front (cheap: no data is read), so a bad file
is reported once with its path, field and fix; ``Registry.load(name)`` reads the data (cached).
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from mtl import settings
from mtl.data.schema import Modality, Role, TaskSpec
from mtl.data.task import Task, load_task, read_as, reading, spec_read_as
from mtl.errors import MtlError, TaskFileError, TaskFileErrors

MAX_TASK_FILE_BYTES = 256 * 1024


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys and anchors/aliases (a task file needs neither, and
    aliases allow exponential "billion laughs" documents)."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError("while parsing", None, "aliases (*name) are not allowed in task files",
                                       event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                raise yaml.MarkedYAMLError(None, None, "a mapping key must be a plain value", key_node.start_mark)
            if key in seen:
                raise yaml.MarkedYAMLError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_FIXES = {
    "missing": "add the field",
    "extra_forbidden": "remove it or correct its spelling",
    "literal_error": "use one of the allowed values",
    "string_type": "give a string",
    "int_type": "give a whole number",
    "bool_type": "give true or false",
    "dict_type": "give a mapping (key: value lines)",
    "list_type": "give a list",
    "string_pattern_mismatch": "use lowercase letters, digits, '_', '-' or '.'",
    "string_too_short": "give a non-empty value",
}


# the right shape of the fields most often written as the wrong kind of YAML value, as an example
_SHAPES = {
    "source.files": "files: {train: data/train.csv, test: data/test.csv}",
    "source.columns": "columns: [label, title, text]",
    "source.download": "download: {data/train.csv: {url: https://..., sha256: ...}}",
    "splits.map": "map: {train: training, test: validation}",
    "splits.sizes": "sizes: {train: 0.8, test: 0.2}",
    "splits.classes": "classes: {train: [a, b], test: [c, d]}",
    "labels.include": "include: [positive, negative]",
    "labels.exclude": "exclude: [spam]",
    "labels.names": "names: {1: world, 2: sports}",
    "image.rotations": "rotations: [0, 90, 180, 270]",
    "image.rotate_splits": "rotate_splits: [train]",
}


# a required field left out: the line to add (and a note), so a first task file can be written from the errors
_REQUIRED = {
    "name": ("name: my-task", ""),
    "modality": ("modality: text", "or image"),
    "role": ("role: held_out", "a new task to adapt to; meta_train or meta_val to train on"),
    "source": ("source: {format: csv, path: my_data/examples.csv}", "docs/TASKS.md lists the formats"),
    "source.format": ("format: csv", "`python cli.py formats` lists the formats"),
    "input_field": ("input_field: text", "the column that holds each example"),
    "label_field": ("label_field: label", "the column that holds its class"),
}


def _fix_for(error_type: str, field: str) -> str:
    """How to fix one schema error: its type's usual fix, with the field's shape when it is known."""
    if error_type == "missing" and field in _REQUIRED:
        line, note = _REQUIRED[field]
        return f"add `{line}`" + (f" ({note})" if note else "")
    fix = _FIXES.get(error_type, "see docs/TASKS.md for the schema")
    if error_type in ("dict_type", "list_type") and field in _SHAPES:
        fix += f", e.g. {_SHAPES[field]}"
    return fix


def _field_names() -> list[str]:
    """Every field name of the schema, at any depth: what a misspelt field is compared with."""
    from pydantic import BaseModel

    from mtl.data import schema

    models = [m for m in vars(schema).values() if isinstance(m, type) and issubclass(m, BaseModel)]
    return sorted({name for m in models for name in m.model_fields})


def _field_of(loc: tuple[object, ...]) -> str:
    # pydantic puts union/tag members in loc (e.g. "list[str]", "str"); drop those for readability
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float")))]
    return ".".join(parts) or "(top level)"


class NotATaskFile(TaskFileError):
    """A YAML file in a task folder that is something else: a recipe kept beside the tasks it trains on."""


def parse_task_file(path: Path) -> TaskSpec:
    """Parse and validate one task file; raises :class:`TaskFileErrors`, one line per problem."""
    try:
        if path.stat().st_size > MAX_TASK_FILE_BYTES:
            raise TaskFileErrors([TaskFileError(path, None, f"file is larger than {MAX_TASK_FILE_BYTES} bytes",
                                                "a task file describes a task; keep the data elsewhere")])
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskFileErrors([TaskFileError(path, None, f"not UTF-8 text (byte {e.start})",
                                            "save the file as UTF-8")]) from None
    except OSError as e:
        raise TaskFileErrors([TaskFileError(path, None, f"cannot read the file ({e.strerror})",
                                            "check the path and permissions")]) from None
    try:
        doc = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        fix = ("write the values out instead of anchors (&) and aliases (*)" if "alias" in what else
               "keep one of the two entries" if "duplicate" in what else
               "fix the indentation and syntax (`key: value`, two-space indents)")
        raise TaskFileErrors([TaskFileError(path, where, f"invalid YAML: {what}", fix)]) from None
    except RecursionError:
        raise TaskFileErrors([TaskFileError(path, None, "YAML nested too deeply", "flatten the file")]) from None
    if not isinstance(doc, dict):
        raise TaskFileErrors([TaskFileError(path, None, "the file is empty or not a mapping of fields",
                                            "start from an example in tasks/ (name:, modality:, source: ...)")])
    if "tasks" in doc and "source" not in doc:
        raise NotATaskFile(path, None, "a recipe (it lists `tasks:`), not a task file",
                           f"train with it (`cli.py train --config {path}`); task folders skip recipes")
    try:
        return TaskSpec.model_validate(doc).beside(path.parent, settings.data_dir())
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            if _field_of(err["loc"]) == "source" and err["type"] == "list_type" and isinstance(doc.get("source"), dict):
                continue  # one source given: what is wrong with it is reported inside it, not that it is no list
            msg = err["msg"].removeprefix("Value error, ")
            field = _field_of(err["loc"])
            fix = _fix_for(err["type"], field)
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
                near = difflib.get_close_matches(str(err["loc"][-1]), _field_names(), n=1, cutoff=0.75)
                fix = f"did you mean `{near[0]}`? Otherwise remove it" if near else fix
            problems.append(TaskFileError(path, field, msg, fix))
        raise TaskFileErrors(problems) from None


@dataclass(frozen=True)
class Entry:
    spec: TaskSpec
    file: Path


class Registry:
    """Every task file found in ``dirs`` (recursively; files starting with ``_`` are skipped)."""

    def __init__(self, dirs: Sequence[Path | str] | Path | str | None = None,
                 files: Sequence[Path | str] | None = None) -> None:
        if isinstance(dirs, str | Path):  # one folder
            dirs = [dirs]
        self.dirs = [Path(d) for d in dirs] if dirs is not None else settings.tasks_dirs()
        self.entries: dict[str, Entry] = {}
        self._loaded: dict[tuple[str, int | None], Task] = {}
        problems: list[TaskFileError] = []
        for d in self.dirs:
            if not d.is_dir():
                problems.append(TaskFileError(d, None, "task folder not found", "check the --tasks-dir path"))
        paths = [p for d in self.dirs if d.is_dir() for p in task_files(d)] + [Path(f) for f in files or []]
        self.entries, more = scan(paths, [Path(f) for f in files or []])
        # a file that does not parse keeps only itself out (a warning each; `tasks validate` fails on it, and
        # asking for a task that is not found says why); a missing folder or a name used twice is an error
        self.unread = [e for e in more if e.field != "name" or "already used" not in e.problem]
        problems += [e for e in more if e not in self.unread]
        if problems:
            raise TaskFileErrors(problems)
        for e in self.unread:
            warnings.warn(f"task file left out: {e}", stacklevel=2)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for another process, e.g. a training worker): the task files, not the data loaded
        from them, which the other process reads itself."""
        return {**self.__dict__, "_loaded": {}}

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self.entries.values(), key=lambda e: e.spec.name))

    def __len__(self) -> int:
        return len(self.entries)

    def names(self, role: str | None = None, modality: str | None = None) -> list[str]:
        for value, flag, allowed in ((role, "--role", get_args(Role)), (modality, "--modality", get_args(Modality))):
            if value is not None and value not in allowed:
                raise MtlError(f"{flag} {value} is not a {flag[2:]}", f"use {', '.join(allowed[:-1])} or {allowed[-1]}")
        return [e.spec.name for e in self
                if (role is None or e.spec.role == role) and (modality is None or e.spec.modality == modality)]

    def entry(self, name: str) -> Entry:
        if name not in self.entries and self.unread:  # perhaps in a file that could not be read
            raise TaskFileErrors(self.unread)
        if name not in self.entries:
            close = difflib.get_close_matches(name, list(self.entries), n=3)
            hint = (f"did you mean {', '.join(close)}?" if close else "run `cli.py tasks list` to see the tasks, "
                    "or add --tasks-dir with the folder that holds its task file (or set MTL_TASKS_DIRS)")
            raise MtlError(f"no task named '{name}' in {', '.join(str(d) for d in self.dirs)}", hint)
        return self.entries[name]

    def summaries(self, role: str | None = None, modality: str | None = None) -> list[dict[str, Any]]:
        """One row per task: name, modality, role, classes, examples per split, file; a task whose
        data is not here yet is listed with ``missing`` files (nothing is downloaded)."""
        from mtl.data.availability import missing

        rows = []
        for name in self.names(role=role, modality=modality):
            absent = missing(self.spec(name))
            if absent:
                spec = self.spec(name)
                rows.append({"name": name, "modality": spec.modality, "role": spec.role, "classes": None,
                             "splits": {}, "file": str(self.entry(name).file), "missing": absent})
                continue
            task = self.load(name)
            rows.append({"name": name, "modality": task.modality, "role": task.spec.role,
                         "classes": len(task.classes), "splits": {s: len(v) for s, v in task.splits.items()},
                         "file": str(self.entry(name).file)})
        return rows

    def describe(self, name: str, examples: int = 3) -> dict[str, Any]:
        """A task's file, spec, label names, counts per split and its first ``examples`` examples."""
        task = self.load(name)
        counts = {s: {task.classes[c]: n for c, n in v.counts().items()} for s, v in task.splits.items()}
        train = task.train
        shown = []
        for i in range(min(examples, len(train))):
            x = train.inputs[i]
            shown.append({"label": task.classes[int(train.labels[i])],
                          "input": str(x) if task.modality == "text" else f"image {x.shape} {x.dtype}"})
        return {"name": task.name, "file": str(self.entry(name).file), "spec": task.spec.model_dump(mode="json"),
                "classes": task.classes, "counts": counts, "examples": shown}

    def spec(self, name: str) -> TaskSpec:
        return self.entry(name).spec

    def load(self, name: str, image: Mapping[str, object] | None = None) -> Task:
        """``image``: image options in place of the task file's (a checkpoint's
        ``model.image_overrides``, :func:`mtl.data.task.read_as`)."""
        key = (name, *reading(image))
        if key not in self._loaded:
            e = self.entry(name)
            self._loaded[key] = load_task(spec_read_as(e.spec, image), e.file)
        return self._loaded[key]


def task_read_as(task: str | Task, image: Mapping[str, object] | None, registry: Registry | None = None) -> Task:
    """A task given by name (read from ``registry``) or as a :class:`Task`, its images read with ``image``'s
    options: a checkpoint's ``model.image_overrides``, so it meets the task as it met its training tasks."""
    return read_as(task, image) if isinstance(task, Task) else (registry or Registry()).load(task, image)


def with_dirs(registry: Registry | None, dirs: Sequence[str]) -> Registry:
    """``registry`` (default: the usual folders), also reading ``dirs``, the task folders a checkpoint was trained
    with (its recipe's ``tasks_dirs``) that still exist: its own tasks are found without naming them again."""
    base = registry.dirs if registry is not None else settings.tasks_dirs()
    extra = [d for d in map(Path, dirs) if d.is_dir() and d not in base]
    if extra:
        with contextlib.suppress(TaskFileErrors):  # a folder broken since: not asked for this time, so left out
            return Registry([*base, *extra])
    return registry or Registry(base)


def scan(paths: list[Path], named: Sequence[Path] = ()) -> tuple[dict[str, Entry], list[TaskFileError]]:
    """Parse task files: the valid ones by name, and every problem (schema, duplicate names). A recipe in a
    task folder is skipped (a project folder holds both); one ``named`` on its own is a problem."""
    entries: dict[str, Entry] = {}
    problems: list[TaskFileError] = []
    for path in paths:
        try:
            spec = parse_task_file(path)
        except NotATaskFile as e:
            if path in named:
                problems.append(e)
            continue
        except TaskFileErrors as e:
            problems += e.errors
            continue
        if spec.name in entries:
            problems.append(TaskFileError(path, "name", f"task name '{spec.name}' is already used by "
                                          f"{entries[spec.name].file}", "give one of the two tasks another name"))
            continue
        entries[spec.name] = Entry(spec, path)
    return entries, problems


def validate(paths: list[Path], check_data: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """Check task files or folders of them: the schema, names, and (``check_data``) the data they
    point at. Returns one summary per valid file and one line per problem."""
    files: list[Path] = []
    problems: list[str] = []
    for p in paths:
        if p.is_dir():
            files += task_files(p)
        elif p.exists():
            files.append(p)
        else:
            problems.append(f"{p}: file not found. Fix: check the path.")
    entries, errors = scan(files, [p for p in paths if not p.is_dir()])
    problems += [str(e) for e in errors]
    ok: list[dict[str, Any]] = []
    for e in entries.values():
        item: dict[str, Any] = {"file": str(e.file), "name": e.spec.name}
        if check_data:
            try:
                task = load_task(e.spec, e.file)
            except MtlError as err:
                problems.append(str(err))
                continue
            item.update(classes=len(task.classes), splits={s: len(v) for s, v in task.splits.items()})
        ok.append(item)
    if not files and not problems:
        problems.append("no task files found")
    return ok, problems


def task_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
                  and not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts))

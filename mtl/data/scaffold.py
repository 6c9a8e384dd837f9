"""A first task file written from the data itself (``cli.py tasks init DATA``), so a user starts from a file that
loads instead of from the schema: the format from the file's suffix or the folder's contents, the input and label
columns from their names and values, the splits from sibling files (``train.csv`` beside ``test.csv``) or split
folders, else a stratified 80/20 split. The file is checked by loading the task before it is kept."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml
from pydantic import TypeAdapter, ValidationError

from mtl.data.columns import column_sep, holds_image, named_label, reads_as_data
from mtl.data.formats import IMAGE_SUFFIXES, SPLIT_FOLDERS, read_source, split_folders
from mtl.data.schema import Source, TaskSpec
from mtl.data.task import Task, load_task
from mtl.errors import MtlError, TaskFileError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
LABEL_NAMES = ("label", "labels", "class", "category", "intent", "target", "y", "sentiment", "topic")
INPUT_NAMES = ("text", "sentence", "utterance", "query", "question", "review", "content", "body", "image", "path",
               "file", "filepath", "image_path")


def _rows(path: Path, columns: list[str] | None = None, limit: int = 2000) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a table, read by the reader the task will use; ``columns``: the names of a
    delimited file's columns, which has no header row."""
    options: dict[str, Any] = {"header": False, "columns": columns} if columns else {}
    cols = read_source(Source(format=FORMATS[path.suffix.lower()], path=str(path.resolve()), **options),
                       path.parent)["all"]
    keys = [k for k in cols if not str(k).startswith("_")]
    n = min(limit, len(cols[keys[0]])) if keys else 0
    return [{k: cols[k][i] for k in keys} for i in range(n)]


def _columns(rows: list[dict[str, Any]], path: Path) -> tuple[str, str, str]:
    """(input column, label column, modality) of a table, by the columns' names, else by their values: the label
    repeats (fewest distinct values), the input is the longest text, and image file names make it an image task."""
    keys = list(rows[0]) if rows else []
    if len(keys) < 2:
        raise MtlError(f"{path} has {len(keys)} column(s); a task needs an input column and a label column",
                       "give the file a header row naming both, e.g. text,label")
    named = {k.lower(): k for k in keys}
    distinct = {k: len({str(r[k]) for r in rows}) for k in keys}
    label = next((named[n] for n in LABEL_NAMES if n in named), None) or min(keys, key=lambda k: distinct[k])
    number = label
    label = named_label(keys, label)  # the classes' names where the table has them beside their numbers
    rest = [k for k in keys if k not in (label, number)]
    length = {k: sum(len(str(r[k])) for r in rows) for k in rest}
    inp = next((named[n] for n in INPUT_NAMES if n in named and named[n] != label), None) or max(rest, key=length.get)
    images = all(holds_image(r[inp]) for r in rows[:50])
    return inp, label, "image" if images else "text"


def _image_options(samples: list[Any], folder: Path) -> dict[str, Any]:
    """``image:`` for colour images (files, paths relative to ``folder``, bytes or hub ``{bytes, path}``
    records): read in colour at their own size up to 84 x 84 (mini-ImageNet's); grey ones as the default
    reads them (28 x 28, grey), so nothing is said."""
    from PIL import Image, UnidentifiedImageError

    colour, sides = False, []
    for value in samples[:20]:
        value = (value.get("bytes") or value.get("path")) if isinstance(value, dict) else value
        source = io.BytesIO(value) if isinstance(value, bytes | bytearray) else Path(folder, str(value))
        try:
            with Image.open(source) as img:
                sides.append(min(img.size))
                img.draft("RGB", (64, 64))  # a JPEG decoded small: only the colours are looked at
                rgb = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.int16)
        except (OSError, UnidentifiedImageError):
            continue  # a file the trial load will name
        colour = colour or bool(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).max() > 8)
    return {"image": {"grayscale": False, "size": int(min(84, max(16, np.median(sides))))}} if colour else {}


def _siblings(path: Path) -> dict[str, str]:
    """``train.csv`` beside ``test.csv`` (or ``x_train.csv`` beside ``x_test.csv``): one file per split."""
    stem = path.stem.lower()
    word = next((w for w in SPLIT_FOLDERS if re.search(rf"(^|[_\-.]){w}$", stem)), None)
    if word is None:
        return {}
    found = {}
    for other, split in SPLIT_FOLDERS.items():
        candidate = path.with_name(path.name[:len(stem) - len(word)] + other + path.suffix)
        if candidate.is_file():
            found.setdefault(split, str(candidate.resolve()))
    return found if "train" in found and len(found) > 1 else {}


def task_document(data: Path, name: str, role: str = "held_out") -> dict[str, Any]:
    """The task file for ``data`` (a table, or a folder of class folders), as a mapping in the schema's order."""
    if not data.exists():
        raise MtlError(f"{data} not found", "give a data file (csv, tsv, json, jsonl, parquet) or a folder")
    doc: dict[str, Any] = {"name": name, "modality": "text", "role": role}
    for field, fix in (("name", "use lowercase letters, digits and _ - ., e.g. --name my-task"),
                       ("role", "use held_out, meta_train or meta_val")):
        info = TaskSpec.model_fields[field]
        try:
            kind = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
            TypeAdapter(kind).validate_python(doc[field])
        except ValidationError:
            raise MtlError(f"--{field} {doc[field]!r} is not a task {field}", fix) from None
    if data.is_dir():
        pool = split_folders(data)
        sample = next((f for f in sorted((pool["train"] if pool else data).glob("*/*")) if f.is_file()), None)
        if sample is None:
            raise MtlError(f"{data} holds no class folders of files", "put each class's examples in a folder "
                           "named for the class: FOLDER/<label>/<file>")
        image = sample.suffix.lower() in IMAGE_SUFFIXES
        doc.update(modality="image" if image else "text",
                   source={"format": "imagefolder" if image else "textfolder", "path": str(data.resolve())})
        if image:
            firsts = [next(iter(sorted(d.iterdir())), None) for d in sorted(sample.parent.parent.iterdir())
                      if d.is_dir()]
            doc.update(_image_options([f for f in firsts if f is not None], data))
    else:
        if data.suffix.lower() not in FORMATS:
            raise MtlError(f"{data.name}: no reader for '{data.suffix}' files",
                           f"give one of {', '.join(FORMATS)}, or a folder of class folders")
        rows = _rows(data)
        options: dict[str, Any] = {}
        default = "\t" if data.suffix.lower() == ".tsv" else ","
        if data.suffix.lower() in (".csv", ".tsv") and column_sep(data, default) != default:
            options["sep"] = column_sep(data, default)  # the reader finds it too; written so that it shows
        if data.suffix.lower() in (".csv", ".tsv") and any(reads_as_data(str(k)) for k in rows[0]):
            names = [f"column{i + 1}" for i in range(len(rows[0]))]  # no header row: the first row is an example
            inp, label, _ = _columns(_rows(data, names), data)
            names = ["text" if n == inp else "label" if n == label else n for n in names]
            options.update(header=False, columns=names)
            rows = _rows(data, names)
        inp, label, modality = _columns(rows, data)
        files = _siblings(data)
        fmt = FORMATS[data.suffix.lower()]
        doc.update(modality=modality, source={"format": fmt, **({"files": files} if files else
                                                                {"path": str(data.resolve())}), **options},
                   input_field=inp, label_field=label)
        if modality == "image":
            doc.update(_image_options([r[inp] for r in rows[::max(1, len(rows) // 20)]], data.parent))
        pool = files or None
    if not pool:
        doc["splits"] = {"by": "examples", "sizes": {"train": 0.8, "test": 0.2}}
    elif "val" in pool:
        doc["val_split"] = "val"
    TaskSpec.model_validate(doc)
    return doc


def _trial(doc: dict[str, Any], path: Path, data: Path) -> Task:
    """The task ``doc`` describes, loaded as if written at ``path``; its problems are said of ``data``."""
    try:
        return load_task(TaskSpec.model_validate(doc), path)
    except MtlError as e:
        raise _unwritten(e, data) from None


def _unwritten(e: MtlError, data: Path) -> MtlError:
    """A trial load's problem, said of the data (the task file it names was not written): a split left empty
    means too few examples per class to hold a fifth out, where `adapt --examples` takes the file as it is."""
    if not isinstance(e, TaskFileError):
        return e
    if e.field == "splits" and "is empty" in e.problem:
        return MtlError(f"{data}: too few examples of each class to hold a fifth out as a test split",
                        f"give a test file of its own ({data.stem}_train{data.suffix} beside "
                        f"{data.stem}_test{data.suffix}), or adapt to it as it is: "
                        f"`cli.py adapt --checkpoint RUN --examples {data} --out MODEL`")
    return MtlError(f"{data}, read as a task ({e.field}): {e.problem}", e.fix)


def write_task_file(data: Path, name: str, out: Path, role: str = "held_out", force: bool = False
                    ) -> tuple[Path, Task]:
    """Write ``out/<name>.yaml`` for ``data`` once the task it describes loads; returns its path and the task."""
    doc = task_document(data, name, role)
    path = out / f"{name}.yaml"
    if path.exists() and not force:
        raise MtlError(f"{path} already exists", "choose another --name, or pass --force to replace it")
    try:
        task = load_task(TaskSpec.model_validate(doc), path)  # a file that would not load is not written
    except MtlError as e:
        if "files" not in doc["source"]:
            raise _unwritten(e, data) from None
        # the sibling files are laid out otherwise (SST-2's test file): the one file given, split 80/20
        doc["source"] = {**{k: v for k, v in doc["source"].items() if k != "files"}, "path": str(data.resolve())}
        doc.pop("val_split", None)
        doc["splits"] = {"by": "examples", "sizes": {"train": 0.8, "test": 0.2}}
        task = _trial(doc, path, data)
    out.mkdir(parents=True, exist_ok=True)
    header = f"# Written by `cli.py tasks init {data}`; check the guesses (docs/TASKS.md lists every field).\n"
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path, task

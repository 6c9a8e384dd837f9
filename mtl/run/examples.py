"""A user's own labelled examples, read from a file: a CSV or JSON lines of ``text``, ``label`` (for images,
each image file's path and its label), or a folder of ``label/image`` files (``cli.py adapt --examples``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from mtl import settings
from mtl.data.columns import column_sep, holds_image, joined_texts, named_label
from mtl.data.formats import IMAGE_SUFFIXES
from mtl.data.images import prepare_images
from mtl.data.schema import ImageOptions
from mtl.errors import MtlError, TaskFileError


def columns(keys: list[str], fields: tuple[list[str], str] | None) -> tuple[list[str], str] | None:
    """Which columns hold the text and the label: ``text`` and ``label``, else the task file's own fields
    (``fields``: its input columns, joined as the task joins them, and its label column), else the only two
    columns there are, in order; None if none of these fits. A ``label_text`` beside the label is taken in its
    place (:func:`~mtl.data.columns.named_label`)."""
    for inputs, label in ((["text"], "label"), fields or ([], "")):
        if inputs and {*inputs, label} <= set(keys):
            return inputs, named_label(keys, label)
    return ([keys[0]], keys[1]) if len(keys) == 2 else None


TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def table_rows(path: Path) -> list[Any]:
    """The rows of a UTF-8 CSV/TSV with a header (its columns separated as :func:`column_sep` finds), of JSON
    lines, or of a JSON list (each row a mapping, if the file is right)."""
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
            if not isinstance(rows, list):
                raise MtlError(f"{path} holds one JSON {type(rows).__name__}, not a list of rows",
                               'give a list such as [{"text": "...", "label": "..."}, ...], or JSON lines')
            return rows
        sep = column_sep(path, "\t" if path.suffix == ".tsv" else ",")
        return list(csv.DictReader(path.open(encoding="utf-8-sig", newline=""), delimiter=sep))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise MtlError(f"cannot read {path} ({e})", "use UTF-8 CSV with a header, JSON lines or a JSON list") from None


def examples_modality(path: Path) -> str:
    """Whether a file (or folder) of labelled examples holds images or texts: image files by their suffix (in a
    folder, any file; in a table, the input column's first value)."""
    if path.is_dir():
        images = any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.rglob("*") if f.is_file())
        return "image" if images else "text"
    if not path.exists():
        raise MtlError(f"examples file {path} not found", "check the path")
    rows = table_rows(path)
    pair = columns(list(rows[0]), None) if rows and isinstance(rows[0], dict) else None
    return "image" if pair and holds_image(rows[0].get(pair[0][0], "")) else "text"


def read_examples(path: Path | str, modality: str, image: ImageOptions, fields: tuple[list[str], str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labelled examples from a CSV/JSONL (columns as :func:`columns` finds them) or a folder ``label/image``
    (``label/text file`` for a text task); ``fields``: the task's input columns and label column."""
    path = Path(path)
    if not path.exists():
        raise MtlError(f"examples file {path} not found", "check the path")
    texts: list[Any] = []
    labels: list[str] = []
    if path.is_dir() and modality == "text":  # a folder per class of text files, as `format: textfolder` reads
        from mtl.data.formats import read_source
        from mtl.data.schema import Source

        try:
            raw = read_source(Source(format="textfolder", path=str(path.resolve())), path)
        except TaskFileError as e:
            raise MtlError(f"{path}: {e.problem}", e.fix) from None
        texts = [t for cols in raw.values() for t in cols["text"]]
        labels = [y for cols in raw.values() for y in cols["label"]]
        if not all(t.strip() for t in texts):
            raise MtlError(f"{path} holds an empty text file", "fill it in, or delete it")
        inputs = np.asarray(texts, dtype=np.str_)
    elif path.is_dir():
        files = sorted(p for p in path.glob("*/*") if p.is_file())
        texts = [p.read_bytes() for p in files]
        labels = [p.parent.name for p in files]
        names = [str(p) for p in files]
        inputs = prepare_images(texts, image, names)
    else:
        rows = table_rows(path)
        pair = columns(list(rows[0]), fields) if rows and isinstance(rows[0], dict) else None
        for n, row in enumerate(rows, 1):
            if pair is None or not isinstance(row, dict) or not {*pair[0], pair[1]} <= set(row):
                named = f" (or the task's {','.join([*fields[0], fields[1]])})" if fields else ""
                raise MtlError(f"{path} row {n} has no `text` and `label` fields",
                               f"name the columns text,label{named}, or keep just two: the text, then the label")
            texts += joined_texts([[row[c]] for c in pair[0]])
            if not texts[-1]:
                raise MtlError(f"{path} row {n} has no text", "fill in its text, or delete the row")
            labels.append(str(row[pair[1]] if row[pair[1]] is not None else "").strip())
            if not labels[-1]:
                raise MtlError(f"{path} row {n} has no label", "fill in its label, or delete the row (texts without "
                               "labels can go to --unlabeled)")
        if modality == "image":  # a table of image files and labels, paths relative to the table's folder
            try:
                inputs = prepare_images(texts, image, folders=[path.parent, settings.data_dir()])
            except TaskFileError as e:  # located in the examples file, not a task file's field
                raise MtlError(f"{path}: {e.problem}", e.fix) from None
        else:
            inputs = np.asarray(texts, dtype=np.str_)
    if not labels:
        raise MtlError(f"{path} holds no examples", "add at least one example per class")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise MtlError(f"{path} has only one label ({classes[0]})", "give examples of at least two classes")
    ids = np.asarray([classes.index(x) for x in labels])
    return inputs, ids, classes

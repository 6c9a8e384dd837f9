"""What ``predict`` is given: texts or image paths, ``.txt`` files of them, tables (CSV/TSV/JSON/JSONL) and folders of
images, read into one list of inputs (and, from a table with a ``label`` column, the label each should get)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtl.data.columns import joined_texts, named_label
from mtl.data.formats import IMAGE_SUFFIXES
from mtl.errors import MtlError
from mtl.run.examples import TABLE_SUFFIXES, table_rows


def is_a(path: Path, kind: str) -> bool:
    """Whether ``path`` is a ``"file"`` or a ``"dir"``; False for a text too long to be a file name."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except OSError:
        return False


def first_blank(texts: Sequence[str]) -> int | None:
    """The position of the first empty (or all-space) text, which would get a label all the same, from nothing."""
    return next((i for i, t in enumerate(texts) if not t.strip()), None)


def visible_files(folder: Path) -> list[Path]:
    """Every file below ``folder`` in a stable order, hidden ones (``.DS_Store``, ``.git``) left out."""
    return sorted(f for f in folder.rglob("*") if f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def image_files(folder: Path) -> list[str]:
    """Every image file below ``folder``; other files (notes) are skipped, since a folder of class folders is how
    users keep images."""
    from PIL import Image

    suffixes = {ext.lower() for ext in Image.registered_extensions()}
    found = [str(f) for f in visible_files(folder) if f.suffix.lower() in suffixes]
    if not found:
        raise MtlError(f"no image files in {folder}", "give a folder holding .png/.jpg images, or image paths")
    return found


def text_files(folder: Path) -> list[str]:
    """The text of every file below ``folder`` (one example each, as `format: textfolder` reads them)."""
    texts = []
    for f in visible_files(folder):
        try:
            texts.append(f.read_text(encoding="utf-8-sig").strip())
        except UnicodeDecodeError:
            raise MtlError(f"{f} is not UTF-8 text", "save it as UTF-8, or move it out of the folder") from None
    if not texts:
        raise MtlError(f"no files in {folder}", "give a folder of text files, one text each")
    return texts


def class_folders(folder: Path, files: Sequence[str | Path], classes: Sequence[str]) -> list[str] | None:
    """The class each file's folder names, where ``folder`` holds one folder per class of the model and nothing
    else (``test/cat/1.jpg``): a labelled test folder is scored as a table with a label column is; else None."""
    parts = [Path(f).relative_to(folder).parts for f in files]
    labels = [p[0] for p in parts]
    return labels if all(len(p) == 2 for p in parts) and set(labels) <= set(classes) else None


def table_inputs(path: Path, modality: str, fields: list[str] | None = None) -> tuple[list[str], list[str] | None]:
    """The inputs listed in a table, and its ``label`` column if it has one: its ``text`` column (images:
    ``image``, ``path``, ``file`` or ``filepath``, relative to the table's folder), else the task's input
    columns (``fields``), else the one column that is not ``label``."""
    rows = table_rows(path)
    keys = list(rows[0]) if rows and isinstance(rows[0], dict) else []
    named = [["text"]] if modality == "text" else [["image"], ["path"], ["file"], ["filepath"]]
    label = named_label(keys)  # a label's name where the table has it beside its number
    rest = [k for k in keys if k not in ("label", label)]
    cols = next((c for c in [*named, fields or [], rest if len(rest) == 1 else []] if c and set(c) <= set(keys)),
                None)
    if cols is None:
        raise MtlError(f"{path} has columns {', '.join(keys) or '(none)'}: which holds the inputs?",
                       f"name it `{named[0][0]}`, or keep that column alone (a `label` column may stay)")
    bad = next((n for n, row in enumerate(rows, 1) if not isinstance(row, dict) or not set(cols) <= set(row)), None)
    if bad is not None:
        raise MtlError(f"{path} row {bad} has no `{'`, `'.join(cols)}`", "give every row its input")
    values = joined_texts([[row[c] for row in rows] for c in cols])
    if modality == "image":
        values = [v if Path(v).is_absolute() else str(path.parent / v) for v in values]
    labels = [str(row.get(label, "")).strip() for row in rows] if label in keys else None
    return values, labels


def read_inputs(items: Sequence[str], modality: str, meta: dict[str, Any], classes: Sequence[str] = ()
                ) -> tuple[list[str], list[str | None]]:
    """Texts, or image paths; a ``.txt`` file holds one text (or image path) per line, a table its inputs
    (:func:`table_inputs`), and a folder every image (image models) or text file (text models) below it. Returns
    the inputs and, for each, the label its table (or its class folder, :func:`class_folders`) gave it (None where
    there is none)."""
    expanded: list[str] = []
    expected: list[str | None] = []
    for item in items:
        p = Path(item)
        labels: list[str] | None = None
        before = len(expanded)
        if p.suffix == ".txt" and is_a(p, "file"):  # a text is looked up on disk only where it may be a path
            expanded += [line for line in p.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        elif p.suffix.lower() in TABLE_SUFFIXES and is_a(p, "file"):
            values, labels = table_inputs(p, modality, meta.get("input_fields"))
            expanded += values
        elif is_a(p, "dir"):  # every image (image models) or text file (text models) below it
            values = image_files(p) if modality == "image" else text_files(p)
            labels = class_folders(p, values if modality == "image" else visible_files(p), classes)
            expanded += values
        elif modality == "text" and p.suffix.lower() in IMAGE_SUFFIXES and is_a(p, "file"):
            raise MtlError(f"{item} is an image, and this model reads texts (adapted to {meta['task']})",
                           "give it texts, or predict with a model adapted to an image task")
        else:
            expanded.append(item)
        expected += [label or None for label in labels] if labels is not None else [None] * (len(expanded) - before)
    if not expanded:
        raise MtlError("no inputs to predict", "give texts, image paths or a .txt file of them")
    if modality == "text":
        blank = first_blank(expanded)
        if blank is not None:
            raise MtlError(f"input {blank + 1} is empty", "give the text to label")
    return expanded, expected


def table_score(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Accuracy (and its 95% CI) of ``predict``'s rows over those whose table gave the label they should get."""
    right = [r["label"] == r["expected"] for r in rows if "expected" in r]
    if not right:
        return None
    acc = sum(right) / len(right)
    return {"accuracy": acc, "ci95": 1.96 * math.sqrt(acc * (1 - acc) / len(right)), "labelled": len(right)}

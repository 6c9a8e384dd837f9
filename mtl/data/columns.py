"""What a data file's columns hold: a usable label, a text joined from several columns, a header row that is
really the file's first example, the character between the columns. Shared by the task loader and by the tables
a user gives ``adapt`` and ``predict``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl.data.schema import FIELD_SEP


def is_label(v: object) -> bool:
    """A label is a non-empty string or a finite number; None, NaN, blanks and lists are not."""
    if isinstance(v, str):
        return bool(v.strip())
    if isinstance(v, bool | int | np.integer):
        return True
    if isinstance(v, float | np.floating):
        return bool(np.isfinite(v))
    return False


def reads_as_data(name: str) -> bool:
    """A column name that is a number or a sentence: a header row that is the file's first example."""
    try:
        float(name)
        return True
    except ValueError:
        return len(name) > 40 or name.count(" ") >= 3


def joined_texts(columns: Sequence[Sequence[object]]) -> list[str]:
    """Each row's non-empty values of several text columns (a title and a body), joined by :data:`FIELD_SEP`;
    a missing value (None, NaN, blank) is left out, and a row with none is empty (an error when decoded)."""
    def part(v: object) -> str:
        if v is None or (isinstance(v, float | np.floating) and not np.isfinite(v)):
            return ""
        return str(v).strip()

    return [FIELD_SEP.join(p for p in map(part, row) if p) for row in zip(*columns, strict=True)]


def holds_image(value: object) -> bool:
    """A table cell that is an image: a file's name by its suffix, its bytes, or the ``{bytes, path}`` record of
    a Hugging Face data set saved as parquet (how image data sets come from the hub)."""
    from mtl.data.formats import IMAGE_SUFFIXES

    if isinstance(value, bytes | bytearray):
        return True
    if isinstance(value, dict):
        return bool({"bytes", "path"} & set(value))
    return str(value).strip().lower().endswith(IMAGE_SUFFIXES)


LABEL_TEXT = ("label_text", "label_name", "class_name")  # Hugging Face exports and SetFit's data sets have both


def named_label(keys: Sequence[str], label: str = "label") -> str:
    """The column that names the classes where a table has both a label's number and its name (``label`` 3,
    ``label_text`` "sports"): the names are what a user reads and gives again; else ``label``."""
    return next((k for k in keys if str(k).lower() in LABEL_TEXT), label)


SEPARATORS = (",", "\t", ";", "|")


def column_sep(path: Path, default: str) -> str:
    """The character between a delimited file's columns, from its first line: ``default`` (the suffix's) if the
    line has it, else the one of :data:`SEPARATORS` it has most (Excel in much of Europe saves ``.csv`` files
    with ``;``; many ``.csv`` files hold tabs)."""
    try:
        with path.open(encoding="utf-8-sig", errors="replace") as f:
            first = f.readline()
    except OSError:
        return default
    counts = {sep: first.count(sep) for sep in SEPARATORS}
    best = max(counts, key=counts.get)
    return default if counts.get(default) or not counts[best] else best

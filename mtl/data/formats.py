"""Readers: one per source format, each returning ``{split: {column: values}}``.

A name maps to a reader (``READERS``), as timm maps a name to a model builder. Formats that the
`datasets` library has a builder for go through it; the others are the formats of the shipped data.
A source given as one ``path`` yields a single split called ``all``; ``files`` yields the named splits.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

from mtl import settings
from mtl.data.columns import column_sep
from mtl.data.fetch import locate, offline
from mtl.data.schema import Source
from mtl.errors import TaskFileError

Columns = dict[str, Any]
T = TypeVar("T")
Raw = dict[str, Columns]
Reader = Callable[[Source, Path], Raw]
READERS: dict[str, Reader] = {}
MAX_IMAGE_BYTES = 64 * 2**20  # one encoded image; a larger one is a mistake or a decompression bomb
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def reader(*formats: str) -> Callable[[Reader], Reader]:
    def register(fn: Reader) -> Reader:
        for f in formats:
            READERS[f] = fn
        return fn
    return register


def read_source(source: Source, root: Path) -> Raw:
    return READERS[source.format](source, root)


def resolve(path: str, root: Path, field: str, source: Source | None = None) -> Path:
    """A path from a task file: absolute, or relative to the data directory; a relative path
    missing there is looked for in the download cache, then fetched if ``source`` says from where."""
    p = Path(path).expanduser()
    full = p if p.is_absolute() else root / p
    try:
        exists = full.exists()
    except OSError as e:  # e.g. a name longer than the file system allows
        raise TaskFileError(None, field, f"'{path[:80]}{'...' if len(path) > 80 else ''}' cannot be a path "
                            f"({e.strerror})", "correct the path") from None
    if settings.safe_mode() and not full.resolve().is_relative_to(root.resolve()):
        raise TaskFileError(None, field, f"'{path}' is outside the data directory {root} (safe mode)",
                            "move the data under MTL_DATA_DIR, or run without --safe if you trust this file")
    if not exists and not p.is_absolute():
        fetched = locate(path, source.download if source else None)
        if fetched is not None:
            return fetched
    if not exists:
        raise TaskFileError(None, field, f"'{path}' not found (looked at {full})",
                            "correct the path" + ("" if p.is_absolute() else " (relative to MTL_DATA_DIR or to "
                                                  "the task file's folder)")
                            + ", or point MTL_DATA_DIR at the folder that holds it")
    return full


def located(source: Source, root: Path) -> dict[str, list[Path]]:
    """``{split: [paths]}`` for a path- or files-based source."""
    if source.files is not None:
        items = source.files.items()
        return {split: [resolve(p, root, f"source.files.{split}", source) for p in _as_list(v)]
                for split, v in items}
    assert source.path is not None
    paths = [resolve(p, root, "source.path", source) for p in _as_list(source.path)]
    if source.format in ("imagefolder", "textfolder") and len(paths) == 1 and (splits := split_folders(paths[0])):
        return {split: [folder] for split, folder in splits.items()}
    return {"all": paths}


SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}


def split_folders(folder: Path) -> dict[str, Path] | None:
    """A folder of class folders kept per split, ``folder/train/<label>/...`` and ``folder/test/<label>/...``
    (as most image data sets ship): ``{split: its folder}``, or None for a folder of class folders."""
    if not folder.is_dir():
        return None
    found = {SPLIT_FOLDERS[d.name.lower()]: d for d in sorted(folder.iterdir())
             if d.is_dir() and d.name.lower() in SPLIT_FOLDERS}
    return found if "train" in found and len(found) > 1 else None


def _as_list(v: str | list[str]) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


def _bad_file(path: Path, field: str, why: object, fix: str) -> TaskFileError:
    return TaskFileError(None, field, f"cannot read {path.name} ({why})", fix)


# --- through the `datasets` library ---------------------------------------------------------------

@reader("csv", "tsv", "json", "jsonl", "parquet", "imagefolder", "hub")
def read_with_datasets(source: Source, root: Path) -> Raw:
    """Through `datasets.load_dataset`: csv/tsv/json/jsonl/parquet files, image folders, hub ids."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as ours, once
    kwargs: dict[str, Any] = {}
    fmt = source.format
    if fmt in ("csv", "tsv"):
        kwargs["sep"] = source.sep or ("\t" if fmt == "tsv" else ",")
        kwargs["keep_default_na"] = False  # the sentence "null" is text, not a missing value
        if fmt == "tsv":
            kwargs["quoting"] = csv.QUOTE_NONE
        if not source.header:
            kwargs["header"] = None
        if source.columns:
            kwargs["column_names"] = source.columns
        kwargs["encoding"] = source.encoding
    if fmt == "hub" and settings.safe_mode():
        raise TaskFileError(None, "source.dataset", "hub datasets can run the dataset's own code; refused in safe "
                            "mode", "download the data and register the local files, or run without --safe")
    try:
        if fmt == "hub":
            ds = load_hub(source)
        else:
            files = located(source, root)
            data_files = {_hf_split(split): [str(p) for p in paths] for split, paths in files.items()}
            first = next((p for ps in files.values() for p in ps if p.is_file()), None)
            if fmt in ("csv", "tsv") and source.sep is None and first is not None:  # `;` from Excel, tabs in a .csv
                kwargs["sep"] = column_sep(first, kwargs["sep"])
            if fmt == "imagefolder":
                kwargs["drop_labels"] = False
                dirs = [p for ps in files.values() for p in ps if p.is_dir()]
                if dirs:  # a folder: let the builder find every image below it
                    data_files = {_hf_split(s): [str(p / "**") for p in ps] for s, ps in files.items()}
            builder = {"tsv": "csv", "jsonl": "json"}.get(fmt, fmt)
            # `datasets` keeps an Arrow copy of every local source it reads: under our cache, not ~/.cache
            ds = datasets.load_dataset(builder, data_files=data_files, cache_dir=str(settings.cache_dir() / "hf"),
                                       **kwargs)
    except TaskFileError:
        raise
    except Exception as e:  # the library raises many types; all mean "could not read this source"
        where = source.dataset or source.path or source.files
        while e.__cause__ is not None or e.__context__ is not None:  # the root cause says what is wrong
            e = e.__cause__ or e.__context__  # type: ignore[assignment]
        if fmt == "hub" and not Path(str(source.dataset)).exists() and _unreachable(e):
            at = f"{source.dataset}" + (f"@{source.revision[:12]}" if source.revision else "")
            raise TaskFileError(None, "source.dataset", f"could not fetch the hub data set {at} from huggingface.co "
                                f"({'MTL_OFFLINE is set' if offline() else 'no network?'})",
                                "run once where huggingface.co is reachable (`datasets` keeps the copy in HF_HOME), "
                                "or download its parquet files and register them with `format: parquet`") from None
        raise TaskFileError(None, "source", f"`datasets` could not load {where} as {fmt}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                            "check the format, separator and columns, or the hub id and config") from None
    out: Raw = {}
    for hf_split, part in ds.items():
        split = "all" if hf_split == _ALL else hf_split
        cols: Columns = {}
        for name in part.column_names:
            feature = part.features[name]
            if isinstance(feature, datasets.Image):  # decoded by us, so that a corrupt file gets a clear error
                cols[name], cols["_names"] = _image_column(part.cast_column(name, datasets.Image(decode=False)), name)
                continue
            values = part[name]
            if isinstance(feature, datasets.ClassLabel):
                values = [feature.int2str(v) for v in values]
            cols[name] = values
        out[split] = cols
    return out


def load_hub(source: Source) -> Any:
    """A hub data set at its pinned revision; offline (MTL_OFFLINE) only from `datasets`' own cache."""
    import datasets
    import huggingface_hub

    huggingface_hub.utils.logging.set_verbosity_error()  # its retry warnings would bury our one line
    if offline():
        datasets.config.HF_HUB_OFFLINE = True
    return datasets.load_dataset(source.dataset, source.config, revision=source.revision)


def _unreachable(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("connection", "not cached", "offline", "resolve", "timed out", "timeout"))


class _Lazy(Sequence[T]):
    """A column computed row by row on access: a hub data set of full-size photographs (mini-ImageNet's
    is 7 GB) is read from its memory-mapped Arrow table, decoded and resized one image at a time
    instead of being held in memory whole."""

    def __init__(self, n: int, get: Callable[[int], T]) -> None:
        self._n, self._get = n, get

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._get(i % self._n)


def _image_column(part: Any, name: str) -> tuple[_Lazy[bytes], _Lazy[str]]:
    """One split's encoded images and their paths (``#i`` without one), read lazily; the path is what
    an error about a corrupt image must name, since folders of several classes reuse file names."""
    part = part.select_columns([name])

    def path_of(i: int) -> str:
        path = part[i][name].get("path")
        return str(path) if path else f"#{i}"

    return _Lazy(len(part), lambda i: _image_bytes(part[i][name])), _Lazy(len(part), path_of)


def _image_bytes(value: dict[str, Any]) -> bytes:
    if value.get("bytes") is not None:
        return value["bytes"]
    path = Path(value["path"])
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise TaskFileError(None, "source", f"image {path.name} is {path.stat().st_size:,} bytes (limit "
                            f"{MAX_IMAGE_BYTES:,})", "shrink the image or remove it from the data")
    return path.read_bytes()


_ALL = "all_examples"  # `datasets` reserves the split name "all"


def _hf_split(split: str) -> str:
    return _ALL if split == "all" else split


# --- formats of the shipped data ----------------------------------------------------------------

@reader("json_rows")
def read_json_rows(source: Source, root: Path) -> Raw:
    """JSON holding rows as lists: ``{split: [[text, label], ...]}`` (CLINC150), or one list per file."""
    columns = source.columns or ["text", "label"]
    out: Raw = {}
    for split, paths in located(source, root).items():
        for path in paths:
            try:
                data = json.loads(path.read_text(encoding=source.encoding))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _bad_file(path, "source", e, f"the file must be JSON in {source.encoding} "
                                "(or set `encoding`)") from None
            parts = data.items() if isinstance(data, dict) else [(split, data)]
            for name, rows in parts:
                if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) != len(columns)
                                                     for r in rows):
                    raise TaskFileError(None, "source.columns",
                                        f"{path.name}: '{name}' is not a list of rows of {len(columns)} values",
                                        f"set `columns` to one name per value of a row (now {columns})")
                cols = out.setdefault(name, {c: [] for c in columns})
                for row in rows:
                    for c, v in zip(columns, row, strict=True):
                        cols[c].append(v)
    return out


@reader("split_lines")
def read_split_lines(source: Source, root: Path) -> Raw:
    """One example per line, fields split on the first ``sep`` (e.g. SST-2's ``label sentence``)."""
    columns = source.columns or ["label", "text"]
    sep = source.sep or "\t"
    out: Raw = {}
    for split, paths in located(source, root).items():
        cols = out.setdefault(split, {c: [] for c in columns})
        for path in paths:
            lines = _read_lines(path, "source", source.encoding)
            if source.header:
                lines = lines[1:]
            for n, line in enumerate(lines, start=2 if source.header else 1):
                if not line.strip():
                    continue
                parts = line.split(sep, len(columns) - 1)
                if len(parts) != len(columns):
                    raise TaskFileError(None, "source.sep", f"{path.name} line {n} has {len(parts)} fields, "
                                        f"expected {len(columns)} ({columns}) split on {sep!r}",
                                        "set `sep` and `columns` to match the file")
                for c, v in zip(columns, parts, strict=True):
                    cols[c].append(v.strip())
    return out


@reader("line_pairs")
def read_line_pairs(source: Source, root: Path) -> Raw:
    """A folder per split with a text file and a label file, line-aligned (SNIPS)."""
    out: Raw = {}
    for split, folders in located(source, root).items():
        texts: list[str] = []
        labels: list[str] = []
        for folder in folders:
            t = _read_lines(resolve(str(folder / source.text_file), root, "source.text_file"), "source",
                            source.encoding)
            lab = _read_lines(resolve(str(folder / source.label_file), root, "source.label_file"), "source",
                              source.encoding)
            if len(t) != len(lab):
                raise TaskFileError(None, "source", f"{folder}: {len(t)} texts but {len(lab)} labels",
                                    "the text and label files must have one line per example")
            texts += [x.strip() for x in t]
            labels += [x.strip() for x in lab]
        out[split] = {"text": texts, "label": labels}
    return out


@reader("textfolder")
def read_textfolder(source: Source, root: Path) -> Raw:
    """A folder per class of text files, each file one example: ``folder/<label>/<file>`` (IMDB's aclImdb)."""
    out: Raw = {}
    for split, folders in located(source, root).items():
        cols: Columns = {"text": [], "label": []}
        for folder in folders:
            if not folder.is_dir():
                raise TaskFileError(None, "source", f"{folder} is a file; `textfolder` reads a folder of class "
                                    "folders", "give the folder that holds one folder per class")
            files = sorted(f for f in folder.glob("*/*") if f.is_file() and not f.name.startswith((".", "_")))
            if not files:
                raise TaskFileError(None, "source", f"{folder} holds no class folders of files",
                                    "put each class's texts in a folder named for the class: FOLDER/<label>/<file>")
            for f in files:
                try:
                    cols["text"].append(f.read_text(encoding=source.encoding).strip())
                except UnicodeDecodeError as e:
                    if f.suffix.lower() in IMAGE_SUFFIXES:
                        raise _bad_file(f, "source", "an image, not text", "for a folder of images, set "
                                        "`modality: image` and `format: imagefolder`") from None
                    raise _bad_file(f, "source", e, f"set `encoding` to the file's (e.g. latin-1), or save it as "
                                    f"{source.encoding}") from None
                cols["label"].append(f.parent.name)
        out[split] = cols
    return out


def _read_lines(path: Path, field: str, encoding: str = "utf-8") -> list[str]:
    try:
        return path.read_text(encoding=encoding).splitlines()
    except UnicodeDecodeError as e:
        raise _bad_file(path, field, e, f"set `encoding` to the file's (e.g. latin-1), or save it as {encoding}"
                        ) from None


def source_fingerprint(source: Source, root: Path) -> list[object]:
    """What identifies the source's bytes (path, size, mtime) for cache keys."""
    if source.format in ("hub", "sklearn"):
        return [source.dataset, source.config, source.revision]
    stamps: list[object] = []
    for split, paths in located(source, root).items():
        stamps.append(split)  # the same files may be split otherwise (a folder's train/ and test/ folders)
        for p in paths:
            files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
            stamps += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return stamps


__all__ = ["READERS", "read_source", "reader", "resolve", "source_fingerprint"]


from mtl.data import image_formats  # noqa: E402, F401  (registers the image readers)

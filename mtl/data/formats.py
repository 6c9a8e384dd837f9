"""Readers: one per source format, each returning ``{split: {column: values}}``.

A name maps to a reader (``READERS``), as timm maps a name to a model builder. Formats that the
`datasets` library has a builder for go through it; the others are the formats of the shipped data.
A source given as one ``path`` yields a single split called ``all``; ``files`` yields the named splits.
"""

from __future__ import annotations

import csv
import gzip
import json
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtl import settings
from mtl.data.fetch import locate
from mtl.data.schema import Source
from mtl.errors import TaskFileError

Columns = dict[str, Any]
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
    if settings.safe_mode() and not full.resolve().is_relative_to(root.resolve()):
        raise TaskFileError(None, field, f"'{path}' is outside the data directory {root} (safe mode)",
                            "move the data under MTL_DATA_DIR, or run without --safe if you trust this file")
    if not full.exists() and not p.is_absolute():
        fetched = locate(path, source.download if source else None)
        if fetched is not None:
            return fetched
    if not full.exists():
        raise TaskFileError(None, field, f"'{path}' not found (looked at {full})",
                            "correct the path, or point MTL_DATA_DIR at the folder that holds it")
    return full


def located(source: Source, root: Path) -> dict[str, list[Path]]:
    """``{split: [paths]}`` for a path- or files-based source."""
    if source.files is not None:
        items = source.files.items()
        return {split: [resolve(p, root, f"source.files.{split}", source) for p in _as_list(v)]
                for split, v in items}
    assert source.path is not None
    return {"all": [resolve(p, root, "source.path", source) for p in _as_list(source.path)]}


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
            ds = datasets.load_dataset(source.dataset, source.config, revision=source.revision)
        else:
            files = located(source, root)
            data_files = {_hf_split(split): [str(p) for p in paths] for split, paths in files.items()}
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
                part = part.cast_column(name, datasets.Image(decode=False))
                encoded = part[name]
                cols[name] = [_image_bytes(v) for v in encoded]
                cols["_names"] = [Path(v["path"]).name if v.get("path") else f"#{i}" for i, v in enumerate(encoded)]
                continue
            values = part[name]
            if isinstance(feature, datasets.ClassLabel):
                values = [feature.int2str(v) for v in values]
            cols[name] = values
        out[split] = cols
    return out


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


def _read_lines(path: Path, field: str, encoding: str = "utf-8") -> list[str]:
    try:
        return path.read_text(encoding=encoding).splitlines()
    except UnicodeDecodeError as e:
        raise _bad_file(path, field, e, f"set `encoding` to the file's (e.g. latin-1), or save it as {encoding}"
                        ) from None


@reader("image_zip")
def read_image_zip(source: Source, root: Path) -> Raw:
    """Zip archives of image folders; the label is the folder path below ``strip_components``."""
    out: Raw = {}
    for split, paths in located(source, root).items():
        images: list[bytes] = []
        labels: list[str] = []
        names: list[str] = []
        for path in paths:
            try:
                with zipfile.ZipFile(path) as zf:
                    for info in sorted(zf.infolist(), key=lambda i: i.filename):
                        parts = info.filename.split("/")
                        if info.is_dir() or not info.filename.lower().endswith(IMAGE_SUFFIXES):
                            continue
                        label_parts = parts[source.strip_components:-1]
                        if not label_parts:
                            raise TaskFileError(None, "source.strip_components",
                                                f"{path.name}: '{info.filename}' has no folder left to "
                                                "name its label", "lower `strip_components`")
                        if info.file_size > MAX_IMAGE_BYTES:  # zip bombs declare their size
                            raise TaskFileError(None, "source", f"{path.name}: '{info.filename}' unpacks to "
                                                f"{info.file_size:,} bytes (limit {MAX_IMAGE_BYTES:,})",
                                                "remove the oversized file from the archive")
                        images.append(zf.read(info))
                        labels.append("/".join(label_parts))
                        names.append(f"{path.name}:{info.filename}")
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
                raise _bad_file(path, "source", e, "re-download the archive; it is truncated or not a zip") \
                    from None
        out[split] = {"image": images, "label": labels, "_names": names}
    return out


@reader("npz")
def read_npz(source: Source, root: Path) -> Raw:
    """Arrays in a ``.npz``: images (N,H,W) or (classes, per_class, H, W) and optional labels."""
    out: Raw = {}
    for split, paths in located(source, root).items():
        cols: Columns = {"image": [], "label": []}
        for path in paths:
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise _bad_file(path, "source", e, "the file must be a numpy .npz archive") from None
            if source.images_key not in arrays:
                raise TaskFileError(None, "source.images_key", f"{path.name} has no array "
                                    f"'{source.images_key}' (it has {sorted(arrays)})", "set `images_key`")
            images = arrays[source.images_key]
            labels = arrays.get(source.labels_key) if source.labels_key else None
            if labels is None and images.ndim == 4 and source.examples_per_class is None:
                labels = np.repeat(np.arange(images.shape[0]), images.shape[1]).reshape(images.shape[:2])
            if images.ndim == 4 and (labels is None or labels.ndim == 2):
                images = images.reshape(-1, *images.shape[2:])
            _append_arrays(cols, images, labels, source, path)
        out[split] = cols
    return out


def _append_arrays(cols: Columns, images: np.ndarray, labels: np.ndarray | None, source: Source,
                   path: Path) -> None:
    if labels is None:
        if source.examples_per_class is None:
            raise TaskFileError(None, "source.labels_key", f"{path.name} has no labels array",
                                "set `labels_key`, or `examples_per_class` for blocks of consecutive images")
        labels = np.arange(len(images)) // source.examples_per_class
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise TaskFileError(None, "source.labels_key", f"{path.name}: {len(images)} images but "
                            f"{len(labels)} labels", "the arrays must have one label per image")
    cols["image"].extend(list(images))
    cols["label"].extend(labels.tolist())


@reader("mat")
def read_mat(source: Source, root: Path) -> Raw:
    """MATLAB v5 files (Olivetti): an image array, one flattened image per column when 2-D."""
    from scipy.io import loadmat

    out: Raw = {}
    for split, paths in located(source, root).items():
        cols: Columns = {"image": [], "label": []}
        for path in paths:
            try:
                m = loadmat(path)
            except Exception as e:  # scipy raises several types for a bad file
                raise _bad_file(path, "source", e, "the file must be a MATLAB v5 .mat file") from None
            if source.images_key not in m:
                keys = [k for k in m if not k.startswith("__")]
                raise TaskFileError(None, "source.images_key", f"{path.name} has no array "
                                    f"'{source.images_key}' (it has {keys})", "set `images_key`")
            images = np.asarray(m[source.images_key])
            if images.ndim == 2:
                if not source.image_shape:
                    raise TaskFileError(None, "source.image_shape", f"{path.name}: images are flattened",
                                        "set `image_shape: [H, W]`")
                images = images.T.reshape(-1, *source.image_shape)
            if source.transpose:
                images = images.swapaxes(1, 2)
            labels = np.asarray(m[source.labels_key]) if source.labels_key in m else None
            _append_arrays(cols, images, labels, source, path)
        out[split] = cols
    return out


@reader("idx")
def read_idx(source: Source, root: Path) -> Raw:
    """IDX files (MNIST), gzipped or not: per split, ``[images_file, labels_file]``."""
    out: Raw = {}
    for split, paths in located(source, root).items():
        if len(paths) != 2:
            raise TaskFileError(None, "source", f"split '{split}' lists {len(paths)} files",
                                "give two IDX files per split: [images, labels]")
        images, labels = (_idx_array(p) for p in paths)
        if len(images) != len(labels):
            raise TaskFileError(None, "source", f"{paths[0].name}: {len(images)} images but {len(labels)} labels",
                                "pair each images file with its labels file")
        out[split] = {"image": list(images), "label": [str(x) for x in labels.tolist()]}
    return out


def _idx_array(path: Path) -> np.ndarray:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, ValueError, struct.error, gzip.BadGzipFile) as e:
        raise _bad_file(path, "source", e, "the file must be an (optionally gzipped) IDX file") from None


@reader("sklearn")
def read_sklearn(source: Source, root: Path) -> Raw:
    """Image sets that ship inside scikit-learn (``dataset: digits``); no download."""
    import sklearn.datasets

    if source.dataset != "digits":
        raise TaskFileError(None, "source.dataset", f"scikit-learn data set '{source.dataset}' is not "
                            "bundled (needs a download)", "use `dataset: digits`")
    d = sklearn.datasets.load_digits()
    images = (d.images / 16.0 * 255.0).round().astype(np.uint8)
    return {"all": {"image": list(images), "label": [str(x) for x in d.target.tolist()]}}


def source_fingerprint(source: Source, root: Path) -> list[object]:
    """What identifies the source's bytes (path, size, mtime) for cache keys."""
    if source.format in ("hub", "sklearn"):
        return [source.dataset, source.config, source.revision]
    stamps: list[object] = []
    for paths in located(source, root).values():
        for p in paths:
            files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
            stamps += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return stamps


__all__ = ["READERS", "read_source", "reader", "resolve", "source_fingerprint"]

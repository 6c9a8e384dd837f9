"""Readers of image sources that `datasets` has no builder for: zip and tar archives of image
folders, numpy and MATLAB arrays, MNIST's IDX files, CIFAR's binary batches, scikit-learn's digits.
Registered by name with :func:`~mtl.data.formats.reader`, like every format."""

from __future__ import annotations

import gzip
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from mtl.data.formats import IMAGE_SUFFIXES, MAX_IMAGE_BYTES, Columns, Raw, _bad_file, located, reader
from mtl.data.schema import Source
from mtl.errors import TaskFileError


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


@reader("image_tar")
def read_image_tar(source: Source, root: Path) -> Raw:
    """Tar archives (.tar, .tgz, .tar.gz) of image folders, as ``image_zip`` (CUB-200-2011)."""
    out: Raw = {}
    for split, paths in located(source, root).items():
        cols: Columns = {"image": [], "label": [], "_names": []}
        for path in paths:
            try:
                with tarfile.open(path) as tf:
                    for m in sorted(tf.getmembers(), key=lambda m: m.name):
                        if not m.isfile() or not m.name.lower().endswith(IMAGE_SUFFIXES):
                            continue
                        label_parts = m.name.split("/")[source.strip_components:-1]
                        if not label_parts:
                            raise TaskFileError(None, "source.strip_components", f"{path.name}: '{m.name}' has no "
                                                "folder left to name its label", "lower `strip_components`")
                        if m.size > MAX_IMAGE_BYTES:
                            raise TaskFileError(None, "source", f"{path.name}: '{m.name}' is {m.size:,} bytes "
                                                f"(limit {MAX_IMAGE_BYTES:,})", "remove the oversized file")
                        f = tf.extractfile(m)
                        assert f is not None
                        cols["image"].append(f.read())
                        cols["label"].append("/".join(label_parts))
                        cols["_names"].append(f"{path.name}:{m.name}")
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise _bad_file(path, "source", e, "re-download the archive; it is truncated or not a tar") from None
        out[split] = cols
    return out


@reader("cifar_binary")
def read_cifar_binary(source: Source, root: Path) -> Raw:
    """CIFAR-100's binary version (``cifar-100-binary.tar.gz``): every ``*.bin`` batch of the archive
    (records of coarse label, fine label, 3x32x32 pixels) as one pool, labelled with the fine names."""
    out: Raw = {}
    for split, paths in located(source, root).items():
        cols: Columns = {"image": [], "label": []}
        for path in paths:
            try:
                with tarfile.open(path) as tf:
                    files = {m.name.rsplit("/", 1)[-1]: m for m in tf.getmembers() if m.isfile()}
                    if "fine_label_names.txt" not in files:
                        raise TaskFileError(None, "source", f"{path.name} has no fine_label_names.txt",
                                            "use CIFAR-100's binary archive (cifar-100-binary.tar.gz)")
                    names = _member(tf, files["fine_label_names.txt"]).decode().split()
                    for name in sorted(n for n in files if n.endswith(".bin")):
                        raw = np.frombuffer(_member(tf, files[name]), np.uint8)
                        if raw.size % 3074:
                            raise _bad_file(path, "source", f"{name} is not whole 3,074-byte records",
                                            "re-download the archive")
                        rec = raw.reshape(-1, 3074)
                        if rec[:, 1].max(initial=0) >= len(names):
                            raise _bad_file(path, "source", f"{name} has fine labels beyond the {len(names)} names",
                                            "re-download the archive")
                        cols["image"] += list(rec[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                        cols["label"] += [names[i] for i in rec[:, 1].tolist()]
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise _bad_file(path, "source", e, "re-download the archive; it is truncated or not a tar") from None
        out[split] = cols
    return out


def _member(tf: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(m)
    assert f is not None
    return f.read()


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

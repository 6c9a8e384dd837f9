"""Turn decoded or encoded images into one uint8 array of a fixed size."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mtl import settings
from mtl.data.schema import ImageOptions
from mtl.errors import MtlError, TaskFileError


def image_path(value: str | Path, folders: Sequence[Path], where: str) -> Path:
    """An image file named in a table (a CSV's ``filepath`` column): absolute, or relative to the first of
    ``folders`` (the table's own folder, then the data directory) that holds it."""
    if str(value).startswith(("http://", "https://")):
        raise TaskFileError(None, "input_field", f"image {where} is a link; images are read from files",
                            "download the images and list their paths (or register the folder: format: imagefolder)")
    p = Path(value).expanduser()
    tried = [p] if p.is_absolute() else [f / p for f in folders]
    for full in tried:
        try:
            found = full.is_file()
        except OSError as e:  # a name longer than the file system allows
            raise TaskFileError(None, "input_field", f"image {where} cannot be a path ({e.strerror})",
                                "correct the path") from None
        if found:
            if settings.safe_mode() and not full.resolve().is_relative_to(settings.data_dir().resolve()):
                raise TaskFileError(None, "input_field", f"image {where} is outside the data directory (safe mode)",
                                    "move the images under MTL_DATA_DIR, or run without --safe")
            return full
    looked = " and ".join(map(str, tried))
    raise TaskFileError(None, "input_field", f"image file {where} not found (looked for {looked})",
                        "give paths relative to the table's own folder, or absolute ones")


def file_stamp(path: Path) -> str:
    """What identifies a file's bytes for a cache (path, size, mtime); empty if it is gone."""
    try:
        st = path.stat()
    except OSError:
        return ""
    return f"{path}\t{st.st_size}\t{st.st_mtime_ns}"


def _to_pil(value: object, where: str, draft: tuple[int, int] | None = None) -> Image.Image:
    """``value`` (encoded bytes, a file's path, an array or an image) as a PIL image. ``draft``: a JPEG is
    decoded at the smallest scale (1/2, 1/4, 1/8) still at least this size: 7x faster for a phone's photo
    read at 84 x 84 from twice that, the pixels within one grey level of a full decode."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, Path):
        try:
            value = value.read_bytes()
        except OSError as e:
            raise TaskFileError(None, "input_field", f"cannot read image {where} ({e.strerror})",
                                "correct the file's permissions") from None
    if isinstance(value, dict) and "bytes" in value:  # `datasets` Image feature, undecoded
        value = value["bytes"]
    if isinstance(value, bytes | bytearray):
        try:
            img = Image.open(io.BytesIO(value))
            if draft is not None and img.format == "JPEG":
                img.draft(None, draft)  # type: ignore[arg-type]
            img.load()
            if img.mode in ("I", "F") or img.mode.startswith("I;16"):  # 16-bit or float: convert("L") would clip
                return _to_pil(np.asarray(img), where)  # scaled to 8 bits by its maximum, as arrays are
            return ImageOps.exif_transpose(img)  # a phone's photo is stored turned, with a tag saying how
        except UnidentifiedImageError:
            raise TaskFileError(None, "source", f"corrupt or unreadable image {where} (not an image format "
                                "Pillow can read)", "re-export the image or remove it from the data") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise TaskFileError(None, "source", f"corrupt or unreadable image {where} ({e})",
                                "re-export the image or remove it from the data") from None
    arr = np.asarray(value)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise TaskFileError(None, "source", f"image {where} has NaN or infinite pixels",
                                "clean the array before registering it")
        hi = float(arr.max()) if arr.size else 1.0
        arr = np.clip(arr / (hi if hi > 0 else 1.0) * 255.0, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise TaskFileError(None, "source", f"image {where} has shape {arr.shape}, not HxW or HxWxC",
                            "store one image per example")
    return Image.fromarray(arr)


CONTENT_MARGIN = 0.1  # of the content's longer side, on each side: room for the training distortions
CONTENT_CONTRAST = 32  # grey levels from the border's colour that count as content (not scanner noise)


def _border_colour(a: np.ndarray) -> int:
    return int(np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])))


def fit_to_content(img: Image.Image, hw: tuple[int, int]) -> Image.Image:
    """``img`` cropped to the box around its content, widened to the aspect of ``hw`` plus a margin and
    filled with the border's colour where it leaves the page; the image as it was if it is blank.

    The background is the median of the border pixels, so dark-on-light and light-on-dark alike work."""
    a = np.asarray(img.convert("L"), dtype=np.int16)
    ink = np.abs(a - _border_colour(a)) > CONTENT_CONTRAST
    if not ink.any():
        return img
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = hw
    scale = max((bottom - top) / h, (right - left) / w) * (1 + 2 * CONTENT_MARGIN)
    box_h, box_w = max(1, round(h * scale)), max(1, round(w * scale))
    y0, x0 = round((top + bottom - box_h) / 2), round((left + right - box_w) / 2)
    fill = tuple(_border_colour(c) for c in np.atleast_3d(np.asarray(img)).transpose(2, 0, 1))
    canvas = Image.new(img.mode, (box_w, box_h), fill if len(fill) > 1 else fill[0])
    canvas.paste(img.crop((max(x0, 0), max(y0, 0), min(x0 + box_w, img.width), min(y0 + box_h, img.height))),
                 (max(-x0, 0), max(-y0, 0)))
    return canvas


def prepare_images(values: Iterable[object], options: ImageOptions, names: Sequence[str] | None = None,
                   folders: Sequence[Path] = (), read: list[str] | None = None) -> np.ndarray:
    """Decode, convert and resize every image; (N, H, W) if grayscale, else (N, H, W, 3). A value that is a
    string is an image file's path, relative to the first of ``folders`` that holds it; ``read`` collects
    those files' :func:`file_stamp`, so a cache of the result can tell when one changes."""
    h, w = options.hw
    out: list[np.ndarray] = []
    for i, value in enumerate(values):
        where = repr(names[i]) if names is not None else repr(value) if isinstance(value, str) else f"#{i}"
        if isinstance(value, str):  # a path in a table of image files and labels
            value = image_path(value, folders, where)
            if read is not None:
                read.append(file_stamp(value))
        img = _to_pil(value, where, None if options.fit_content else (2 * w, 2 * h))  # a crop needs every pixel
        img = img.convert("L" if options.grayscale else "RGB")
        if options.fit_content:
            img = fit_to_content(img, (h, w))
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.LANCZOS)
        arr = np.asarray(img, dtype=np.uint8)
        out.append(255 - arr if options.invert else arr)
    shape = (0, h, w) if options.grayscale else (0, h, w, 3)
    return np.stack(out) if out else np.zeros(shape, np.uint8)


def given_images(values: Sequence[object], options: ImageOptions) -> np.ndarray:
    """Images a user hands over (file paths, PIL images, arrays), read as a task's are; a problem is about that
    input, so it is an :class:`MtlError`, not a task file's."""
    read: list[object] = []
    for v in values:
        if isinstance(v, str | Path):
            try:
                found = Path(v).is_file()
            except OSError:  # a name longer than the file system allows
                found = False
            if not found and str(v).startswith(("http://", "https://")):
                raise MtlError(f"image {v} is a link; images are read from files",
                               f"download it first (e.g. `curl -O {v}`) and give the file's path")
            if not found:
                raise MtlError(f"image {v} not found", "check the path")
            v = Path(v)
        read.append(v)
    try:
        return prepare_images(read, options, [str(v) if isinstance(v, Path) else f"#{i}" for i, v in enumerate(read)])
    except TaskFileError as e:
        raise MtlError(e.problem, e.fix) from None

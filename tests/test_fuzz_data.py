"""Property-based: corrupt or hostile *data* behind a valid task file (truncated images and archives,
decompression and zip bombs, mislabeled rows, empty classes, NaN features, wrong encodings) always
ends in one clear line from the CLI and exit code 2: never a traceback, a hang or a memory blow-up.

Each example writes a small data set and a task file to a fresh folder, breaks the data in one
drawn way, then asks the CLI for an episode (which loads, decodes, filters and splits the task).
"""

from __future__ import annotations

import functools
import io
import json
import resource
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from mtl.cli import main
from mtl.data import task as data_module

CLASSES = ["cat", "dog", "owl"]
PER_CLASS = 6
KINDS = ["csv_blank_label", "csv_not_utf8", "csv_empty_file", "csv_ragged", "jsonl_bad_label", "jsonl_bad_text",
         "jsonl_truncated", "unnamed_label", "empty_class", "too_few_examples", "folder_corrupt_image",
         "zip_corrupt_image", "zip_truncated", "zip_flipped_bytes", "zip_bomb", "png_bomb", "npz_nan_pixels",
         "npz_nan_labels", "npz_length_mismatch", "npz_pickled", "idx_truncated"]


def png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def broken_png(draw_int, draw_bytes) -> bytes:
    """A PNG cut short before its pixel data ends, or random bytes."""
    good = png(7)
    if draw_int(0, 1):
        return draw_bytes()
    return good[: draw_int(0, good.index(b"IEND") - 13)]  # 4 (length) + 4 (type) + 4 (CRC) + 1: inside IDAT


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: opening it naively would allocate gigabytes."""
    raw = bytearray(png(0))
    ihdr = raw[12:29]  # b"IHDR" + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(raw)


def image_zip(extra: dict[str, bytes] | None = None) -> bytes:
    """Omniglot-like archive top/<class>/<i>.png, plus ``extra`` members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for c in CLASSES:
            for i in range(PER_CLASS):
                zf.writestr(f"top/{c}/{i}.png", png(40 * CLASSES.index(c) + i))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


@functools.cache
def zip_bomb() -> bytes:
    """One member unpacks to 80 MB of zeros (about 80 KB on disk)."""
    return image_zip({"top/cat/huge.png": b"\0" * (80 * 2**20)})


def rows() -> list[tuple[str, str]]:
    return [(f"a {c} sentence number {i}", c) for c in CLASSES for i in range(PER_CLASS)]


def task_doc(modality: str, source: dict[str, object], **extra: object) -> dict[str, object]:
    doc: dict[str, object] = {"name": "fuzz", "modality": modality, "description": "fuzzed data", "role": "held_out",
                              "source": source, "input_field": "text" if modality == "text" else "image",
                              "label_field": "label", "splits": {"by": "examples", "sizes": {"train": 0.5,
                                                                                            "test": 0.5}}}
    if modality == "image":
        doc["image"] = {"size": 8}
    doc.update(extra)
    return doc


def build(kind: str, folder: Path, draw_int, draw_bytes) -> dict[str, object]:
    """Write a broken data set for ``kind`` under ``folder``; return its task file's content."""
    data = rows()
    if kind.startswith("csv") or kind in ("unnamed_label", "empty_class", "too_few_examples"):
        if kind == "csv_blank_label":
            i = draw_int(0, len(data) - 1)
            data[i] = (data[i][0], " " * draw_int(0, 2))
        if kind == "too_few_examples":
            data = [r for r in data if r[1] != "owl"] + [("the only owl", "owl")]
        lines = [f"{t},{y}" for t, y in data]
        if kind == "csv_ragged":
            i = draw_int(0, len(lines) - 1)
            lines[i] += ",extra" * draw_int(1, 3)
        text = ("text,label\n" + "\n".join(lines) + "\n").encode()
        if kind == "csv_not_utf8":
            at = draw_int(12, len(text) - 1)
            text = text[:at] + b"\xff\xfe\xc3" + text[at:]
        if kind == "csv_empty_file":
            text = b""
        (folder / "d.csv").write_bytes(text)
        extra: dict[str, object] = {}
        if kind == "unnamed_label":
            extra["labels"] = {"names": {c: c.upper() for c in CLASSES[: draw_int(1, 2)]}}
        if kind == "empty_class":
            extra["labels"] = {"include": [*CLASSES, "emu"]}
        return task_doc("text", {"format": "csv", "path": "d.csv"}, **extra)
    if kind.startswith("jsonl"):
        objs: list[dict[str, object]] = [{"text": t, "label": y} for t, y in data]
        i = draw_int(0, len(objs) - 1)
        bad = [None, "", "   ", ["cat", "dog"], {"nested": 1}][draw_int(0, 4)]
        if kind == "jsonl_bad_label":
            objs[i]["label"] = bad
        if kind == "jsonl_bad_text":
            objs[i]["text"] = bad
        text = "".join(json.dumps(o) + "\n" for o in objs)
        if kind == "jsonl_truncated":  # cut inside the last object
            last = text.rstrip("\n").rfind("\n") + 1
            text = text[: draw_int(last + 1, len(text) - 3)]
        (folder / "d.jsonl").write_text(text)
        return task_doc("text", {"format": "jsonl", "path": "d.jsonl"})
    if kind == "folder_corrupt_image" or kind == "png_bomb":
        for c in CLASSES:
            (folder / "imgs" / c).mkdir(parents=True)
            for i in range(PER_CLASS):
                (folder / "imgs" / c / f"{i}.png").write_bytes(png(40 * CLASSES.index(c) + i))
        victim = folder / "imgs" / CLASSES[draw_int(0, 2)] / f"{draw_int(0, PER_CLASS - 1)}.png"
        if kind == "png_bomb":
            victim.write_bytes(png_claiming(draw_int(20_000, 60_000), draw_int(20_000, 60_000)))
        else:
            victim.write_bytes(broken_png(draw_int, draw_bytes))
        return task_doc("image", {"format": "imagefolder", "path": "imgs"})
    if kind.startswith("zip"):
        blob = image_zip()
        if kind == "zip_corrupt_image":
            blob = image_zip({"top/dog/broken.png": broken_png(draw_int, draw_bytes)})
        if kind == "zip_truncated":
            blob = blob[: draw_int(0, len(blob) - 1)]
        if kind == "zip_flipped_bytes":  # inside the first member's compressed data: the CRC check fails
            at = draw_int(40, 80)
            blob = blob[:at] + bytes(b ^ 0xFF for b in blob[at: at + draw_int(1, 8)]) + blob[at + 8:]
        if kind == "zip_bomb":
            blob = zip_bomb()
        (folder / "imgs.zip").write_bytes(blob)
        return task_doc("image", {"format": "image_zip", "path": "imgs.zip", "strip_components": 1})
    if kind.startswith("npz"):
        rng = np.random.default_rng(draw_int(0, 1000))
        images = rng.random((len(CLASSES) * PER_CLASS, 8, 8)).astype(np.float32)
        labels: np.ndarray = np.repeat(np.arange(len(CLASSES)), PER_CLASS).astype(np.float64)
        if kind == "npz_nan_pixels":
            images.reshape(-1)[draw_int(0, images.size - 1)] = [np.nan, np.inf, -np.inf][draw_int(0, 2)]
        if kind == "npz_nan_labels":
            labels[draw_int(0, len(labels) - 1)] = [np.nan, np.inf][draw_int(0, 1)]
        if kind == "npz_length_mismatch":
            labels = labels[: draw_int(0, len(labels) - 1)]
        if kind == "npz_pickled":
            obj = np.empty(len(labels), dtype=object)
            obj[:] = [{"label": int(x)} for x in labels]
            np.savez(folder / "d.npz", images=images, labels=obj, allow_pickle=True)
        else:
            np.savez(folder / "d.npz", images=images, labels=labels)
        return task_doc("image", {"format": "npz", "path": "d.npz", "images_key": "images", "labels_key": "labels"})
    if kind == "idx_truncated":
        n = len(CLASSES) * PER_CLASS
        imgs = struct.pack(">HBBIII", 0, 8, 3, n, 8, 8) + bytes(n * 64)
        labs = struct.pack(">HBBI", 0, 8, 1, n) + bytes(np.repeat(np.arange(3), PER_CLASS).astype(np.uint8))
        which = draw_int(0, 1)
        if which == 0:
            imgs = imgs[: draw_int(0, len(imgs) - 1)]
        else:
            labs = labs[: draw_int(0, len(labs) - 1)]
        (folder / "i.idx").write_bytes(imgs)
        (folder / "l.idx").write_bytes(labs)
        return task_doc("image", {"format": "idx", "files": {"all": ["i.idx", "l.idx"]}})
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def rss_start() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@settings(max_examples=50, deadline=10_000, phases=[Phase.explicit, Phase.reuse, Phase.generate],  # the
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # kind says enough
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_corrupt_data_ends_in_a_clear_error(kind, data, tmp_path_factory, capsys, monkeypatch, rss_start):
    folder = tmp_path_factory.mktemp(kind, numbered=True)
    monkeypatch.setenv("MTL_DATA_DIR", str(folder))
    monkeypatch.setenv("MTL_CACHE_DIR", str(folder / "cache"))
    monkeypatch.setattr(data_module, "_MEMO", {})

    def draw_int(lo: int, hi: int) -> int:
        return data.draw(st.integers(lo, hi))

    def draw_bytes() -> bytes:
        return data.draw(st.binary(max_size=64))

    doc = build(kind, folder, draw_int, draw_bytes)
    (folder / "tasks").mkdir()
    (folder / "tasks" / "fuzz.yaml").write_text(yaml.safe_dump(doc))
    code = main(["episode", "--task", "fuzz", "--tasks-dir", str(folder / "tasks"), "--ways", "3", "--shots", "1",
                 "--queries", "1"])
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.strip()]
    assert code == 2, (kind, code, captured.out[-300:], captured.err)
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert "fuzz" in lines[0] and "Fix:" in lines[0], lines[0]
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_start) / 1024
    assert grown_mb < 1024, f"peak memory grew by {grown_mb:.0f} MB"

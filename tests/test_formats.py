"""Every source format reads a small local file into the right examples; bad files fail clearly."""

from __future__ import annotations

import gzip
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mtl.data import task as data_module
from mtl.data.schema import ImageOptions, TaskSpec
from mtl.data.task import load_task
from mtl.errors import TaskFileError

TEXTS = [f"sentence {i}" for i in range(12)]
LABELS = ["a", "b", "c"] * 4


def spec(modality: str = "text", input_field: str | list[str] = "text", label_field: str = "label",
         **source) -> TaskSpec:
    doc = {"name": "t", "modality": modality, "description": "d", "role": "held_out", "source": source,
           "input_field": input_field, "label_field": label_field,
           "splits": {"by": "examples", "sizes": {"train": 0.5, "test": 0.5}}}
    if modality == "image":
        doc["image"] = {"size": 8}
    return TaskSpec.model_validate(doc)


def check_text(task) -> None:
    assert task.classes == ["a", "b", "c"]
    assert sorted(np.concatenate([task.train.inputs, task.test.inputs]).tolist()) == sorted(TEXTS)
    for s in task.splits.values():  # each text keeps its own label
        for x, y in zip(s.inputs, s.labels, strict=True):
            assert LABELS[TEXTS.index(x)] == task.classes[y]


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data_module, "_MEMO", {})


def test_csv_and_relative_path_through_data_dir(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    rows = "".join(f"{t},{y}\n" for t, y in zip(TEXTS, LABELS, strict=True))
    (tmp_path / "d" / "x.csv").write_text("text,label\n" + rows)
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path))
    check_text(load_task(spec(format="csv", path="d/x.csv")))


@pytest.mark.parametrize(("suffix", "sep"), [(".csv", ";"), (".csv", "\t"), (".tsv", ",")])
def test_a_tables_separator_is_found_from_its_header(tmp_path, suffix, sep):
    """Excel in much of Europe saves `;`; many `.csv` files hold tabs: read as they are, by a task, by `adapt
    --examples` and by `predict`, where one column named 'text;label' was read before."""
    from mtl.data.columns import column_sep
    from mtl.run.examples import read_examples, table_rows

    path = tmp_path / f"x{suffix}"
    more = ", or so" if sep != "," else " or so"  # the other separators in a text, where they are not its own
    path.write_text(f"text{sep}label\n" + "".join(f"{t}{more}{sep}{y}\n" for t, y in zip(TEXTS, LABELS, strict=True)))
    assert column_sep(path, "\t" if suffix == ".tsv" else ",") == sep
    task = load_task(spec(format=suffix[1:], path=str(path)))
    assert task.classes == ["a", "b", "c"] and len(task.train) + len(task.test) == 12
    assert table_rows(path)[0] == {"text": f"sentence 0{more}", "label": "a"}
    assert read_examples(path, "text", ImageOptions())[2] == ["a", "b", "c"]


def test_a_labels_name_beside_its_number_is_the_label(tmp_path):
    """Hugging Face exports (and SetFit's data sets) give `label` 3 and `label_text` "sports": the names are
    the classes, for `adapt --examples` and for `predict`'s score as for `tasks init` (tests/test_task_files.py)."""
    from mtl.run.examples import read_examples
    from mtl.run.given_inputs import table_inputs

    path = tmp_path / "hf.csv"
    path.write_text("text,label,label_text\n" + "".join(f"{t},{'abc'.index(y)},{y}\n" for t, y in zip(TEXTS, LABELS,
                                                                                                   strict=True)))
    assert read_examples(path, "text", ImageOptions())[2] == ["a", "b", "c"]
    assert table_inputs(path, "text") == (TEXTS, LABELS)


def test_headerless_tsv_keeps_quotes_and_null_text(tmp_path):
    texts = [*TEXTS[:-2], '"quoted', "null"]
    (tmp_path / "x.tsv").write_text("".join(f"{y}\t{t}\n" for t, y in zip(texts, LABELS, strict=True)))
    task = load_task(spec(format="tsv", path=str(tmp_path / "x.tsv"), header=False, columns=["label", "text"]))
    all_text = set(np.concatenate([task.train.inputs, task.test.inputs]).tolist())
    assert '"quoted' in all_text and "null" in all_text


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_json_jsonl_parquet(tmp_path, fmt):
    rows = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS, strict=True)]
    path = tmp_path / f"x.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    check_text(load_task(spec(format=fmt, path=str(path))))


def test_hub_loader_on_a_local_dataset_folder(tmp_path):
    """`format: hub` calls datasets.load_dataset(id); a local folder id exercises that same code."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    for split, part in (("train", slice(0, 6)), ("test", slice(6, 12))):
        (folder / f"{split}.csv").write_text("text,label\n" + "".join(
            f"{t},{y}\n" for t, y in zip(TEXTS[part], LABELS[part], strict=True)))
    doc = spec(format="hub", dataset=str(folder)).model_dump()
    doc["splits"] = {"by": "source"}
    task = load_task(TaskSpec.model_validate(doc))
    assert len(task.train) == 6 and len(task.test) == 6
    check_text(task)


def test_text_from_several_columns(tmp_path):
    """`input_field: [title, body]` joins a row's columns by a newline (a space to a tokenizer), leaving out a
    missing one; a row with none is named; images take one column. ``adapt --examples`` reads the same columns."""
    from mtl.run.examples import read_examples

    rows = [{"title": f"title {i}", "body": None if i == 3 else f"body {i}", "label": y} for i, y in enumerate(LABELS)]
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(spec(format="jsonl", path=str(path), input_field=["title", "body"]))
    texts = set(np.concatenate([task.train.inputs, task.test.inputs]).tolist())
    assert "title 0\nbody 0" in texts and "title 3" in texts and len(texts) == len(rows)
    examples = tmp_path / "mine.csv"
    examples.write_text("body,title,label,note\nb1,t1,a,x\nb2,,b,y\n")
    xs, ys, classes = read_examples(examples, "text", ImageOptions(), (["title", "body"], "label"))
    assert xs.tolist() == ["t1\nb1", "b2"] and ys.tolist() == [0, 1] and classes == ["a", "b"]
    rows[5] = {"title": " ", "body": None, "label": "c"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_module._MEMO.clear()
    with pytest.raises(TaskFileError, match="input_field: example 5 of split 'all' is empty"):
        load_task(spec(format="jsonl", path=str(path), input_field=["title", "body"]))
    with pytest.raises(ValueError, match="only text tasks join"):
        spec("image", ["image", "label"], "label", format="npz", path="x.npz")


def test_json_rows_split_lines_line_pairs(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps({"all": [[t, y] for t, y in zip(TEXTS, LABELS, strict=True)]}))
    check_text(load_task(spec(format="json_rows", path=str(tmp_path / "rows.json"), columns=["text", "label"])))
    (tmp_path / "lines.txt").write_text("".join(f"{y} {t}\n" for t, y in zip(TEXTS, LABELS, strict=True)))
    check_text(load_task(spec(format="split_lines", path=str(tmp_path / "lines.txt"), sep=" ", header=False,
                              columns=["label", "text"])))
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "seq.in").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "pairs" / "label").write_text("\n".join(LABELS) + "\n")
    check_text(load_task(spec(format="line_pairs", path=str(tmp_path / "pairs"))))


def test_textfolder_reads_one_example_per_file(tmp_path):
    """A folder per class of text files (IMDB's layout), fields left out as for an image folder; a file in
    another encoding is named with the fix; an image format's options do not fit a text folder."""
    for i, (t, y) in enumerate(zip(TEXTS, LABELS, strict=True)):
        (tmp_path / "docs" / y).mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / y / f"{i}.txt").write_text(f"  {t}\n")
    (tmp_path / "docs" / "README").write_text("not an example")  # beside the class folders: skipped
    (tmp_path / "docs" / "a" / ".hidden").write_text("not an example")
    doc = {"name": "t", "modality": "text", "role": "held_out", "source": {"format": "textfolder",
           "path": str(tmp_path / "docs")}, "splits": {"by": "examples", "sizes": {"train": 0.5, "test": 0.5}}}
    check_text(load_task(TaskSpec.model_validate(doc)))
    from mtl.run.examples import read_examples  # `adapt --examples FOLDER` and `predict FOLDER` read it too
    from mtl.run.given_inputs import text_files

    xs, ys, classes = read_examples(tmp_path / "docs", "text", ImageOptions())
    assert classes == ["a", "b", "c"] and sorted(xs.tolist()) == sorted(TEXTS)
    assert all(LABELS[TEXTS.index(x)] == classes[y] for x, y in zip(xs, ys, strict=True))
    assert sorted(text_files(tmp_path / "docs" / "a")) == sorted(t for t, y in zip(TEXTS, LABELS, strict=True)
                                                                  if y == "a")
    (tmp_path / "docs" / "b" / "x.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TaskFileError, match=r"source: cannot read x.txt .*Fix: set `encoding`"):
        load_task(TaskSpec.model_validate(doc))
    with pytest.raises(ValueError, match="holds texts; set `modality: text`"):
        TaskSpec.model_validate({**doc, "modality": "image"})
    (tmp_path / "docs" / "b" / "x.txt").unlink()
    (tmp_path / "docs" / "b" / "x.png").write_bytes(png(10))
    with pytest.raises(TaskFileError, match=r"x.png \(an image, not text\).*`format: imagefolder`"):
        load_task(TaskSpec.model_validate(doc))


def png(value: int, size: int = 10) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def check_images(task, n: int = 12) -> None:
    assert task.classes == ["a", "b", "c"] or task.classes == ["0", "1", "2"]
    x = np.concatenate([task.train.inputs, task.test.inputs])
    assert x.shape == (n, 8, 8) and x.dtype == np.uint8
    for s in task.splits.values():  # pixel value encodes the class
        for img, y in zip(s.inputs, s.labels, strict=True):
            assert abs(int(img.mean()) - 60 * (y + 1)) <= 1


def test_imagefolder_and_image_zip(tmp_path):
    root = tmp_path / "folder"
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for i, y in enumerate(LABELS):
            (root / y).mkdir(parents=True, exist_ok=True)
            (root / y / f"{i}.png").write_bytes(png(60 * (ord(y) - 96)))
            zf.writestr(f"top/{y}/{i}.png", png(60 * (ord(y) - 96)))
    check_images(load_task(spec("image", "image", "label", format="imagefolder", path=str(root))))
    check_images(load_task(spec("image", "image", "label", format="image_zip", path=str(tmp_path / "imgs.zip"))))


def test_a_table_of_image_paths_reads_the_images(tmp_path, monkeypatch):
    """A CSV (or JSON lines) of image file paths and labels, the form many image data sets come in: paths
    relative to the table's own folder, or to the data directory, or absolute; a missing one is named."""
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data" / "shared").mkdir(parents=True)
    (tmp_path / "t" / "pics").mkdir(parents=True)
    rows = []
    for i, y in enumerate(LABELS):
        where = ["t/pics", "data/shared", "t/pics"][i % 3]
        (tmp_path / where / f"{i}.png").write_bytes(png(60 * (ord(y) - 96)))
        rows.append([f"pics/{i}.png", f"shared/{i}.png", str(tmp_path / where / f"{i}.png")][i % 3] + f",{y}")
    (tmp_path / "t" / "x.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    check_images(load_task(spec("image", "file", "label", format="csv", path=str(tmp_path / "t" / "x.csv"))))
    (tmp_path / "t" / "x.jsonl").write_text("".join(json.dumps({"file": r.split(",")[0], "label": r.split(",")[1]})
                                                    + "\n" for r in rows))
    check_images(load_task(spec("image", "file", "label", format="jsonl", path=str(tmp_path / "t" / "x.jsonl"))))
    from mtl.run.examples import read_examples  # `adapt --examples` takes the same table

    xs, ys, classes = read_examples(tmp_path / "t" / "x.csv", "image", ImageOptions(size=8))
    assert classes == ["a", "b", "c"] and [int(x.mean()) // 60 - 1 for x in xs] == ys.tolist()
    (tmp_path / "t" / "pics" / "3.png").write_bytes(png(60 * 3))  # an edited image is read again
    task = load_task(spec("image", "file", "label", format="csv", path=str(tmp_path / "t" / "x.csv")))
    a_means = {int(x.mean()) for s in task.splits.values() for x, y in zip(s.inputs, s.labels, strict=True) if y == 0}
    assert 180 in a_means
    (tmp_path / "t" / "links.csv").write_text("file,label\nhttps://example.org/a.png,a\n")
    with pytest.raises(TaskFileError, match=r"image 'https://example.org/a.png' is a link; images are read from files"):
        load_task(spec("image", "file", "label", format="csv", path=str(tmp_path / "t" / "links.csv")))
    (tmp_path / "t" / "pics" / "3.png").unlink()
    with pytest.raises(TaskFileError, match=r"input_field: image file 'pics/3.png' not found \(looked for "
                       + str(tmp_path / "t" / "pics" / "3.png")):
        load_task(spec("image", "file", "label", format="csv", path=str(tmp_path / "t" / "x.csv")))


def test_sixteen_bit_and_turned_images_are_read_as_seen(tmp_path):
    """A 16-bit PNG (scans, microscopy) is scaled to 8 bits by its maximum, as an array is: Pillow's own
    conversion clips it, and every pixel above 255 would be white. A photo is turned as its EXIF tag says."""
    from mtl.data.images import prepare_images

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I;16")
    x = prepare_images([(tmp_path / "ramp.png").read_bytes()], ImageOptions(size=8))[0]
    assert x[0].max() < 30 and x[-1].min() > 225 and (np.diff(x[:, 0].astype(int)) > 0).all()
    # a photo stored turned, with the EXIF tag that says so (orientation 6: turn 90 degrees clockwise to view)
    exif = Image.Exif()
    exif[0x0112] = 6
    top_dark = np.full((16, 16), 255, np.uint8)
    top_dark[:8] = 0
    buf = io.BytesIO()
    Image.fromarray(top_dark).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    y = prepare_images([buf.getvalue()], ImageOptions(size=16))[0]
    assert y[:, 8:].mean() < 40 and y[:, :8].mean() > 215  # as viewed: the dark half on the right
    # a large JPEG is decoded at a reduced scale (twice the size asked, at least): the same pixels, near enough
    noise = np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8)
    photo = np.asarray(Image.fromarray(noise).resize((800, 600)))
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=95)
    full = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    fast = prepare_images([buf.getvalue()], ImageOptions(size=28))[0]
    assert np.abs(fast.astype(int) - full).max() <= 4 and np.abs(fast.astype(int) - full).mean() < 1


def test_a_folder_of_split_folders_gives_those_splits(tmp_path):
    """`data/train/<label>/...` and `data/test/<label>/...`, as most image sets ship: one `path` gives both
    splits; a folder of class folders alone is one pool, and a task file that does not split it is told how."""
    for split, n in (("train", 6), ("Test", 3)):
        for i in range(n):
            for y in "ab":
                (tmp_path / "data" / split / y).mkdir(parents=True, exist_ok=True)
                (tmp_path / "data" / split / y / f"{i}.png").write_bytes(png(60 * (ord(y) - 96)))
                (tmp_path / "docs" / split / y).mkdir(parents=True, exist_ok=True)
                (tmp_path / "docs" / split / y / f"{i}.txt").write_text(f"{y} text {i}")
    doc = {"name": "t", "modality": "image", "role": "held_out", "image": {"size": 8},
           "source": {"format": "imagefolder", "path": str(tmp_path / "data")}}
    task = load_task(TaskSpec.model_validate(doc))
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 12, "test": 6} and task.classes == ["a", "b"]
    text = load_task(TaskSpec.model_validate({**doc, "modality": "text", "image": None,
                                              "source": {"format": "textfolder", "path": str(tmp_path / "docs")}}))
    assert {k: len(v) for k, v in text.splits.items()} == {"train": 12, "test": 6}
    with pytest.raises(TaskFileError, match=r"split 'train' does not exist \(the data has all\).*`splits: \{by: "):
        load_task(TaskSpec.model_validate({**doc, "source": {"format": "imagefolder", "path": str(tmp_path / "data"
                                                                                                   / "train")}}))


def test_formats_that_name_their_columns_need_no_fields(tmp_path):
    """An image folder's columns are `image` and `label` whatever the task file says; a first task file
    need not know that. A csv's columns are the user's, so there the fields stay required."""
    root = tmp_path / "folder"
    for i, y in enumerate(LABELS):
        (root / y).mkdir(parents=True, exist_ok=True)
        (root / y / f"{i}.png").write_bytes(png(60 * (ord(y) - 96)))
    doc = {"name": "t", "modality": "image", "description": "d", "role": "held_out", "image": {"size": 8},
           "source": {"format": "imagefolder", "path": str(root)},
           "splits": {"by": "examples", "sizes": {"train": 0.5, "test": 0.5}}}
    check_images(load_task(TaskSpec.model_validate(doc)))
    with pytest.raises(ValueError, match="input_field"):
        TaskSpec.model_validate({**doc, "modality": "text", "image": None, "source": {"format": "csv", "path": "x"}})


def test_npz_idx_mat(tmp_path):
    images = np.stack([np.full((10, 10), 60 * (i % 3 + 1), np.uint8) for i in range(12)])
    labels = np.arange(12) % 3
    np.savez(tmp_path / "x.npz", images=images, labels=labels)
    check_images(load_task(spec("image", "image", "label", format="npz", path=str(tmp_path / "x.npz"))))
    with gzip.open(tmp_path / "img.gz", "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 12, 10, 10) + images.tobytes())
    (tmp_path / "lab.idx").write_bytes(struct.pack(">HBBI", 0, 8, 1, 12) + labels.astype(np.uint8).tobytes())
    check_images(load_task(spec("image", "image", "label", format="idx",
                                path=[str(tmp_path / "img.gz"), str(tmp_path / "lab.idx")])))
    from scipy.io import savemat

    order = np.argsort(labels, kind="stable")  # mat: consecutive blocks of 4 per class, one image per column
    savemat(tmp_path / "x.mat", {"faces": images[order].reshape(12, -1).T})
    check_images(load_task(spec("image", "image", "label", format="mat", path=str(tmp_path / "x.mat"),
                                images_key="faces", labels_key=None, image_shape=[10, 10], examples_per_class=4)))


def test_sklearn_digits():
    task = load_task(spec("image", "image", "label", format="sklearn", dataset="digits"))
    assert len(task.classes) == 10 and len(task.train) + len(task.test) == 1797


def test_corrupt_image_in_zip_is_named(tmp_path):
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        zf.writestr("top/a/0.png", png(10))
        zf.writestr("top/a/1.png", png(10)[:30])  # truncated
    with pytest.raises(TaskFileError, match=r"corrupt or unreadable image 'imgs.zip:top/a/1.png'"):
        load_task(spec("image", "image", "label", format="image_zip", path=str(tmp_path / "imgs.zip")))


def test_truncated_archive_and_wrong_format(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(TaskFileError, match="truncated or not a zip"):
        load_task(spec("image", "image", "label", format="image_zip", path=str(tmp_path / "bad.zip")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TaskFileError, match=r"cannot read bad\.json"):
        load_task(spec(format="json_rows", path=str(tmp_path / "bad.json")))


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    (tmp_path / "x.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(TEXTS, LABELS, strict=True)))
    s = spec(format="csv", path=str(tmp_path / "x.csv"))
    first = load_task(s)
    monkeypatch.setattr(data_module, "_MEMO", {})

    def fail(*a, **k):
        raise AssertionError("source read again despite the cache")

    monkeypatch.setattr(data_module, "read_source", fail)
    second = load_task(s)
    assert np.array_equal(first.train.inputs, second.train.inputs)


def test_shipped_examples_in_docs_parse():
    """The schema example in docs/TASKS.md is a valid task file."""
    text = (Path(__file__).parents[1] / "docs" / "TASKS.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    TaskSpec.model_validate(yaml.safe_load(block))


def test_rotations_and_flips_are_new_classes(tmp_path):
    """Each of the square's symmetries asked for is a class of its own, in the rotated splits only."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 8, 8), dtype=np.uint8)  # asymmetric: every view differs
    labels = np.arange(12) % 3
    np.savez(tmp_path / "x.npz", images=images, labels=labels)
    doc = spec("image", "image", "label", format="npz", path=str(tmp_path / "x.npz")).model_dump()
    doc["image"] = {"size": 8, "rotations": [0, 90], "flips": True, "rotate_splits": ["train"]}
    task = load_task(TaskSpec.model_validate(doc))
    assert task.classes[:3] == ["0", "1", "2"] and len(task.classes) == 12
    assert {"0@rot90", "0@flip", "0@fliprot90"} <= set(task.classes)
    assert set(task.test.labels.tolist()) <= {0, 1, 2}
    n = len(task.train) // 4
    originals = task.train.inputs[:n]
    for j, view in enumerate([lambda x: np.rot90(x, 1, (1, 2)), lambda x: x[:, :, ::-1],
                              lambda x: np.rot90(x[:, :, ::-1], 1, (1, 2))], start=1):
        np.testing.assert_array_equal(task.train.inputs[j * n:(j + 1) * n], view(originals))
        names = [task.classes[y] for y in task.train.labels[j * n:(j + 1) * n]]
        base = [task.classes[y] for y in task.train.labels[:n]]
        suffix = ["@rot90", "@flip", "@fliprot90"][j - 1]
        assert names == [b + suffix for b in base]


def test_fit_content_centres_and_fills_the_frame(tmp_path):
    """A small drawing off in a corner, dark on light or light on dark, grey or colour, comes out centred and
    filling the frame but for the margin; a blank page comes out as it went in."""
    from mtl.data.images import CONTENT_MARGIN, prepare_images

    def page(ink: int, paper: int, channels: int = 0) -> np.ndarray:
        a = np.full((60, 80), paper, np.uint8)
        a[5:15, 50:70] = ink  # a 10 x 20 stroke in the top right corner
        return np.repeat(a[..., None], channels, 2) if channels else a

    for ink, paper, grey in [(0, 255, True), (255, 0, True), (30, 220, False)]:
        out = prepare_images([page(ink, paper, 0 if grey else 3)], ImageOptions(size=24, grayscale=grey,
                                                                               fit_content=True))[0]
        mask = np.abs(out.astype(int) - paper) > 64
        mask = mask if grey else mask.any(-1)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        width = round(24 / (1 + 2 * CONTENT_MARGIN))  # the longer side fills all but the margins
        assert abs(len(cols) - width) <= 1 and abs(len(rows) - width // 2) <= 1
        assert abs((cols[0] + cols[-1]) / 2 - 11.5) <= 0.5 and abs((rows[0] + rows[-1]) / 2 - 11.5) <= 0.5
    blank = np.full((60, 80), 200, np.uint8)
    np.testing.assert_array_equal(prepare_images([blank], ImageOptions(size=(60, 80), fit_content=True))[0], blank)


def test_a_model_s_image_options_replace_the_task_file_s_only_where_they_differ():
    """A checkpoint's `model.image_overrides` re-decode a task only when they change how it is read: the
    decoded arrays (and their cache) are shared otherwise."""
    from mtl.data.task import spec_read_as

    images = spec("image", "image", "label", format="npz", path="x.npz")  # size 8
    for same in (None, {}, {"size": 8}, {"size": (8, 8)}, {"fit_content": False}):
        assert spec_read_as(images, same) is images
    assert spec_read_as(images, {"size": 16}).image_options.hw == (16, 16)
    both = spec_read_as(images, {"size": 8, "fit_content": True}).image_options
    assert both.fit_content and both.hw == (8, 8)
    texts = spec(format="csv", path="x.csv")
    assert spec_read_as(texts, {"size": 16, "fit_content": True}) is texts

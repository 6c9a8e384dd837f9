"""Malformed task files are rejected with one line per problem: file, field, what, fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtl.data.registry import Registry
from mtl.errors import TaskFileErrors
from tests.conftest import write

GOOD = """\
name: tiny
modality: text
description: a tiny task
role: held_out
source:
  format: csv
  path: {path}
input_field: text
label_field: label
splits:
  by: examples
  sizes: {{train: 0.5, test: 0.5}}
"""


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    rows = ["text,label"] + [f"sentence number {i},{'ab'[i % 2]}" for i in range(20)]
    return write(tmp_path / "data" / "tiny.csv", "\n".join(rows) + "\n")


def good(csv_file: Path) -> str:
    return GOOD.format(path=csv_file)


CASES = {
    # name: (file text builder, field expected in the message, words expected)
    "bad indentation": (lambda g: g.replace("  format: csv", "format: csv\n   path: x"), "line", "invalid YAML"),
    "missing field": (lambda g: g.replace("label_field: label\n", ""), "label_field", "Field required"),
    "wrong type": (lambda g: g.replace("  sizes: {train: 0.5, test: 0.5}", "  sizes: [1, 2]"), "splits.sizes",
                   "give a mapping (key: value lines), e.g. sizes: {train: 0.8, test: 0.2}"),
    "a label list as one string": (lambda g: g + "labels:\n  exclude: spam\n", "labels.exclude",
                                   "e.g. exclude: [spam]"),
    "unknown modality": (lambda g: g.replace("modality: text", "modality: audio"), "modality", "'text' or 'image'"),
    "unknown field": (lambda g: g + "colour: blue\n", "colour", "unknown field"),
    "misspelt field": (lambda g: g.replace("  format: csv", "  format: csv\n  heder: true"), "source.heder",
                       "did you mean `header`?"),
    "missing file": (lambda g: g.replace("tiny.csv", "nope.csv"), "source.path", "not found"),
    "a path no file system takes": (lambda g: g.replace("tiny.csv", "n" * 300 + ".csv"), "source.path",
                                    "cannot be a path (File name too long)"),
    "label field absent": (lambda g: g.replace("label_field: label", "label_field: intent"), "label_field",
                           "column 'intent' is not in the data"),
    "empty task": (lambda g: g + "labels:\n  pattern: 'zzz*'\n", "labels.pattern", "matches no label"),
    "excluded everything": (lambda g: g + "labels:\n  exclude: [a, b]\n", "labels", "is empty"),
    "unknown label": (lambda g: g + "labels:\n  include: [a, c]\n", "labels.include", "'c' not in the data"),
    "duplicate key": (lambda g: g + "role: meta_train\n", "line", "duplicate key 'role'"),
    "alias": (lambda g: g.replace("description: a tiny task", "description: &d a tiny task") + "x: *d\n", "line",
              "aliases"),
    "empty file": (lambda g: "", None, "empty or not a mapping"),
    "yaml boolean label": (lambda g: g + "labels:\n  include: [yes, no]\n", "labels.include", "quote it"),
    "bad split fractions": (lambda g: g.replace("test: 0.5", "test: 0.9"), "splits", "more than 1"),
    "bad name": (lambda g: g.replace("name: tiny", "name: Tiny Task!"), "name", "pattern"),
    "input column listed twice": (lambda g: g.replace("input_field: text", "input_field: [text, text]"),
                                  "input_field", "lists a column twice"),
    "input field as a mapping": (lambda g: g.replace("input_field: text", "input_field: {a: text}"), "input_field",
                                 "a list of text columns such as [title, body]"),
    "one of the input columns absent": (lambda g: g.replace("input_field: text", "input_field: [text, body]"),
                                        "input_field", "column 'body' is not in the data"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_task_file_gets_one_line_with_file_field_and_fix(case, tmp_path, csv_file, run_cli):
    build, field, words = CASES[case]
    path = write(tmp_path / "tasks" / "t.yaml", build(good(csv_file)))
    code, out, err = run_cli("tasks", "validate", path)
    assert code == 1, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, out
    first = lines[0]
    assert first.startswith(str(path)) and "Fix:" in first, first
    if field:
        assert f": {field}" in first, first
    assert words in first, first
    assert "Traceback" not in err + out


def test_a_recipe_beside_the_tasks_is_skipped_and_a_first_row_of_data_is_spotted(tmp_path, csv_file, run_cli):
    """A project folder holds its task files and the recipe that trains on them: the registry skips the
    recipe, and `validate` given the recipe itself says what it is. A csv without a header row, read as if it
    had one, has an example for column names: the fix says so."""
    write(tmp_path / "tasks" / "t.yaml", good(csv_file))
    write(tmp_path / "tasks" / "recipe.yaml", "method: protonet\ntasks: [tiny]\nways: 2\n")
    code, out, err = run_cli("tasks", "validate", tmp_path / "tasks")
    assert code == 0 and "tiny" in out and not err, err
    assert Registry([tmp_path / "tasks"]).names() == ["tiny"]
    code, out, err = run_cli("tasks", "validate", tmp_path / "tasks" / "recipe.yaml")
    assert code == 1 and "recipe.yaml: a recipe (it lists `tasks:`), not a task file. Fix: train with it" in err
    rows = [f"sentence number {i} is here,{'ab'[i % 2]}" for i in range(20)]
    headless = write(tmp_path / "data" / "headless.csv", "\n".join(rows) + "\n")
    path = write(tmp_path / "tasks" / "t.yaml", good(headless))
    code, out, err = run_cli("tasks", "validate", path)
    assert code == 1 and "column 'text' is not in the data" in err and "add `header: false` and `columns: [...]` " \
        "(2 names)" in err, err


def test_tasks_init_writes_a_task_file_that_loads_from_the_data_alone(tmp_path, run_cli):
    """`tasks init DATA --name N`: the format, the input and label columns and the splits guessed from the data (a
    csv with its test file beside it, a headerless tsv, a table of image paths, a folder of train/ and test/ class
    folders), written only once the task loads; an existing file is kept unless --force."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    rows = [(f"example sentence number {i}", "ab"[i % 2]) for i in range(20)]
    write(data / "intents_train.csv", "id,utterance,intent\n" + "".join(f"{i},{t},{y}\n" for i, (t, y) in
                                                                          enumerate(rows)))
    write(data / "intents_test.csv", "id,utterance,intent\n" + "".join(f"{i},{t},{y}\n" for i, (t, y) in
                                                                         enumerate(rows[:6])))
    write(data / "moods.tsv", "".join(f"{y}\t{t} and then some more words\n" for t, y in rows))
    write(data / "excel.csv", "Text;Category\n" + "".join(f"{t}, then more;{y}\n" for t, y in rows))
    for i in range(8):
        for split in ("train", "test"):
            (data / "pics" / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(data / "pics" / split / f"c{i % 2}" / f"{i}.png")
    write(data / "pics.csv", "file,kind\n" + "".join(f"pics/{s}/c{i % 2}/{i}.png,k{i % 2}\n" for i in range(8)
                                                     for s in ("train", "test")))
    out = tmp_path / "mine"
    expect = {"intents_train.csv": ("utterance", "intent", "train 20, test 6"),
              "moods.tsv": ("text", "label", "train 16, test 4"),
              "excel.csv": ("Text", "Category", "train 16, test 4"),
              "pics.csv": ("file", "kind", "image, 2 classes"), "pics": ("image", "label", "train 8, test 8")}
    for i, (given, (inp, label, says)) in enumerate(expect.items()):
        code, said, err = run_cli("tasks", "init", data / given, "--name", f"t{i}", "--out", out)
        assert code == 0 and says in said and f"(input `{inp}`, label `{label}`)" in said, (given, said, err)
    code, said, err = run_cli("tasks", "validate", out)
    assert code == 0 and said.count("ok") == 5, err
    assert "sep: ;" in (out / "t2.yaml").read_text()
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = []  # a hub image data set saved as parquet: each image a {bytes, path} record
    for i in range(20):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(buf, format="PNG")
        blobs.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
    pq.write_table(pa.table({"image": blobs, "label": [i % 2 for i in range(20)]}), data / "hub.parquet")
    code, said, err = run_cli("tasks", "init", data / "hub.parquet", "--name", "t9", "--out", out)
    assert code == 0 and "image, 2 classes" in said, (said, err)
    for i in range(10):  # colour photos: read in colour, at their own size up to 84
        (data / "photos" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 50, 3), (200, 20 * i, 30), np.uint8)).save(data / "photos" / f"c{i % 2}" /
                                                                                f"{i}.jpg")
    code, said, err = run_cli("tasks", "init", data / "photos", "--name", "t11", "--out", out)
    assert code == 0 and yaml.safe_load((out / "t11.yaml").read_text())["image"] == {"grayscale": False,
                                                                                    "size": 40}, err
    assert "image" not in yaml.safe_load((out / "t3.yaml").read_text())  # grey ones: the default reading
    write(data / "hf.csv", "text,label,label_text\n" + "".join(f"{t},{'ab'.index(y)},{y}\n" for t, y in rows))
    code, said, err = run_cli("tasks", "init", data / "hf.csv", "--name", "t12", "--out", out)
    assert code == 0 and "(input `text`, label `label_text`)" in said, (said, err)
    write(data / "few.csv", "text,label\nbook a flight,travel\nwhat time is it,time\nfly me to rome,travel\n")
    code, _, err = run_cli("tasks", "init", data / "few.csv", "--name", "t10", "--out", out)
    assert code == 2 and "few.csv: too few examples of each class to hold a fifth out" in err, err
    assert "--examples" in err and not (out / "t10.yaml").exists()
    code, _, err = run_cli("tasks", "init", data / "moods.tsv", "--name", "t1", "--out", out)
    assert code == 2 and "already exists. Fix: choose another --name, or pass --force" in err
    for args, says in ((["--name", "My Task"], "--name 'My Task' is not a task name"),
                       (["--name", "t9", "--role", "train"], "--role 'train' is not a task role")):
        code, _, err = run_cli("tasks", "init", data / "moods.tsv", *args, "--out", out)
        assert code == 2 and says in err and "Traceback" not in err, err


def test_good_file_validates(tmp_path, csv_file, run_cli):
    path = write(tmp_path / "tasks" / "t.yaml", good(csv_file))
    code, out, err = run_cli("tasks", "validate", path)
    assert code == 0, err
    assert "ok" in out and "2 classes" in out


def test_a_misspelt_source_field_is_the_only_problem_reported(tmp_path, csv_file, run_cli):
    """`source` is one source or a list of them; a typo inside one is not also a complaint that it is no list."""
    path = write(tmp_path / "tasks" / "t.yaml", good(csv_file).replace("  format: csv", "  format: csv\n  heder: 1"))
    code, _, err = run_cli("tasks", "validate", path)
    assert code == 1 and err.strip().count("\n") == 0 and "source.heder" in err, err


def test_several_problems_one_line_each(tmp_path, run_cli):
    path = write(tmp_path / "t.yaml", "name: x\nmodality: audio\n")
    code, _, err = run_cli("tasks", "validate", path, "--no-data")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) >= 4  # modality, role, source, fields missing (a description is optional)
    assert all(line.startswith(str(path)) for line in lines)


def test_a_missing_field_is_answered_with_the_line_to_add(tmp_path, run_cli):
    """A first task file can be written from the errors alone: each missing field comes with an example line."""
    path = write(tmp_path / "t.yaml", "name: x\nsource: {path: a.csv}\n")
    code, _, err = run_cli("tasks", "validate", path, "--no-data")
    assert code == 1
    for expected in ("modality: Field required. Fix: add `modality: text` (or image)",
                     "role: Field required. Fix: add `role: held_out`",
                     "source.format: Field required. Fix: add `format: csv`",
                     "input_field: Field required. Fix: add `input_field: text`",
                     "label_field: Field required. Fix: add `label_field: label`"):
        assert expected in err, err
    assert "description" not in err  # optional


def test_a_broken_task_file_keeps_only_itself_out(tmp_path, csv_file, run_cli):
    """A folder of tasks with one file being edited: the others still list and adapt, the broken one is named in
    a warning, asking for a task not found shows the broken file's error, and `validate` fails on it."""
    write(tmp_path / "reg" / "good.yaml", good(csv_file))
    write(tmp_path / "reg" / "broken.yaml", "name: broken\nmodality: text\nsource: {format: csv\n")
    with pytest.warns(UserWarning, match=r"task file left out: .*broken\.yaml: line 4, column 1: invalid YAML"):
        reg = Registry([tmp_path / "reg"])
    assert reg.names() == ["tiny"] and reg.load("tiny").classes == ["a", "b"]
    import pickle  # as a training worker gets it: the problems travel too

    assert [str(e) for e in pickle.loads(pickle.dumps(reg)).unread] == [str(e) for e in reg.unread]
    with pytest.raises(TaskFileErrors, match=r"broken\.yaml"):
        reg.spec("broken")
    code, out, err = run_cli("tasks", "list", "--tasks-dir", tmp_path / "reg", "--json")
    assert code == 0 and '"tiny"' in out, err  # (the warning goes to pytest's record here, to stderr otherwise)
    code, _, err = run_cli("tasks", "validate", tmp_path / "reg")
    assert code == 1 and "broken.yaml: line 4" in err


def test_duplicate_names_name_both_files(tmp_path, csv_file):
    a = write(tmp_path / "reg" / "a.yaml", good(csv_file))
    b = write(tmp_path / "reg" / "sub" / "b.yaml", good(csv_file))
    with pytest.raises(TaskFileErrors) as e:
        Registry([tmp_path / "reg"])
    assert str(a) in str(e.value) and str(b) in str(e.value)


def test_a_relative_path_is_also_looked_for_beside_the_task_file(tmp_path, csv_file, run_cli, monkeypatch):
    """A project folder (task files beside their data) works wherever it is moved; a path the data directory
    holds is still read there, and a path found nowhere names both places in its fix."""
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path / "mirror"))
    write(tmp_path / "project" / "tiny.yaml", GOOD.format(path="data/tiny.csv"))
    write(tmp_path / "project" / "data" / "tiny.csv", csv_file.read_text())
    (tmp_path / "project").rename(tmp_path / "moved")
    code, out, err = run_cli("tasks", "show", "tiny", "--tasks-dir", tmp_path / "moved", "--json")
    assert code == 0 and '"classes": ["a", "b"]' in out and str(tmp_path / "moved" / "data" / "tiny.csv") in out, err
    write(tmp_path / "mirror" / "data" / "tiny.csv", csv_file.read_text().replace(",b", ",c"))
    assert Registry([tmp_path / "moved"]).load("tiny").classes == ["a", "c"]  # the data directory first
    write(tmp_path / "other" / "tiny.yaml", GOOD.format(path="data/nowhere.csv"))
    code, _, err = run_cli("tasks", "show", "tiny", "--tasks-dir", tmp_path / "other")
    assert code == 2 and "correct the path (relative to MTL_DATA_DIR or to the task file's folder)" in err, err


def test_user_folder_and_env_var(tmp_path, csv_file, run_cli, monkeypatch):
    write(tmp_path / "mine" / "tiny.yaml", good(csv_file))
    code, out, _ = run_cli("tasks", "list", "--tasks-dir", tmp_path / "mine", "--json")
    assert code == 0 and "tiny" in out
    monkeypatch.setenv("MTL_TASKS_DIRS", str(tmp_path / "mine"))
    code, out, _ = run_cli("tasks", "show", "tiny", "--json")
    assert code == 0 and '"classes": ["a", "b"]' in out
    # from Python, a folder as a string, a Path, or a list of either
    for dirs in (str(tmp_path / "mine"), tmp_path / "mine", [str(tmp_path / "mine")]):
        assert Registry(dirs).names() == ["tiny"]


def test_unknown_task_suggests_close_names(run_cli):
    code, _, err = run_cli("tasks", "show", "clinc150-bankin")
    assert code == 2 and "did you mean clinc150-banking" in err and len(err.strip().splitlines()) == 1
    for option, value, says in (("--role", "heldout", "--role heldout is not a role. Fix: use meta_train, meta_val or "
                                 "held_out"), ("--modality", "audio", "--modality audio is not a modality")):
        code, _, err = run_cli("tasks", "list", option, value)  # it listed no task, as if there were none
        assert code == 2 and says in err, err


def test_cli_process_prints_no_traceback(tmp_path):
    path = write(tmp_path / "bad.yaml", "name: [unclosed\n")
    proc = subprocess.run([sys.executable, "cli.py", "tasks", "validate", str(path)], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 1 and "invalid YAML" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mtl", "tasks", "validate", str(path)], capture_output=True,
                          text=True, cwd=tmp_path)  # `python -m mtl`, as a user may run it from anywhere
    assert proc.returncode == 1 and "invalid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_safe_mode_refuses_paths_outside_the_data_dir(tmp_path, csv_file, run_cli, monkeypatch):
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MTL_SAFE", "")  # restored after the test: --safe sets it for the process
    inside = write(tmp_path / "t1.yaml", GOOD.format(path="tiny.csv"))
    escape = write(tmp_path / "t2.yaml", GOOD.format(path="../../../etc/passwd").replace("name: tiny", "name: t2"))
    code, _, err = run_cli("--safe", "tasks", "validate", inside, escape)
    assert code == 1 and "outside the data directory" in err and "t2.yaml" in err and "t1.yaml" not in err


def test_exclude_takes_labels_and_globs(tmp_path):
    rows = ["text,label"] + [f"sentence number {i},{lab}" for i, lab in
                             enumerate(["Greek/alpha", "Greek/beta", "Latin/a", "Latin/b", "Runic/x"] * 4)]
    data = write(tmp_path / "data" / "scripts.csv", "\n".join(rows) + "\n")
    write(tmp_path / "reg" / "t.yaml", GOOD.format(path=data) + "labels:\n  exclude: ['Greek/*', Runic/x]\n")
    task = Registry([tmp_path / "reg"]).load("tiny")
    assert list(task.classes) == ["Latin/a", "Latin/b"]

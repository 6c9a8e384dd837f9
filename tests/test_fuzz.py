"""Property-based: hostile or malformed task files never crash `tasks validate` (one line per problem,
exit 1, no traceback) and never hang."""

from __future__ import annotations

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtl.cli import main

BASE = {"name": "fuzz", "modality": "text", "description": "d", "role": "held_out",
        "source": {"format": "csv", "path": "tiny.csv"}, "input_field": "text", "label_field": "label",
        "splits": {"by": "examples", "sizes": {"train": 0.5, "test": 0.5}}}
FIELDS = [*BASE, "labels", "image", "train_split", "test_split", "val_split", "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                    st.sampled_from(["../../etc/passwd", "/dev/zero", "", "\x00", "é" * 50, "text", "image",
                                     "csv", "image_zip", "hub", "classes", "examples"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(string.ascii_lowercase, max_size=8),
                                                                       inner, max_size=4)), max_leaves=12)


@st.composite
def task_docs(draw) -> bytes:
    doc = dict(BASE)
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            doc.pop(key, None)
        else:
            doc[key] = draw(values)
    text = yaml.safe_dump(doc, allow_unicode=True)
    mutation = draw(st.sampled_from(["none", "bytes", "truncate", "indent", "dupkey", "alias", "bomb"]))
    if mutation == "bytes":
        return draw(st.binary(max_size=200))
    if mutation == "truncate":
        return text[: draw(st.integers(0, len(text)))].encode()
    if mutation == "indent":
        return text.replace("\n", "\n" + " " * draw(st.integers(1, 3)), 1).encode()
    if mutation == "dupkey":
        return (text + "name: again\n").encode()
    if mutation == "alias":
        return (text + "x: &a [1, 2]\ny: *a\n").encode()
    if mutation == "bomb":
        lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        ref = ", ".join(["*a{p}"] * 6)
        lines += [f"a{i}: &a{i} [{ref.format(p=i - 1)}]" for i in range(1, 12)]
        return ("\n".join(lines) + "\n").encode()
    return text.encode()


@settings(max_examples=500, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(blob=task_docs())
def test_hostile_task_files_end_in_a_clear_error(blob, tmp_path_factory, capsys, monkeypatch):
    folder = tmp_path_factory.mktemp("fuzz", numbered=True)
    (folder / "tiny.csv").write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(8)))
    monkeypatch.setenv("MTL_DATA_DIR", str(folder))
    path = folder / "task.yaml"
    path.write_bytes(blob)
    code = main(["tasks", "validate", str(path)])
    captured = capsys.readouterr()
    assert code in (0, 1), captured
    assert "Traceback" not in captured.err + captured.out
    if code == 1:
        lines = [x for x in captured.err.splitlines() if x.strip()]
        assert lines and all(x.startswith(str(path)) for x in lines), captured.err


@pytest.mark.parametrize("args, says", [(["data", "status", "--task", "x"], "No such option: --task"),
                                        (["tasks", "validate"], "Missing argument"),
                                        (["train", "--iterations", "many"], "Invalid value for '--iterations'")])
def test_a_mistyped_command_is_a_usage_error_not_an_internal_one(run_cli, args, says):
    code, _, err = run_cli(*args)
    assert code == 2 and says in err and "internal error" not in err and "Traceback" not in err

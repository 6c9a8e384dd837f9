"""Every shipped recipe parses, names registry tasks, and CLI overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtl.errors import MtlError
from mtl.run.recipe import load_recipe

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_recipe_is_valid(path, registry):
    recipe = load_recipe(path)
    for name in recipe.tasks + recipe.val_tasks:
        registry.entry(name)


def test_overrides_and_errors(tmp_path):
    r = load_recipe(CONFIGS[0], {"inner.steps": 5, "method": "anil", "seed": None})
    assert r.inner.steps == 5 and r.method == "anil"
    with pytest.raises(MtlError, match=r"inner\.bogus"):
        load_recipe(CONFIGS[0], {"inner.bogus": 1})
    with pytest.raises(MtlError, match="method"):
        load_recipe(CONFIGS[0], {"method": "magic"})

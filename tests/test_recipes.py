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


def test_the_recipes_command_lists_every_shipped_recipe_with_what_it_is_for(run_cli):
    code, out, _ = run_cli("recipes")
    assert code == 0 and all(p.stem in out for p in CONFIGS)
    lake = out[out.index("omniglot_lake_50min"):].splitlines()
    assert "protonet" in lake[0] and "10,313 it." in lake[0] and "omniglot-lake" in lake[0]
    assert lake[1].strip().startswith("Lake et al.'s one-shot challenge at its best so far")
    assert "100,000 it. or 8 min" in out[out.index("omniglot_8min "):].splitlines()[0]


def test_overrides_and_errors(tmp_path):
    assert load_recipe(str(CONFIGS[0])) == load_recipe(CONFIGS[0])  # a path given as text reads the same
    r = load_recipe(CONFIGS[0], {"inner.steps": 5, "method": "anil", "seed": None})
    assert r.inner.steps == 5 and r.method == "anil"
    with pytest.raises(MtlError, match=r"inner\.bogus: unknown setting\. Fix: see configs/"):
        load_recipe(CONFIGS[0], {"inner.bogus": 1})
    for typo, meant in (("inner.stepz", "inner.steps"), ("itterations", "iterations"), ("whiten.shrinkk",
                                                                                       "whiten.shrink")):
        with pytest.raises(MtlError, match=rf"Fix: did you mean `{meant}`\? Otherwise"):  # a misspelt setting
            load_recipe(None, {"method": "protonet", "tasks": ["digits"], "whiten": True, typo: 3})
    with pytest.raises(MtlError, match="method"):
        load_recipe(CONFIGS[0], {"method": "magic"})
    for bad in ("time_limit_minutes", "threads", "val_shots"):  # 0 was read as "no limit" / crashed / drew nothing
        with pytest.raises(MtlError, match=rf"{bad}: Input should be greater than"):
            load_recipe(CONFIGS[0], {bad: 0})
    with pytest.raises(MtlError, match=r"--set inner\.steps: inner is 5, not a section"):
        load_recipe(CONFIGS[0], {"inner": 5, "inner.steps": 3})
    on = load_recipe(None, {"method": "protonet", "tasks": ["digits"], "whiten": True, "whiten.episodes": 4})
    assert on.whiten.episodes == 4 and on.whiten.views == 8  # a section switched on, then one of its settings
    names = load_recipe(CONFIGS[0], {"tasks": "trec, sst2", "val_tasks": "sst5"})  # --set tasks=trec,sst2
    assert names.tasks == ["trec", "sst2"] and names.val_tasks == ["sst5"]


def test_max_threads_caps_a_recipes_threads(monkeypatch):
    import torch

    from mtl.device import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("MTL_MAX_THREADS", "1")
        set_threads(2)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("MTL_MAX_THREADS", "0")  # not a cap: the recipe's count stands
        set_threads(2)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("MTL_MAX_THREADS", "two")
        with pytest.raises(MtlError, match=r"MTL_MAX_THREADS='two'.*Fix"):
            set_threads(2)
    finally:
        torch.set_num_threads(before)

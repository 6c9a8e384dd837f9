"""``models``, ``algorithms``, ``formats``, ``recipes``: what the registries and ``configs/`` hold."""

from __future__ import annotations

from mtl.cli.common import app, out


@app.command("models")
def models() -> None:
    """The encoders a recipe can name (model.image_encoder, model.text_encoder)."""
    from mtl.models.encoders.registry import describe

    for e in describe():
        out.print(f"{e['name']:12s} {e['modality']:6s} {e['description']}", highlight=False, markup=False)
    out.print("(model.text_encoder may also name the folder of any transformers sentence encoder)", highlight=False)


@app.command("algorithms")
def algorithms() -> None:
    """The algorithms a recipe can name (method:), and what each trains on."""
    from mtl.algorithms import ALGORITHMS, summary

    for name, cls in ALGORITHMS.items():
        out.print(f"{name:12s} {cls.training_data:9s} {summary(cls)}", highlight=False, markup=False)


@app.command("formats")
def formats() -> None:
    """The source formats a task file can use."""
    from mtl.data.formats import READERS

    for name, fn in sorted(READERS.items()):
        doc = (fn.__doc__ or "").strip().splitlines()
        out.print(f"{name:12s} {doc[0] if doc else ''}", highlight=False, markup=False)


@app.command("recipes")
def recipes() -> None:
    """The shipped recipes `train --config NAME.yaml` can start from: method, tasks, length, what each is for."""
    from mtl.run.recipe import shipped_recipes

    for r in shipped_recipes():
        tasks = ", ".join(r["tasks"][:3]) + (f" +{len(r['tasks']) - 3}" if len(r["tasks"]) > 3 else "")
        out.print(f"{r['name']:24s} {r['method']:12s}{r['budget']:>20s}  {tasks}\n{'':27s}{r['summary']}",
                  highlight=False, markup=False)

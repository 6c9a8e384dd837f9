"""``tasks list/show/validate`` and ``episode``: the registry from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mtl import settings
from mtl.cli.common import Json, TasksDir, _print_json, _registry, app, err, out, tasks_app


@tasks_app.command("list")
def tasks_list(tasks_dir: TasksDir = None,
               role: Annotated[str | None, typer.Option(help="meta_train, meta_val or held_out")] = None,
               modality: Annotated[str | None, typer.Option(help="text or image")] = None,
               as_json: Json = False) -> None:
    """Every task: modality, classes, examples per split and role."""
    rows = _registry(tasks_dir).summaries(role=role, modality=modality)
    if as_json:
        _print_json({"tasks": rows, "data_dir": str(settings.data_dir())})
        return
    table = Table(title=f"{len(rows)} tasks (data: {settings.data_dir()})")
    longest = max((len(r["name"]) for r in rows), default=4)  # a name shown whole (folded if long), to type again
    table.add_column("name", overflow="fold", min_width=min(longest, 32))
    for col in ("modality", "classes", "examples per split", "role"):
        table.add_column(col, justify="right" if col == "classes" else "left")
    for r in rows:
        splits = ", ".join(f"{s} {n:,}" for s, n in r["splits"].items())
        if r.get("missing"):
            splits = f"[yellow]data not here yet ({len(r['missing'])} files): `data fetch {escape(r['name'])}`[/yellow]"
        table.add_row(escape(r["name"]), r["modality"], "-" if r["classes"] is None else str(r["classes"]), splits,
                      r["role"])
    out.print(table)


@tasks_app.command("show")
def tasks_show(name: str, tasks_dir: TasksDir = None,
               examples: Annotated[int, typer.Option(help="How many examples to print.")] = 3,
               as_json: Json = False) -> None:
    """A task's fields, label names, counts per split and a few examples."""
    reg = _registry(tasks_dir)
    info = reg.describe(name, examples)
    task, counts = reg.load(name), info["counts"]
    if as_json:
        _print_json(info)
        return
    out.print(f"[bold]{task.name}[/bold]  ({info['file']})")
    out.print(task.spec.description)
    spec = task.spec.model_dump(mode="json", exclude_defaults=True, exclude={"labels"})
    for key, value in spec.items():
        if key not in ("name", "description"):
            out.print(f"  {key}: {value}")
    out.print(f"  classes ({len(task.classes)}): {', '.join(task.classes[:30])}"
              f"{' ...' if len(task.classes) > 30 else ''}")
    for s, per in counts.items():
        vals = list(per.values())
        out.print(f"  {s}: {sum(vals):,} examples, {len(vals)} classes, {min(vals)}-{max(vals)} per class")
    for ex in info["examples"]:
        shown = " / ".join(str(ex["input"]).splitlines())  # the columns of `input_field: [title, body]`
        out.print(f"  [{ex['label']}] {shown[:100]}", markup=False, highlight=False)


@tasks_app.command("init")
def tasks_init(data: Annotated[Path, typer.Argument(help="A data file (csv, tsv, json, jsonl, parquet) or a folder "
                                                        "of class folders (images or text files).")],
               name: Annotated[str, typer.Option(help="The task's name (lowercase, digits, _ - .).")],
               out_dir: Annotated[Path, typer.Option("--out", help="Folder for the task file.")] = Path("tasks_mine"),
               role: Annotated[str, typer.Option(help="held_out, meta_train or meta_val.")] = "held_out",
               force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False) -> None:
    """Write a first task file from the data itself (format, input and label columns, splits), checked by loading."""
    from mtl.data.scaffold import write_task_file

    path, task = write_task_file(data, name, out_dir, role, force)
    order = {"train": 0, "val": 1, "test": 2}
    splits = sorted(task.splits.items(), key=lambda kv: order.get(kv[0], 3))
    out.print(f"wrote {path}: {task.spec.modality}, {len(task.classes)} classes, " + ", ".join(
        f"{s} {len(v):,}" for s, v in splits) + f" (input `{task.spec.input_field}`, label "
        f"`{task.spec.label_field}`); use it with --tasks-dir {out_dir}", highlight=False, markup=False)


@tasks_app.command("validate")
def tasks_validate(paths: Annotated[list[Path], typer.Argument(help="Task files or folders.")],
                   no_data: Annotated[bool, typer.Option("--no-data", help="Check the schema only.")] = False,
                   as_json: Json = False) -> None:
    """Check task files (schema, then the data they point at); one line per problem."""
    from mtl.data.registry import validate

    ok, problems = validate(paths, check_data=not no_data)
    if as_json:
        _print_json({"valid": ok, "problems": problems})
    else:
        for item in ok:
            detail = f", {item['classes']} classes" if "classes" in item else ""
            out.print(f"ok  {item['file']} ({item['name']}{detail})", highlight=False)
        for line in problems:
            err.print(line, highlight=False, markup=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)


@app.command("episode")
def episode(task: Annotated[str, typer.Option("--task", help="Registry task name.")],
            split: str = "train", ways: int = 5, shots: int = 1, queries: int = 15, seed: int = 0,
            index: Annotated[int, typer.Option(help="Which episode of the seeded stream.")] = 0,
            tasks_dir: TasksDir = None, as_json: Json = False) -> None:
    """Draw one reproducible N-way K-shot episode from a task and show it."""
    from mtl.data.episodes import describe_episode

    info = describe_episode(_registry(tasks_dir).load(task), split, ways, shots, queries, seed, index)
    if as_json:
        _print_json(info)
        return
    out.print(f"[bold]{task}[/bold] {split}: {ways}-way {shots}-shot, {queries} queries per class "
              f"(seed {seed}, episode {index})")
    table = Table("label", "support example")
    for row in info["support"]:
        table.add_row(escape(row["label"]), escape(row["input"][:90]))
    out.print(table)
    out.print(f"{info['query_size']} query examples")

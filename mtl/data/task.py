"""A task's examples, decoded, label-filtered and split: what episodes and training draw from.

Inputs are a numpy array per split: strings for text, uint8 ``(N, H, W)`` (or ``(N, H, W, 3)``) for
images. Labels are int64 indices into :attr:`Task.classes`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtl import settings
from mtl.data.cache import cached_arrays
from mtl.data.columns import is_label, joined_texts, reads_as_data
from mtl.data.formats import located, read_source, source_fingerprint
from mtl.data.images import file_stamp, prepare_images
from mtl.data.schema import ImageOptions, Source, TaskSpec
from mtl.errors import TaskFileError


@dataclass(frozen=True)
class Split:
    """The examples of one split of one task."""

    task: str
    name: str
    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def class_ids(self) -> np.ndarray:
        return np.unique(self.labels)

    def counts(self) -> dict[int, int]:
        ids, counts = np.unique(self.labels, return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist(), strict=True))


@dataclass
class Task:
    """A registry task, loaded: class names and its splits."""

    spec: TaskSpec
    classes: list[str]
    splits: dict[str, Split]
    file: Path | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def modality(self) -> str:
        return self.spec.modality

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise TaskFileError(self.file, "splits", f"task '{self.name}' has no split '{name}' "
                                f"(it has {', '.join(self.splits)})", "use one of the task's splits")
        return self.splits[name]

    @property
    def train(self) -> Split:
        return self.split(self.spec.train_split)

    @property
    def test(self) -> Split:
        return self.split(self.spec.test_split)


def load_task(spec: TaskSpec, file: Path | None = None, data_root: Path | None = None) -> Task:
    """Read, decode (cached), filter and split a task; errors name ``file`` and the field."""
    try:
        return _load(spec, file, data_root or settings.data_dir())
    except TaskFileError as e:
        if e.file is None:
            raise TaskFileError(file, e.field, e.problem, e.fix) from None
        raise


def read_as(task: Task, image: Mapping[str, object] | None) -> Task:
    """``task`` with its images decoded again with the options in ``image`` (``size``, ``fit_content``) in
    place of the task file's: a model's :attr:`~mtl.models.multitask.ModelConfig.image_overrides`, so a
    checkpoint meets every image task as it met its training tasks. The same task where nothing changes."""
    spec = spec_read_as(task.spec, image)
    return task if spec is task.spec else load_task(spec, task.file)


def reading(image: Mapping[str, object] | None) -> tuple:
    """``image``'s options as a hashable key: tasks read alike share one decoded copy."""
    return tuple(sorted((image or {}).items()))


def spec_read_as(spec: TaskSpec, image: Mapping[str, object] | None) -> TaskSpec:
    """``spec`` with its image options overridden by ``image`` (see :func:`read_as`)."""
    if not image or spec.modality != "image":
        return spec
    options = spec.image_options
    size = image.get("size", options.size)
    changed = {k: v for k, v in image.items() if k != "size" and getattr(options, k) != v}
    if ImageOptions(size=size).hw != options.hw:  # type: ignore[arg-type]
        changed["size"] = size
    return spec.model_copy(update={"image": options.model_copy(update=changed)}) if changed else spec


def _load(spec: TaskSpec, file: Path | None, root: Path) -> Task:
    raw = _decoded_source(spec, root)
    if spec.splits.by == "source" and spec.splits.map:  # unused source splits (e.g. CLINC's oos_*) drop out
        raw = {s: v for s, v in raw.items() if s in spec.splits.map.values()}
    labels_by_split = {s: np.asarray(v["label"]) for s, v in raw.items()}
    classes_raw = _select_labels(spec, np.concatenate(list(labels_by_split.values())) if raw else np.array([]))
    index = {c: i for i, c in enumerate(classes_raw)}
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s, cols in raw.items():
        lab = labels_by_split[s]
        mask = np.fromiter((x in index for x in lab.tolist()), bool, len(lab))
        ids = np.fromiter((index[x] for x in lab[mask].tolist()), np.int64, int(mask.sum()))
        kept[s] = (cols["input"][mask], ids)
    if sum(len(v[1]) for v in kept.values()) == 0:
        raise TaskFileError(None, "labels", f"task '{spec.name}' is empty: no examples left after the "
                            "label filter", "check `labels.include`, `labels.exclude` and `labels.pattern`")
    names = spec.labels.names or {}
    unnamed = [c for c in classes_raw if names and c not in names]
    if unnamed:
        raise TaskFileError(None, "labels.names", f"label(s) {', '.join(map(repr, unnamed[:5]))} of the data have "
                            f"no entry in `labels.names` ({len(unnamed)} in all)",
                            "name every label, or drop the unnamed ones with `labels.exclude`")
    classes = [names.get(c, c) for c in classes_raw]
    splits = _make_splits(spec, kept, classes)
    if spec.modality == "image":
        splits, classes = _symmetries(spec, splits, classes)
    for required in (spec.train_split, spec.test_split, spec.val_split):
        if required and required not in splits:
            field_name = next(k for k in ("train_split", "test_split", "val_split") if getattr(spec, k) == required)
            fix = f"set `{field_name}` to one of those splits"
            if list(splits) == ["all"]:  # one pool of examples (`path:`), never split
                fix = ("the data is one pool (`source.path`): split it, `splits: {by: examples, sizes: {train: "
                       "0.8, test: 0.2}}`, or give each split its own file or folder, `source.files: {train: ..., "
                       "test: ...}`")
            raise TaskFileError(None, field_name, f"split '{required}' does not exist (the data has "
                                f"{', '.join(splits) or 'none'})", fix)
    for s in splits.values():
        if len(s) == 0:
            raise TaskFileError(None, "splits", f"split '{s.name}' of task '{spec.name}' is empty",
                                "check the split sizes and the label filter")
    return Task(spec=spec, classes=classes, splits=splits, file=file)


def _decoded_source(spec: TaskSpec, root: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{source_split: {"input": array, "label": str array}}`` over all sources, each decoded once
    and kept in the on-disk cache."""
    merged: dict[str, dict[str, list[np.ndarray]]] = {}
    for i, src in enumerate(spec.sources):
        try:
            decoded = _decoded_one(spec, src, root)
        except TaskFileError as e:
            if len(spec.sources) > 1 and e.field and e.field.startswith("source"):
                e = TaskFileError(None, e.field.replace("source", f"source[{i}]", 1), e.problem, e.fix)
            raise e from None
        for split, cols in decoded.items():
            for role, arr in cols.items():
                merged.setdefault(split, {}).setdefault(role, []).append(arr)
    return {s: {r: np.concatenate(a) if len(a) > 1 else a[0] for r, a in cols.items()}
            for s, cols in merged.items()}


DECODE_VERSION = 3  # bump when decoding or its checks change: cached examples are then decoded again


def _decoded_one(spec: TaskSpec, src: Source, root: Path) -> dict[str, dict[str, np.ndarray]]:
    image = spec.image_options if spec.modality == "image" else None
    # `fit_content` is left out of the key when off, so arrays decoded before it existed stay valid
    skip = {"rotations", "flips", "rotate_splits"} | (set() if image and image.fit_content else {"fit_content"})
    parts = [DECODE_VERSION, src.model_dump(mode="json"), spec.input_field, spec.label_field,
             image.model_dump(mode="json", exclude=skip) if image else None, source_fingerprint(src, root)]

    def build() -> dict[str, np.ndarray]:
        raw = read_source(src, root)
        folders = _folders(src, root) if image is not None else {}
        arrays: dict[str, np.ndarray] = {}
        read: list[str] = []  # image files named in a table, whose changes the cache key cannot see
        for split, cols in raw.items():
            for role, col in [*(("input", c) for c in spec.input_fields), ("label", spec.label_field)]:
                if col not in cols:
                    visible = [str(c) for c in cols if not str(c).startswith("_")]
                    fld = "input_field" if role == "input" else "label_field"
                    fix = f"set `{fld}` to one of those columns"
                    headless = src.format in ("csv", "tsv") and src.header and not src.columns
                    if headless and any(map(reads_as_data, visible)):
                        fix = (f"its first row looks like an example, not column names: add `header: false` and "
                               f"`columns: [...]` ({len(visible)} names) to `source`, then {fix}")
                    raise TaskFileError(None, fld, f"column '{col}' is not in the data (split '{split}' has "
                                        f"{', '.join(visible)[:200]})", fix)
            raw_labels = cols[spec.label_field]
            bad = next((i for i, v in enumerate(raw_labels) if not is_label(v)), None)
            if bad is not None:
                raise TaskFileError(None, "label_field", f"example {bad} of split '{split}' has no usable label "
                                    f"({raw_labels[bad]!r:.40})", "give every example one label (text or "
                                    "number), or delete the unlabeled ones")
            labels = np.asarray([str(x) for x in raw_labels], dtype=np.str_)
            fields = spec.input_fields
            values = cols[fields[0]] if len(fields) == 1 else joined_texts([cols[c] for c in fields])
            if image is not None:
                inputs = prepare_images(values, image, cols.get("_names"), folders.get(split, [root]), read)
            else:
                bad = next((i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()), None)
                if bad is not None:
                    what = "empty" if isinstance(values[bad], str) else f"{type(values[bad]).__name__}, not text"
                    raise TaskFileError(None, "input_field", f"example {bad} of split '{split}' is {what}",
                                        "point `input_field` at a text column (or set `modality: image`) and "
                                        "remove empty rows")
                inputs = np.asarray(values, dtype=np.str_)
            arrays[f"{split}/input"], arrays[f"{split}/label"] = inputs, labels
        if read:
            arrays[_READ] = np.asarray(read, dtype=np.str_)
        return arrays

    arrays = _memo(parts, build)
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        if key == _READ:
            continue
        split, role = key.rsplit("/", 1)
        out.setdefault(split, {})[role] = arr
    return out


def _folders(src: Source, root: Path) -> dict[str, list[Path]]:
    """Where each split's table of image paths is read from: its own files' folders, then the data directory."""
    files = located(src, root) if src.path is not None or src.files is not None else {}
    return {split: [*dict.fromkeys(p if p.is_dir() else p.parent for p in paths), root]
            for split, paths in files.items()}


_MEMO: dict[str, dict[str, np.ndarray]] = {}
_READ = "_files"  # the cached arrays' list of image files read through a table's paths


def _unchanged(arrays: dict[str, np.ndarray]) -> bool:
    """Whether every image file a table named is as it was when the arrays were decoded."""
    return all(file_stamp(Path(s.split("\t")[0])) == s for s in arrays.get(_READ, np.empty(0, np.str_)).tolist())


def _memo(parts: object, build: object) -> dict[str, np.ndarray]:
    """In-process memo over the disk cache: many tasks (CLINC domains, alphabets) share a source."""
    from mtl.data.cache import key_of

    k = key_of(parts)
    if k not in _MEMO or not _unchanged(_MEMO[k]):
        _MEMO[k] = cached_arrays("examples", parts, build, _unchanged)  # type: ignore[arg-type]
    return _MEMO[k]


def _natural_key(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def _select_labels(spec: TaskSpec, labels: np.ndarray) -> list[str]:
    present = set(np.unique(labels).tolist())
    lab = spec.labels
    if lab.include is not None:
        missing = [x for x in lab.include if x not in present]
        if missing:
            sample = ", ".join(sorted(present, key=_natural_key)[:8])
            raise TaskFileError(None, "labels.include", f"label(s) {', '.join(map(repr, missing[:5]))} not in "
                                f"the data (labels look like: {sample})", "use labels as they appear in the data")
        chosen = list(lab.include)
    else:
        chosen = sorted(present, key=_natural_key)
    if lab.pattern is not None:
        chosen = [c for c in chosen if fnmatch.fnmatchcase(c, lab.pattern)]
        if not chosen:
            raise TaskFileError(None, "labels.pattern", f"pattern '{lab.pattern}' matches no label",
                                "use a glob that matches labels as they appear in the data")
    # `exclude` holds labels or globs such as 'Greek/*'; a label is compared as it is, too, in case it holds '['
    return [c for c in chosen if not any(c == x or fnmatch.fnmatchcase(c, x) for x in lab.exclude)]


def _make_splits(spec: TaskSpec, kept: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str]
                 ) -> dict[str, Split]:
    sp = spec.splits
    if sp.by == "class_lists":  # the exact class split of a paper: each split's classes by name
        assert sp.classes is not None
        inputs = np.concatenate([v[0] for v in kept.values()])
        labels = np.concatenate([v[1] for v in kept.values()])
        index = {c: i for i, c in enumerate(classes)}
        absent = [c for names in sp.classes.values() for c in names if c not in index]
        if absent:
            raise TaskFileError(None, "splits.classes", f"{len(absent)} listed classes are not in the data "
                                f"({', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''})",
                                "check the class names against `cli.py tasks show` and the source")
        return {name: Split(spec.name, name, inputs[m], labels[m]) for name, names in sp.classes.items()
                for m in [np.isin(labels, [index[c] for c in names])]}
    if sp.by == "source":
        mapping = sp.map or {s: s for s in kept}
        out = {}
        for name, src_name in mapping.items():
            if src_name not in kept:
                raise TaskFileError(None, f"splits.map.{name}", f"source split '{src_name}' does not exist "
                                    f"(the source has {', '.join(kept)})", "map to one of those splits")
            out[name] = Split(spec.name, name, *kept[src_name])
        return out
    inputs = np.concatenate([v[0] for v in kept.values()])
    labels = np.concatenate([v[1] for v in kept.values()])
    rng = np.random.default_rng(sp.seed)
    assert sp.sizes is not None
    names = list(sp.sizes)
    if sp.by == "classes":
        classes = np.unique(labels)
        counts = _allocate(len(classes), list(sp.sizes.values()), spec, "classes")
        order = rng.permutation(classes)
        groups = np.split(order, np.cumsum(counts)[:-1])
        out = {}
        for name, group in zip(names, groups, strict=True):
            idx = np.flatnonzero(np.isin(labels, group))
            out[name] = Split(spec.name, name, inputs[idx], labels[idx])
        return out
    per_split: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for c in np.unique(labels):  # stratified: every class is split in the same proportions
        idx = rng.permutation(np.flatnonzero(labels == c))
        counts = _allocate(len(idx), list(sp.sizes.values()), spec, "examples")
        for name, part in zip(names, np.split(idx, np.cumsum(counts)[:-1]), strict=True):
            per_split[name].append(part)
    return {n: Split(spec.name, n, inputs[np.sort(np.concatenate(p))], labels[np.sort(np.concatenate(p))])
            for n, p in per_split.items()}


def _allocate(total: int, sizes: list[float], spec: TaskSpec, what: str) -> list[int]:
    if all(s >= 1 for s in sizes):
        counts = [int(s) for s in sizes]
        if sum(counts) > total:
            raise TaskFileError(None, "splits.sizes", f"split sizes ask for {sum(counts)} {what} but task "
                                f"'{spec.name}' has {total}", "lower the sizes or use fractions")
        return counts
    counts = [int(np.floor(s * total)) for s in sizes]
    remainder = round(sum(sizes) * total) - sum(counts)
    for i in range(max(0, remainder)):
        counts[i % len(counts)] += 1
    return counts


def _symmetries(spec: TaskSpec, splits: dict[str, Split], classes: list[str]) -> tuple[dict[str, Split], list[str]]:
    """Add each rotation (and, with ``flips``, each mirror image) of a class as a new class: the Omniglot
    augmentation of the MAML paper, extended to the square's eight symmetries."""
    opts = spec.image_options
    views = [(r, f) for f in ((False, True) if opts.flips else (False,)) for r in opts.rotations]
    if views == [(0, False)]:
        return splits, classes
    classes = list(classes)
    new_ids: dict[tuple[int, int, bool], int] = {}
    out = {}
    for name, s in splits.items():
        if opts.rotate_splits is not None and name not in opts.rotate_splits:
            out[name] = s
            continue
        xs, ys = [], []
        for r, flip in views:
            if (r, flip) == (0, False):
                xs.append(s.inputs)
                ys.append(s.labels)
                continue
            x = np.flip(s.inputs, axis=2) if flip else s.inputs
            xs.append(np.rot90(x, k=r // 90, axes=(1, 2)).copy())
            ids = []
            for c in s.labels.tolist():
                if (c, r, flip) not in new_ids:
                    new_ids[(c, r, flip)] = len(classes)
                    classes.append(f"{classes[c]}@{'flip' if flip else ''}{f'rot{r}' if r else ''}")
                ids.append(new_ids[(c, r, flip)])
            ys.append(np.asarray(ids, np.int64))
        out[name] = Split(spec.name, name, np.concatenate(xs), np.concatenate(ys))
    return out, classes

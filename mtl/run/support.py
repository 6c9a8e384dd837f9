"""The labelled examples a model adapts to: drawn from a registry task's train split, read from a user's file of
examples, or given as Python values (texts or images, and their label names)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtl.data.formats import SPLIT_FOLDERS
from mtl.data.images import given_images
from mtl.data.registry import Registry
from mtl.data.schema import ImageOptions
from mtl.data.task import Task
from mtl.errors import MtlError
from mtl.run.examples import examples_modality, read_examples

if TYPE_CHECKING:
    from mtl.models import MultiTaskModel


@dataclass(frozen=True)
class Support:
    """The labelled examples to adapt to: inputs, label ids into ``classes``."""

    inputs: np.ndarray
    labels: np.ndarray
    classes: list[str]
    modality: str
    task: str = "user"
    image: ImageOptions = field(default_factory=ImageOptions)
    split: str | None = None  # the registry task's split the examples were drawn from, and their rows in it
    rows: np.ndarray | None = None

    @property
    def shots(self) -> int:
        return int(np.bincount(self.labels).min())


def support_from_task(task: Task, shots: int, seed: int, split_name: str | None = None) -> Support:
    """K examples of every class of the train split (or of ``split_name``: a class-disjoint task's held-out
    classes are in its test split), drawn with ``seed``."""
    split = task.split(split_name or task.spec.train_split)
    rng = np.random.default_rng(seed)
    idx: list[np.ndarray] = []
    classes = sorted(split.counts())
    for c in classes:
        members = np.flatnonzero(split.labels == c)
        if len(members) < shots:
            raise MtlError(f"class '{task.classes[c]}' of task '{task.name}' has {len(members)} examples in its "
                           f"{split.name} split, fewer than the {shots} shots asked",
                           f"use --shots {len(members)} or fewer")
        idx.append(rng.choice(members, shots, replace=False))
    sel = np.concatenate(idx)
    remap = {c: i for i, c in enumerate(classes)}
    return Support(split.inputs[sel], np.asarray([remap[c] for c in split.labels[sel].tolist()]),
                   [task.classes[c] for c in classes], task.modality, task.name, task.spec.image_options, split.name,
                   sel)


def support_from_arrays(inputs: Any, labels: Any, modality: str, image: ImageOptions | None = None,
                        task: str = "user") -> Support:
    """A support set from Python values: texts (or uint8 images, PIL images or image files, the last two read
    with ``image``) and label names."""
    labels = [str(x) for x in labels]
    if len(labels) != len(inputs):
        raise MtlError(f"{len(inputs)} inputs but {len(labels)} labels", "give one label per input")
    if not labels:
        raise MtlError("no examples to adapt to", "give at least one example of each of two classes")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise MtlError(f"only one label ({classes[0]})", "give examples of at least two classes")
    if modality == "text":
        x = np.asarray([str(t) for t in inputs], dtype=np.str_)
    elif any(not isinstance(i, np.ndarray) for i in inputs):  # image files or PIL images, read as a task's are
        image = image or ImageOptions()
        x = given_images(list(inputs), image)
    else:
        x = np.stack([np.asarray(i) for i in inputs])
        if image is None and x.ndim in (3, 4) and all(4 <= n <= 1024 for n in x.shape[1:3]):
            h, w = x.shape[1:3]  # image files given to `predict` later are read at the arrays' size
            image = ImageOptions(size=h if h == w else (h, w), grayscale=x.ndim == 3)
    index = {c: i for i, c in enumerate(classes)}
    return Support(x, np.asarray([index[c] for c in labels]), classes, modality, task, image or ImageOptions())


def image_options_for(model: MultiTaskModel, tasks: Sequence[str], registry: Registry | None) -> ImageOptions:
    """How a checkpoint's user reads image files: as its first image training task (``tasks``) reads its own, at
    the checkpoint's ``model.image_size`` where it has one (Omniglot's strokes inverted, faces in grey)."""
    options = model.config.image_overrides
    if tasks:
        registry = registry or Registry()  # built once, not once per training task
    for name in tasks:
        with contextlib.suppress(MtlError):
            spec = registry.spec(name)  # type: ignore[union-attr]
            if spec.modality == "image":
                return spec.image_options.model_copy(update=options)
    return ImageOptions.model_validate(options)


def values_modality(inputs: Any, model: MultiTaskModel, tasks: Sequence[str], registry: Registry | None
                    ) -> tuple[str, ImageOptions | None]:
    """Whether ``(inputs, labels)`` are texts or images, and how image files and PIL images among them are read
    (:func:`image_options_for`; arrays are taken as they are). Strings are texts unless the checkpoint reads
    images only."""
    from PIL import Image

    first = next(iter(inputs), None)
    if isinstance(first, str) and "text" in model.encoders:
        return "text", None
    if not isinstance(first, str | Path | Image.Image):
        return "image", None
    return "image", image_options_for(model, tasks, registry)


def support_from_examples(path: Path | str, model: MultiTaskModel, tasks: Sequence[str], registry: Registry | None
                          ) -> Support:
    """A user's own file (or folder) of labelled examples with no registry task behind it (``adapt --examples``
    alone): texts or image files as the file holds, read as the checkpoint reads them, the task named after the
    file, less a split's name (``intents_train.csv``: intents; ``train.csv`` or ``train/``: its folder)."""
    path = Path(path)
    modality = examples_modality(path)
    if modality not in model.encoders:
        kind = {"text": "texts", "image": "image files"}
        raise MtlError(f"{path} holds {kind[modality]}, but the checkpoint reads {kind[next(iter(model.encoders))]}",
                       f"adapt a checkpoint trained on {modality} tasks")
    image = image_options_for(model, tasks, registry) if modality == "image" else ImageOptions()
    xs, ys, classes = read_examples(path, modality, image)
    name = path.stem if path.is_file() else path.resolve().name
    if name.lower() in SPLIT_FOLDERS:  # my-photos/train/ or reviews/train.csv: the data set's name is above
        name = path.resolve().parent.name
    name = re.sub(rf"[_.\-]({'|'.join(SPLIT_FOLDERS)})$", "", name, flags=re.IGNORECASE) or name  # intents_train
    return Support(xs, ys, classes, modality, name, image)

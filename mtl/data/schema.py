"""The task-file schema: one YAML file describes one classification task.

Validated with pydantic so that every problem is reported by field; :func:`mtl.registry.parse_task_file`
turns pydantic's errors into one line per problem with a fix. See ``docs/TASKS.md`` for examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Modality = Literal["text", "image"]
Role = Literal["meta_train", "meta_val", "held_out"]
Format = Literal[
    # read through the `datasets` library
    "csv", "tsv", "json", "jsonl", "parquet", "imagefolder", "hub",
    # formats of the shipped data that `datasets` has no builder for
    "json_rows", "split_lines", "line_pairs", "textfolder",
    "image_zip", "image_tar", "cifar_binary", "npz", "idx", "mat", "sklearn",
]
IMAGE_FORMATS = {"imagefolder", "image_zip", "image_tar", "cifar_binary", "npz", "idx", "mat", "sklearn"}
# Formats whose reader names the columns itself: a task file may leave `input_field`/`label_field` out.
FIXED_COLUMNS = {**{f: ("image", "label") for f in IMAGE_FORMATS}, "line_pairs": ("text", "label"),
                 "textfolder": ("text", "label")}

Paths = str | list[str]
FIELD_SEP = "\n"  # between the columns of a text task's `input_field: [title, body]`: whitespace to a tokenizer


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Download(_Strict):
    """Where a data file comes from publicly, and how to check it: one or more URLs (tried in
    order), the file's published checksum, and for an archive the member that is the file."""

    url: str | list[str]
    md5: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    member: str | None = None  # the URL gives a zip or tar archive; the file is this member of it
    size: int | None = Field(default=None, ge=0)  # bytes, for `cli.py data status` before a download

    @property
    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url)

    @property
    def known_hash(self) -> str | None:
        """The checksum in pooch's notation (``sha256:...``, ``md5:...``)."""
        return f"sha256:{self.sha256}" if self.sha256 else f"md5:{self.md5}" if self.md5 else None


class Source(_Strict):
    """Where the examples are. Exactly one of ``path`` (all examples), ``files`` (one entry per
    split) or ``dataset`` (a Hugging Face hub id, or a scikit-learn loader for ``sklearn``).
    ``download`` says where each file under ``path``/``files`` comes from publicly (file path
    relative to the data directory -> URLs and checksum); a file missing locally is fetched."""

    format: Format
    path: Paths | None = None
    files: dict[str, Paths] | None = None
    dataset: str | None = None
    config: str | None = None
    revision: str | None = None
    # Options of delimited text formats (csv, tsv, split_lines).
    sep: str | None = None
    header: bool = True
    columns: list[str] | None = None
    # line_pairs: one folder per split holding a text file and a label file, line-aligned.
    text_file: str = "seq.in"
    label_file: str = "label"
    # image_zip: leading folders of a member's path that are not part of its label.
    strip_components: int = Field(default=1, ge=0, le=16)
    # npz / mat arrays.
    images_key: str = "images"
    labels_key: str | None = "labels"
    examples_per_class: int | None = Field(default=None, ge=1)
    image_shape: list[int] | None = None
    transpose: bool = False
    # Text files: their character encoding, as for the csv readers of `datasets` and pandas.
    encoding: str = "utf-8"
    download: dict[str, Download] | None = None

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        try:
            return codecs.lookup(v).name
        except LookupError:
            raise ValueError(f"unknown encoding '{v}'; use e.g. utf-8, latin-1 or cp1252") from None

    @model_validator(mode="after")
    def _one_location(self) -> Source:
        given = [k for k in ("path", "files", "dataset") if getattr(self, k) is not None]
        if self.format in ("hub", "sklearn"):
            if self.dataset is None:
                raise ValueError(f"format '{self.format}' needs `dataset` (a hub id or loader name)")
        elif len(given) != 1 or given[0] == "dataset":
            raise ValueError(
                f"format '{self.format}' needs exactly one of `path` (all examples) or `files` "
                f"(split name -> file); got {', '.join(given) or 'neither'}"
            )
        return self


class Splits(_Strict):
    """How examples are divided: as the source divides them, or by a seeded split of examples
    (stratified by class) or of classes (class-disjoint, for meta-learning)."""

    by: Literal["source", "examples", "classes", "class_lists"] = "source"
    map: dict[str, str] | None = None
    sizes: dict[str, float] | None = None
    seed: int = 0
    classes: dict[str, list[str]] | None = None  # by: class_lists: split -> its class names (a paper's split)

    @model_validator(mode="after")
    def _sizes_match_mode(self) -> Splits:
        if self.by == "class_lists":
            if not self.classes or self.sizes is not None or self.map is not None:
                raise ValueError("`by: class_lists` needs `classes` (split -> class names) and no `sizes` or `map`")
            seen: dict[str, str] = {}
            for split, names in self.classes.items():
                for c in names:
                    if c in seen:
                        raise ValueError(f"class '{c}' is listed in both '{seen[c]}' and '{split}'")
                    seen[c] = split
            return self
        if self.classes is not None:
            raise ValueError("`classes` is only used with `by: class_lists`")
        if self.by == "source" and self.sizes is not None:
            raise ValueError("`sizes` is only used with `by: examples` or `by: classes`")
        if self.by != "source":
            if not self.sizes:
                raise ValueError(f"`by: {self.by}` needs `sizes`, e.g. {{train: 0.8, test: 0.2}}")
            if self.map is not None:
                raise ValueError("`map` is only used with `by: source`")
            values = list(self.sizes.values())
            if any(v <= 0 for v in values):
                raise ValueError("every split size must be positive")
            fractions = [v for v in values if v < 1]
            if fractions and len(fractions) != len(values):
                raise ValueError("give all sizes as fractions (< 1) or all as counts (>= 1), not a mix")
            if fractions and sum(fractions) > 1 + 1e-9:
                raise ValueError(f"split fractions add up to {sum(fractions):.3g}, more than 1")
            if not fractions and any(v != int(v) for v in values):
                raise ValueError("split counts must be whole numbers")
        return self


class Labels(_Strict):
    """Which labels the task keeps and what they are called."""

    include: list[str] | None = None
    exclude: list[str] = []
    pattern: str | None = None
    names: dict[str, str] | None = None

    @field_validator("include")
    @classmethod
    def _nonempty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("`include` is empty; list the labels to keep or remove the field")
        return v

    @field_validator("names", mode="before")
    @classmethod
    def _keys_as_str(cls, v: object) -> object:
        return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else v

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _items_as_str(cls, v: object) -> object:
        if isinstance(v, list):
            if any(isinstance(x, bool) for x in v):
                raise ValueError("a label reads as a YAML boolean (yes/no/on/off/true/false); quote it, e.g. 'yes'")
            return [str(x) for x in v]
        return v


class ImageOptions(_Strict):
    """Decoding options; ``rotations`` adds a rotated copy of every class as a new class, and ``flips``
    a mirrored copy of each of those (a mirrored character is another character, as a rotated one is).
    ``fit_content`` crops each image to its content (the pixels unlike its border), widened to the output's
    shape with a margin, before resizing: a drawing then fills the frame whatever its size and place on the
    page, and a small one keeps its strokes (:func:`mtl.data.images.fit_to_content`)."""

    size: int | tuple[int, int] = 28
    grayscale: bool = True
    invert: bool = False
    rotations: list[Literal[0, 90, 180, 270]] = [0]
    flips: bool = False
    rotate_splits: list[str] | None = None
    fit_content: bool = False

    @field_validator("size")
    @classmethod
    def _size_range(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        sizes = (v,) if isinstance(v, int) else v
        if any(not 4 <= s <= 1024 for s in sizes):
            raise ValueError("image size must be between 4 and 1024 pixels")
        return v

    @property
    def hw(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)  # type: ignore[return-value]


class TaskSpec(_Strict):
    """One classification task of the registry."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.\-]*$", max_length=100)
    modality: Modality
    description: str = Field(default="", max_length=2000)  # one line for `tasks list`; optional
    role: Role
    source: Source | list[Source]
    input_field: str | list[str]  # one column, or text columns joined (a title and a body)
    label_field: str = Field(min_length=1)
    splits: Splits = Splits()
    labels: Labels = Labels()
    image: ImageOptions | None = None
    train_split: str = "train"
    val_split: str | None = None
    test_split: str = "test"

    @model_validator(mode="before")
    @classmethod
    def _fixed_columns(cls, data: object) -> object:
        """Readers that name their own columns make the two fields optional (an image folder's are
        `image` and `label`), so a user's first task file needs no knowledge of the reader's internals."""
        if not isinstance(data, dict):
            return data
        sources = data.get("source")
        formats = {s.get("format") for s in (sources if isinstance(sources, list) else [sources])
                   if isinstance(s, dict)}
        fixed = {FIXED_COLUMNS.get(f) for f in formats}  # type: ignore[arg-type]
        if len(fixed) == 1 and None not in fixed:
            (input_col, label_col), = fixed
            data = {"input_field": input_col, "label_field": label_col, **data}
        return data

    @field_validator("input_field", mode="before")
    @classmethod
    def _columns(cls, v: object) -> object:
        names = [v] if isinstance(v, str) else v
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("`input_field` is a column name, or a list of text columns such as [title, body]")
        if not names or not all(names):
            raise ValueError("`input_field` names no column; give a column name, or a list of text columns")
        if len(set(names)) < len(names):
            raise ValueError("`input_field` lists a column twice; list each column once")
        return v

    @model_validator(mode="after")
    def _modality_consistent(self) -> TaskSpec:
        if self.modality == "text" and self.image is not None:
            raise ValueError("`image` options are only for `modality: image`")
        if self.modality == "image" and len(self.input_fields) > 1:
            raise ValueError("`input_field` lists several columns, which only text tasks join; give the image column")
        for src in self.sources:
            if self.modality == "text" and src.format in IMAGE_FORMATS - {"npz"}:
                raise ValueError(f"format '{src.format}' holds images; set `modality: image`")
            if self.modality == "image" and src.format in ("textfolder", "line_pairs", "json_rows", "split_lines"):
                raise ValueError(f"format '{src.format}' holds texts; set `modality: text`")
        return self

    @property
    def input_fields(self) -> list[str]:
        """The columns whose values, joined by :data:`FIELD_SEP`, are an example's text (or its image)."""
        return [self.input_field] if isinstance(self.input_field, str) else list(self.input_field)

    @property
    def sources(self) -> list[Source]:
        """Several sources are merged split by split (e.g. SST-2, whose test file has another layout)."""
        return list(self.source) if isinstance(self.source, list) else [self.source]

    @property
    def image_options(self) -> ImageOptions:
        return self.image or ImageOptions()

    def beside(self, folder: Path, root: Path) -> TaskSpec:
        """This spec with each relative data path that ``root`` (the data directory) lacks but ``folder`` (the
        task file's) holds made absolute: a project keeps its task files beside their data (``path:
        reviews.csv``) and moves as one folder."""
        def found(p: str) -> str:
            given = Path(p).expanduser()
            try:
                if given.is_absolute() or (root / given).exists() or not (folder / given).exists():
                    return p
            except OSError:  # a name no file system takes: said where the source is read
                return p
            return str((folder / given).resolve())

        def each(v: Paths) -> Paths:
            return found(v) if isinstance(v, str) else [found(p) for p in v]

        moved = [src.model_copy(update={"path": None if src.path is None else each(src.path),
                                        "files": None if src.files is None else
                                        {k: each(v) for k, v in src.files.items()}}) for src in self.sources]
        if moved == self.sources:
            return self
        return self.model_copy(update={"source": moved if isinstance(self.source, list) else moved[0]})

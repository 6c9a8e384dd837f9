"""Regenerate the task files that follow a pattern (CLINC150 domains, Omniglot alphabets).

Run from the repository root: ``python tasks/_generate.py``. Hand-written task files are left alone.
The lists are written out in full in each file so that a task file reads on its own.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mtl.settings import data_dir

HERE = Path(__file__).parent
CLINC_HELD_OUT = {"kitchen_and_dining", "travel", "work"}  # fixed before any result was seen
NOTE = "  download:  # where each file comes from publicly, and its checksum"
CLINC_DOWNLOAD = [NOTE, "    text/clinc150/data_full.json:",
                  "      url: https://raw.githubusercontent.com/clinc/oos-eval/master/data/data_full.json",
                  "      sha256: 36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0"]
OMNIGLOT_MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",  # as torchvision publishes them
                "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}


def omniglot_download(split: str) -> list[str]:
    return [NOTE, f"    omniglot/{split}.zip:", "      url:",
            f"        - https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{split}.zip",
            f"        - https://github.com/brendenlake/omniglot/raw/master/python/{split}.zip",
            f"      md5: {OMNIGLOT_MD5[split]}"]


def clinc() -> None:
    domains = json.loads((data_dir() / "text/clinc150/domains.json").read_text())
    for domain, intents in domains.items():
        role = "held_out" if domain in CLINC_HELD_OUT else "meta_train"
        lines = [
            f"name: clinc150-{domain.replace('_', '-')}",
            "modality: text",
            f"description: CLINC150 intents of the '{domain}' domain (15 intents, 100/20/30 per intent).",
            f"role: {role}",
            "source:",
            "  format: json_rows",
            "  path: text/clinc150/data_full.json",
            "  columns: [text, intent]",
            *CLINC_DOWNLOAD,
            "input_field: text",
            "label_field: intent",
            "splits:",
            "  map: {train: train, val: val, test: test}",
            "labels:",
            "  include:",
            *[f"    - {json.dumps(i)}" for i in intents],  # quoted: YAML reads yes/no as booleans
            "val_split: val",
        ]
        (HERE / "clinc150" / f"{domain}.yaml").write_text("\n".join(lines) + "\n")


def omniglot_alphabets() -> None:
    rows = list(csv.DictReader((data_dir() / "omniglot/omniglot_index.csv").open()))
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r["alphabet"], r["split"])
    for alphabet, split in seen.items():
        n = sum(1 for r in rows if r["alphabet"] == alphabet)
        role = "meta_train" if split == "images_background" else "held_out"
        slug = alphabet.lower().replace("_", "-").replace("(", "").replace(")", "").replace(".", "")
        lines = [
            f"name: omniglot-{slug}",
            "modality: image",
            f"description: Omniglot alphabet {alphabet} ({split}), {n} characters x 20 drawers; "
            "15 drawers per character for training, 5 for testing.",
            f"role: {role}",
            "source:",
            "  format: image_zip",
            f"  path: omniglot/{split}.zip",
            "  strip_components: 1",
            *omniglot_download(split),
            "input_field: image",
            "label_field: label",
            "labels:",
            f"  pattern: '{alphabet}/*'",
            "splits:",
            "  by: examples",
            "  sizes: {train: 15, test: 5}",
            "  seed: 0",
            "image: {size: 28, grayscale: true, invert: true}",
        ]
        (HERE / "omniglot" / "alphabets" / f"{slug}.yaml").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    (HERE / "omniglot" / "alphabets").mkdir(parents=True, exist_ok=True)
    (HERE / "clinc150").mkdir(exist_ok=True)
    clinc()
    omniglot_alphabets()

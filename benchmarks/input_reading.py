#!/usr/bin/env python3
"""How fast a user's own inputs are read: photos decoded to a model's image size, and long texts embedded.

Two figures a user with a large data set of their own meets first, before any learning:
- a phone-sized JPEG (4000 x 3000) read at 84 x 84 as a task's images are (`mtl.data.images.prepare_images`,
  which decodes a JPEG at a reduced scale, at least twice the size asked), against a full decode;
- all-MiniLM-L6-v2's sentence embeddings of short (20-word) and long (230-word, truncated at 256 tokens)
  texts, which is what scoring a large test split costs `adapt` (hence its `--test-examples` sample).

    python benchmarks/input_reading.py
"""

from __future__ import annotations

import io
import json
import random
import time

import numpy as np
from PIL import Image


def per_item(fn, n: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    from mtl.data.embeddings import _encode
    from mtl.data.images import prepare_images
    from mtl.data.schema import ImageOptions
    from mtl.device import cpu_name

    smooth = np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).resize((4000, 3000)).save(buf, "JPEG", quality=90)
    photo = buf.getvalue()

    def full() -> object:
        img = Image.open(io.BytesIO(photo))
        img.load()
        return img.convert("RGB").resize((84, 84), Image.Resampling.LANCZOS)

    reduced = per_item(lambda: prepare_images([photo], ImageOptions(size=84, grayscale=False)), 5)
    whole = per_item(full, 5)
    random.seed(0)
    words = [w for w in (__doc__ or "").split() if w.isalpha()]  # ordinary English words
    texts = {k: [" ".join(random.choices(words, k=k)) for _ in range(n)] for k, n in ((20, 500), (230, 100))}
    _encode(texts[20][:20], "minilm")
    rates = {}
    for k, batch in texts.items():
        t0 = time.perf_counter()
        _encode(batch, "minilm")
        rates[f"{k}_words_per_s"] = round(len(batch) / (time.perf_counter() - t0), 1)
    print(json.dumps({"cpu": cpu_name(),
                      "jpeg_4000x3000_to_84_ms": round(1000 * reduced, 1), "full_decode_ms": round(1000 * whole, 1),
                      "texts_embedded": rates}))


if __name__ == "__main__":
    main()

"""SetFit (Tunstall et al., 2022), the few-shot text baseline a user would otherwise reach for: the
same pretrained sentence encoder, contrastively fine-tuned on pairs drawn from the support set, then
a logistic-regression head. Runs through the ``setfit`` package, an optional extra
(``pip install 'mtl-fewshot[setfit]'``) that only ``compare --methods ...,setfit`` and the benchmarks
import.
"""

from __future__ import annotations

import logging
import tempfile
import warnings

import numpy as np
import torch

from mtl.data.embeddings import model_path
from mtl.errors import MtlError


def setfit_probs(texts_s: list[str], ys: np.ndarray, texts_q: list[str], encoder: str = "minilm",
                 iterations: int = 20, epochs: int = 1, seed: int = 0, device: torch.device | str = "cpu"
                 ) -> np.ndarray:
    """Query probabilities (columns: classes 0..K-1) after SetFit's training on the support set;
    ``iterations``: SetFit's pairs per example (its default, 20)."""
    try:
        from datasets import Dataset
        from setfit import SetFitModel, Trainer, TrainingArguments
    except ImportError:
        raise MtlError("the setfit baseline needs the setfit package", "pip install 'mtl-fewshot[setfit]'") from None
    for name in ("setfit", "sentence_transformers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:  # nothing is written where the user runs it
        model = SetFitModel.from_pretrained(str(model_path(encoder)), device=str(device))
        args = TrainingArguments(output_dir=tmp, num_iterations=iterations, num_epochs=epochs, batch_size=16,
                                 seed=seed, save_strategy="no", report_to=[], show_progress_bar=False)
        data = Dataset.from_dict({"text": list(texts_s), "label": [int(y) for y in ys]})
        with warnings.catch_warnings():  # its data loader asks for pinned memory even without a GPU
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            Trainer(model=model, args=args, train_dataset=data).train()
        probs = np.asarray(model.predict_proba(list(texts_q), as_numpy=True, show_progress_bar=False))
    return probs

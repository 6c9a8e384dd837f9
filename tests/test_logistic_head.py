"""The logistic-regression head (mtl.models.heads.logistic_head) and the rule that keeps it as the image
default unless cross-validation beats it beyond its noise (mtl.run.select.prefer)."""

from __future__ import annotations

import json

import numpy as np
import torch

from mtl.models.heads import logistic_head
from mtl.run.select import LOGISTIC, Setting, prefer
from tests.test_cli_model import image_run  # noqa: F401  (a module-scoped training run)


def test_logistic_head_separates_classes_whatever_the_feature_scale():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    ys = np.repeat(np.arange(4), 5)
    feats = torch.as_tensor(centres[ys] + rng.normal(size=(20, 16)), dtype=torch.float32)
    test_ys = np.repeat(np.arange(4), 50)
    test = torch.as_tensor(centres[test_ys] + rng.normal(size=(200, 16)), dtype=torch.float32)
    answers = []
    for scale in (0.01, 1.0, 300.0):  # the head is fitted at a fixed mean norm, then applies to raw features
        w, b = logistic_head(feats * scale, torch.as_tensor(ys), 4)
        assert w.shape == (4, 16) and b.shape == (4,)
        answers.append((test * scale @ w.T + b).argmax(1))
    assert float((answers[1].numpy() == test_ys).mean()) > 0.95
    assert torch.equal(answers[0], answers[1]) and torch.equal(answers[1], answers[2])


def test_logistic_head_for_two_classes_has_a_row_each():
    feats = torch.tensor([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0], [0.9, 0.1]])
    w, b = logistic_head(feats, torch.tensor([0, 0, 1, 1]), 2)
    assert w.shape == (2, 2) and (feats @ w.T + b).argmax(1).tolist() == [0, 0, 1, 1]


def test_the_default_is_kept_unless_beaten_beyond_the_noise():
    other = Setting(10, 0.2)
    # 30 held-out examples at 75%: one standard error is 7.9 points
    assert prefer(LOGISTIC, other, {LOGISTIC: 0.75, other: 0.80}, 30) == LOGISTIC
    assert prefer(LOGISTIC, other, {LOGISTIC: 0.75, other: 0.85}, 30) == other
    assert prefer(LOGISTIC, other, {LOGISTIC: 0.75, other: 0.80}, 3000) == other  # 0.8 points at 3,000
    assert prefer(LOGISTIC, LOGISTIC, {LOGISTIC: 1.0}, 30) == LOGISTIC


def test_image_adaptation_defaults_to_the_logistic_head(image_run, tmp_path, run_cli):  # noqa: F811
    code, out, err = run_cli("adapt", "--task", "mnist", "--checkpoint", image_run, "--shots", 3, "--out",
                             tmp_path / "m")
    assert code == 0, err
    assert "a head fitted by logistic regression on its features (chosen by 3-fold cross-validation" in out
    code, out, err = run_cli("adapt", "--task", "mnist", "--checkpoint", image_run, "--shots", 3, "--json",
                             "--out", tmp_path / "m2")
    sel = json.loads(out)["selection"]
    assert code == 0 and sel["head_init"] == "logistic" and sel["steps"] == 0 and "0@logistic" in sel["scores"]
    code, out, err = run_cli("adapt", "--task", "mnist", "--checkpoint", image_run, "--shots", 3, "--head-init",
                             "bogus", "--out", tmp_path / "m3")
    assert code == 2 and "use zero, proto or logistic" in err

"""Calibration and "none of these": the temperature, ECE, the conformal threshold and the
leave-one-out out-of-scope scores, checked against values worked out by hand or by brute force."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mtl.run import outliers
from mtl.run.calibration import expected_calibration_error, fit_temperature, softmax, threshold_for


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy():
    probs = np.array([[0.9, 0.1]] * 10)  # one bin, confidence 0.9
    labels = np.array([0] * 6 + [1] * 4)  # accuracy 0.6
    assert abs(expected_calibration_error(probs, labels) - 0.3) < 1e-12
    perfect = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(perfect, np.array([0, 0, 0, 1])) < 1e-12


def test_temperature_recovers_overconfidence_and_undoes_it():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(true_logits)])
    overconfident = 3.0 * true_logits  # the model's logits: three times too sharp
    t = fit_temperature(overconfident, labels)
    assert 2.7 < t < 3.3
    before = expected_calibration_error(softmax(overconfident), labels)
    after = expected_calibration_error(softmax(overconfident, t), labels)
    assert before > 0.1 and after < 0.03


def test_temperature_stays_near_one_without_evidence():
    logits = np.eye(3)[[0, 1, 2] * 5] * 8.0  # fifteen confident, correct predictions
    assert 0.5 < fit_temperature(logits, np.array([0, 1, 2] * 5)) <= 1.0  # not driven to zero


def test_threshold_is_the_conformal_quantile():
    scores = np.arange(1, 40) / 40.0  # 39 held-out in-scope scores
    # a new in-scope score falls below the k-th smallest of n with probability k / (n + 1): k = floor(rate * 40)
    assert threshold_for(scores, 0.05) == scores[1] and threshold_for(scores, 0.10) == scores[3]
    assert threshold_for(scores[:10], 0.05) is None  # too few to bound: refuse nothing


def test_leave_one_out_similarity_matches_brute_force():
    torch.manual_seed(0)
    feats = torch.randn(12, 6)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    got = outliers.leave_one_out_similarity(feats, labels)
    f = F.normalize(feats, dim=1)
    for i in range(len(f)):
        keep = torch.ones(len(f), dtype=torch.bool)
        keep[i] = False
        protos = F.normalize(torch.stack([f[keep & (labels == c)].mean(0) for c in range(3)]), dim=1)
        assert torch.allclose(got[i], outliers.score("similarity", {"prototypes": protos}, feats[i:i + 1])[0],
                              atol=1e-6)


def gaussian_classes(per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(20, 32, generator=g) * 2
    y = torch.arange(20).repeat_interleave(per_class)
    return centers[y] + torch.randn(len(y), 32, generator=torch.Generator().manual_seed(seed)), y, centers


def test_leave_one_out_distance_matches_refitting_without_each_example():
    feats, labels, _ = gaussian_classes(6)
    got = outliers.leave_one_out_distance(feats.double(), labels)
    for i in range(0, len(feats), 7):
        keep = torch.ones(len(feats), dtype=torch.bool)
        keep[i] = False
        state = outliers.fit("distance", feats[keep], labels[keep], 20)
        want = outliers.score("distance", state, feats[i:i + 1])[0]
        assert abs(float(got[i]) - float(want)) < 0.02 * max(1.0, abs(float(want)))  # up to the trace's change


def test_distance_threshold_from_held_out_scores_refuses_about_the_rate_asked():
    feats, labels, centers = gaussian_classes(10)
    state = outliers.fit("distance", feats, labels, 20)
    noise = torch.randn(4000, 32, generator=torch.Generator().manual_seed(1))
    new = centers[torch.arange(20).repeat_interleave(200)] + noise
    scores = outliers.score("distance", state, new).numpy()
    held = threshold_for(outliers.held_out("distance", feats, labels).numpy(), 0.05)
    in_sample = threshold_for(outliers.score("distance", state, feats).numpy(), 0.05)
    assert 0.02 < (scores < held).mean() < 0.09  # a new in-scope input is refused about 5% of the time
    assert (scores < in_sample).mean() > 0.2  # measured on the examples that shaped it, far more
    far = centers[:5] * 3  # inputs that fit no class score below every in-scope one
    assert (outliers.score("distance", state, far).numpy() < held).all()


def test_distance_with_one_example_per_class_is_on_a_sane_scale():
    feats, labels, centers = gaussian_classes(1)
    state = outliers.fit("distance", feats, labels, 20)
    near = outliers.score("distance", state, feats + 0.01)
    far = outliers.score("distance", state, centers[:5] * 3)
    assert torch.isfinite(near).all() and near.abs().max() < 1e3 and near.min() > far.max()

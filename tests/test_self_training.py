"""``adapt --unlabeled``: the adapted model labels unlabeled inputs, and a linear classifier fitted to its
confident answers joins it (texts) or replaces its head (images) (mtl.run.self_training)."""

from __future__ import annotations

import json

import numpy as np

from mtl.data.registry import Registry
from mtl.run.adapted import HEAD, AdaptedModel
from mtl.run.self_training import FRACTION, SHARE, pseudo_labels
from tests.conftest import write
from tests.test_cli_model import image_run, text_run  # noqa: F401  (module-scoped training runs)


def test_pseudo_labels_keep_each_class_most_confident_up_to_its_share():
    logits = np.array([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0],
                       [0.0, 2.0]])
    rows, labels = pseudo_labels(logits, fraction=0.5)  # 8 rows, 2 classes: at most 2 of each
    assert rows.tolist() == [0, 1, 6, 7] and labels.tolist() == [0, 0, 1, 1]
    rows, labels = pseudo_labels(logits, fraction=1.0)  # 4 of each: class 1 has only 3 answers
    assert sorted(rows.tolist()) == [0, 1, 2, 3, 5, 6, 7] and np.bincount(labels).tolist() == [4, 3]


def test_adapt_with_unlabeled_texts(text_run, tmp_path, run_cli):  # noqa: F811
    task = Registry().load("clinc150-work")
    texts = task.train.inputs[np.random.default_rng(0).permutation(len(task.train.inputs))[:600]]
    pool = write(tmp_path / "unlabeled.txt", "\n".join(texts.tolist()) + "\n")
    code, out, err = run_cli("adapt", "--task", "clinc150-work", "--checkpoint", text_run, "--shots", 3,
                             "--meta-only", "--out", tmp_path / "plain", "--json")
    assert code == 0, err
    before = json.loads(out)["test_accuracy"]
    code, out, err = run_cli("adapt", "--task", "clinc150-work", "--checkpoint", text_run, "--shots", 3,
                             "--meta-only", "--unlabeled", pool, "--out", tmp_path / "m", "--json")
    assert code == 0, err
    result = json.loads(out)
    st = result["self_training"]
    # the support set and repeated texts are left out; of each class at most FRACTION of an even split
    assert 550 <= st["unlabeled"] < 600 and st["per_class"] <= round(FRACTION * st["unlabeled"] / 15)
    assert st["pseudo_labelled"] >= 0.7 * FRACTION * st["unlabeled"] and st["share"] == SHARE
    assert result["test_accuracy"] > before - 0.02  # 15 intents, 3 shots: the probe on ~300 more texts helps
    saved = AdaptedModel.load(tmp_path / "m")
    assert saved.meta["probe"]["weight"] == SHARE and saved.frozen is not None
    x = task.test.inputs[:40]
    code, out, err = run_cli("predict", "--model", tmp_path / "m", "--json", *x.tolist())
    assert code == 0, err
    assert [p["label"] for p in json.loads(out)["predictions"]] == saved.predict(x).tolist()
    # by default the model may itself be the probe (mtl.run.text_default): then the probe is refitted, not added
    code, out, err = run_cli("adapt", "--task", "clinc150-work", "--checkpoint", text_run, "--shots", 3,
                             "--unlabeled", pool, "--out", tmp_path / "d", "--json")
    assert code == 0, err
    result = json.loads(out)
    is_probe = result["choice"]["method"] in ("linear_probe", "probe+tokens")
    assert result["self_training"]["share"] == (1.0 if is_probe else SHARE)
    assert ("probe" in AdaptedModel.load(tmp_path / "d").meta) == (not is_probe)


def test_unlabeled_errors_are_one_line(text_run, image_run, tmp_path, run_cli):  # noqa: F811
    cases = [(text_run, "clinc150-work", tmp_path / "missing.txt", "no such file"),
             (text_run, "clinc150-work", write(tmp_path / "few.txt", "\n".join(f"text {i}" for i in range(60))),
              "gives 60 texts beyond the support set, fewer than 5 per class (75 for 15 classes)"),
             (image_run, "mnist", write(tmp_path / "some.txt", "a\nb\n"), "image a not found"),
             (image_run, "mnist", tmp_path / "nothing", "no such file or folder")]
    for run, task, pool, message in cases:
        code, _, err = run_cli("adapt", "--task", task, "--checkpoint", run, "--shots", 2, "--unlabeled", pool,
                               "--out", tmp_path / "x")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_adapt_with_unlabeled_images(image_run, tmp_path, run_cli):  # noqa: F811
    """A folder of unlabeled MNIST digits: the model's head is refitted on its features of the support set
    and of its confident answers; the temperature comes from folds of the labelled examples."""
    from PIL import Image

    task = Registry().load("mnist")
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for i in np.random.default_rng(0).permutation(len(task.train.inputs))[:500]:
        Image.fromarray(task.train.inputs[i]).save(folder / f"{i}.png")
    gains, base = [], ("adapt", "--task", "mnist", "--checkpoint", image_run, "--shots", 5, "--json")
    # two support draws: what a weak teacher (20 iterations of training) gains varies by draw; draw 0 last,
    # whose runs the checks below read
    for seed in (1, 0):
        args = (*base, "--views", 1, "--seed", seed)
        code, out, err = run_cli(*args, "--out", tmp_path / "plain")
        assert code == 0, err
        before = json.loads(out)
        code, out, err = run_cli(*args, "--unlabeled", folder, "--out", tmp_path / "m")
        assert code == 0, err
        result = json.loads(out)
        gains.append(result["test_accuracy"] - before["test_accuracy"])
    assert sum(gains) > 0  # 10 digits, 5 shots: ~300 more examples help on average
    st = result["self_training"]
    assert 490 <= st["unlabeled"] <= 500 and st["share"] == 1.0 and st["per_class"] <= round(FRACTION * 50)
    assert st["pseudo_labelled"] >= 0.5 * FRACTION * st["unlabeled"]
    assert result["calibration"]["by"] == "5-fold cross-validation on the support set"
    assert result["rejection"] == before["rejection"]  # the distance score reads the same features
    saved = AdaptedModel.load(tmp_path / "m")
    assert saved.meta["head"] == "linear" and saved.meta["self_training"] == st
    code, out, err = run_cli(*base, "--out", tmp_path / "m8")  # 8 views (the default): each head refitted
    assert code == 0, err
    eight = json.loads(out)
    code, out, err = run_cli(*base, "--unlabeled", folder, "--out", tmp_path / "m8u")
    assert code == 0, err
    both = json.loads(out)
    assert both["self_training"]["unlabeled"] == st["unlabeled"]
    assert both["test_accuracy"] > eight["test_accuracy"] - 0.02  # one draw: no gain promised, nothing broken
    views = AdaptedModel.load(tmp_path / "m8u").views
    assert len(views) == 7 and all(v.heads["adapted"].weight.shape == (10, saved.model.heads["adapted"].weight.shape[1])
                                   for v in views)
    pngs = sorted(folder.iterdir())[:20]
    code, out, err = run_cli("predict", "--model", tmp_path / "m", "--json", *pngs)
    assert code == 0, err
    images = saved.load_inputs([str(p) for p in pngs])[0]
    assert [p["label"] for p in json.loads(out)["predictions"]] == saved.predict(images).tolist()


def test_a_probe_alone_is_refitted_in_place():
    """Where ``--select`` chose the linear probe alone, the model is that probe: its head is refitted on the
    support set and its confident answers, with no second voice."""
    import torch

    from mtl.run.alternatives import probe
    from mtl.run.self_training import self_train
    from mtl.run.support import support_from_task

    task = Registry().load("clinc150-work")
    support = support_from_task(task, 3, 0)
    k = len(support.classes)
    model = AdaptedModel(probe(support.inputs.tolist(), np.asarray(support.labels), k, "minilm", torch.device("cpu")),
                         {"classes": support.classes, "modality": "text", "algorithm": "linear_probe"})
    before = model.model.heads[HEAD].weight.detach().clone()
    x, truth = task.test.inputs, np.asarray([support.classes.index(task.classes[c]) for c in task.test.labels])
    acc_before = float((model.predict_ids(x) == truth).mean())
    self_train(model, support, task.train.inputs.tolist())
    assert model.meta["self_training"]["share"] == 1.0 and "probe" not in model.meta and model.frozen is None
    assert not torch.equal(before, model.model.heads[HEAD].weight)
    assert float((model.predict_ids(x) == truth).mean()) > acc_before  # 3 shots: ~1,400 more examples help

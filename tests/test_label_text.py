"""Class names as one more example of each class (mtl.run.label_text)."""

import numpy as np
import torch

from mtl.run.label_text import descriptive, readable, with_names


def test_class_names_read_as_words():
    assert readable("AddToPlaylist") == "add to playlist"
    assert readable("Refund_not_showing_up") == "refund not showing up"
    assert readable("sci/tech") == "sci / tech" and readable("very negative") == "very negative"


def test_only_names_that_say_something_are_used():
    assert descriptive(["negative", "positive"]) and descriptive(["card_arrival", "AddToPlaylist"])
    assert not descriptive(["0", "1"]) and not descriptive(["LABEL_0", "LABEL_1"]) and not descriptive(["a", "b"])
    assert not descriptive(["card_arrival", "card-arrival"])  # two classes that would read the same


def test_names_join_the_support_set_as_examples_of_their_class():
    texts, ys = with_names(["x", "y"], np.array([1, 0]), ["get_weather", "book_restaurant"])
    assert texts == ["x", "y", "get weather", "book restaurant"] and ys.tolist() == [1, 0, 0, 1]
    same_texts, same_ys = with_names(["x"], np.array([0]), None)
    assert same_texts == ["x"] and same_ys.tolist() == [0]


def test_a_probe_told_the_class_names_answers_by_them():
    from mtl.run.adapted import HEAD
    from mtl.run.alternatives import model_features, probe

    texts, ys = ["thanks", "ok then"], np.array([0, 1])  # one uninformative example per class
    names = ["weather_forecast", "restaurant_booking"]
    model = probe(texts, ys, 2, "minilm", torch.device("cpu"), names)
    queries = ["will it rain tomorrow in paris", "reserve a table for four at an italian place"]
    pred = model.heads[HEAD](model_features(model, queries)).argmax(1).tolist()
    assert pred == [0, 1]

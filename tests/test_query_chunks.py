"""The query loss differentiated a piece of the query set at a time (``inner.query_chunks``) gives the
whole query set's meta-gradient, loss, accuracy and batch-norm statistics, for every inner-loop variant."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mtl.algorithms import InnerConfig
from tests.test_maml import batch, check_against_fd, float64, tiny_learner  # noqa: F401
from tests.test_recompute import assert_same_meta_gradient

VARIANTS = [
    ("maml", {"steps": 2}),
    ("maml", {"steps": 2, "recompute": True}),
    ("maml", {"steps": 2, "head_init": "proto"}),
    ("maml", {"steps": 2, "adapt": "trunk+head"}),  # the query's encoding is cut as well as the fast weights
    ("fomaml", {"steps": 2}),
    ("maml++", {"steps": 3}),  # a query loss after every step; per-step batch-norm weights read directly
    ("anil", {"steps": 2}),
    ("protonet", {}),
]


@pytest.mark.parametrize("method, inner", VARIANTS, ids=[f"{m}-{i}" for m, i in VARIANTS])
def test_pieces_give_the_whole_query_sets_meta_gradient(method, inner):
    assert_same_meta_gradient(method, inner, {"query_chunks": 4}, [batch(0, queries=5), batch(1, queries=5)])


def test_pieces_match_finite_differences():
    check_against_fd(tiny_learner("maml", steps=2, query_chunks=3), [batch(0, queries=4), batch(1, queries=4)])


def test_pieces_refuse_transductive_batch_norm():
    with pytest.raises(ValidationError, match="query_chunks > 1 needs bn: support"):
        InnerConfig(query_chunks=2, bn="transductive")

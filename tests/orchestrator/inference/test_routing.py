from __future__ import annotations

import collections

import pytest
from pydicom.uid import generate_uid

from orchestrator.inference.routing import Route, bucket, choose

# 2,000 random studies split 50/50: a binomial σ of ≈1.1 %, so ±5 % is > 4σ.
SPLIT_STUDIES = 2000
SPLIT_TOLERANCE = 0.05


def test_split_follows_weights_within_tolerance() -> None:
    routes = [Route(1, 50, False), Route(2, 50, False)]
    counts = collections.Counter(
        choose("triage", generate_uid(), routes).live for _ in range(SPLIT_STUDIES)
    )
    assert abs(counts[1] / SPLIT_STUDIES - 0.5) < SPLIT_TOLERANCE


def test_split_is_sticky_per_study_and_model() -> None:
    routes = [Route(1, 90, False), Route(2, 10, False)]
    uid = generate_uid()
    assert len({choose("triage", uid, routes).live for _ in range(20)}) == 1
    assert bucket("triage", uid) == bucket("triage", uid)


def test_shadows_are_returned_but_never_live() -> None:
    routes = [Route(1, 100, False), Route(3, 0, True)]
    choice = choose("triage", generate_uid(), routes)
    assert choice.live == 1 and choice.shadows == (3,)


def test_no_live_route_is_an_error() -> None:
    with pytest.raises(LookupError, match="no live route"):
        choose("triage", "1.2.3", [Route(1, 0, True)])

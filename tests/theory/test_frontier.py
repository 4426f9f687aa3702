"""The matched-gain frontier (theory.frontier): brute force, properties, hand-valued cases."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.frontier import (UNDECIDED, best_at_levels, claim_at_levels, frontier, gain_levels, matched_gain,
                             within)

finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False)
points = st.lists(st.tuples(finite, finite), min_size=0, max_size=30)
levels = st.lists(finite, min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(points, levels)
def test_frontier_equals_brute_force_and_its_point_realises_it(pts, lv):
    g = np.array([p[0] for p in pts])
    d = np.array([p[1] for p in pts])
    f = frontier(g, d, lv)
    for i, level in enumerate(lv):
        reach = d[g >= level]
        if reach.size == 0:
            assert math.isnan(f.least[i]) and f.at[i] == -1
        else:
            assert f.least[i] == reach.min()
            j = f.at[i]
            assert g[j] >= level and d[j] == f.least[i]


@settings(max_examples=200, deadline=None)
@given(points, levels)
def test_frontier_is_monotone_in_the_gain_level(pts, lv):
    g = np.array([p[0] for p in pts])
    d = np.array([p[1] for p in pts])
    lv = sorted(lv)
    least = frontier(g, d, lv).least
    reached = ~np.isnan(least)
    # reached levels come first (a larger level is reached by fewer points) ...
    assert not np.any(np.diff(reached.astype(int)) > 0)
    # ... and along them the least degradation never falls
    assert np.all(np.diff(least[reached]) >= 0)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=20),
       st.floats(0.01, 5), st.floats(0.01, 5), levels)
def test_a_dominating_method_wins_at_every_level_the_other_reaches(pts, dg, dd, lv):
    """A = B's points with more gain and less degradation: A better ("yes") wherever B reaches."""
    gb = np.array([p[0] for p in pts])
    db = np.array([p[1] for p in pts])
    ga, da = gb + dg, db - dd
    fa, fb = frontier(ga, da, lv), frontier(gb, db, lv)
    per, verdict = claim_at_levels(fa.least, fb.least)
    best = best_at_levels({"a": fa.least, "b": fb.least})
    for i in range(len(lv)):
        if not math.isnan(fb.least[i]):
            assert per[i] == "yes" and best[i] == "a"
        else:
            assert per[i] == UNDECIDED
    assert verdict == ("holds" if "yes" in per else UNDECIDED)


def test_hand_valued_frontiers_best_and_claim():
    ce = ([1, 2, 4], [1, 3, 10])
    talr = ([1, 3], [2, 5])
    lv = [0.5, 1, 2, 3, 4]
    assert frontier(*ce, lv).least.tolist() == [1, 1, 3, 10, 10]
    f = frontier(*talr, lv)
    assert f.least[:4].tolist() == [2, 2, 5, 5] and math.isnan(f.least[4]) and f.at.tolist() == [0, 0, 1, 1, -1]
    least = {"ce": frontier(*ce, lv).least, "talr": f.least}
    assert best_at_levels(least) == ["ce", "ce", "ce", "talr", "ce"]
    per, verdict = claim_at_levels(least["talr"], least["ce"])
    assert per == ["no", "no", "no", "yes", UNDECIDED] and verdict == "mixed"
    # a tolerance of 1 makes level 0.5/1 (2 vs 1) too close to call, and 3 vs 5 still "no"
    per, _ = claim_at_levels(least["talr"], least["ce"], tol=1.0)
    assert per == [UNDECIDED, UNDECIDED, "no", "yes", UNDECIDED]
    assert best_at_levels(least, tol=1.0)[:2] == [UNDECIDED, UNDECIDED]


def test_ties_pick_the_larger_gain_then_input_order():
    f = frontier([1, 3, 3, 2], [5, 5, 5, 5], [0, 2.5])
    assert f.at.tolist() == [1, 1]


def test_within_and_relative_tolerance():
    assert within(10, 10.5, rel_tol=0.05) and not within(10, 10.6, rel_tol=0.05)
    assert within(0.0, 0.01, tol=0.01) and not within(0.0, 0.011, tol=0.01)


def test_gain_levels():
    lv, fr = gain_levels(8.0, (0.25, 0.5, 1.0), absolute=(3.0,))
    assert lv.tolist() == [2.0, 4.0, 8.0, 3.0] and fr == [0.25, 0.5, 1.0, None]
    lv, fr = gain_levels(-1.0, (0.5,), absolute=(1.0,))  # nobody gained: only absolute levels
    assert lv.tolist() == [1.0] and fr == [None]
    with pytest.raises(ValueError, match=r"gain fraction 1.5"):
        gain_levels(1.0, (1.5,))
    with pytest.raises(ValueError, match=r"absolute\[0\]"):
        gain_levels(1.0, (0.5,), absolute=(float("nan"),))


def test_matched_gain_is_json_ready_and_consistent():
    pts = {"ce": ([0, 1, 2, 4], [0, 1, 3, 10]), "talr": ([0, 1, 3], [0, 2, 5])}
    labels = {"ce": ["s0", "s1", "s2", "s3"], "talr": ["t0", "t1", "t2"]}
    out = matched_gain(pts, fractions=(0.25, 0.5, 0.75, 1.0), absolute=(2.0,), labels=labels)
    text = json.dumps(out, allow_nan=False)  # no NaN: unreached levels are null
    assert json.loads(text) == out
    assert out["interpolation"] == "none" and out["best_gain"] == 4
    assert out["levels"] == [1.0, 2.0, 3.0, 4.0, 2.0] and out["level_fractions"] == [0.25, 0.5, 0.75, 1.0, None]
    assert out["least_degradation"] == {"ce": [1, 3, 10, 10, 3], "talr": [2, 5, 5, None, 5]}
    assert out["best"] == ["ce", "ce", "talr", "ce", "ce"] and out["wins"] == {"ce": 4, "talr": 1}
    assert out["claim"]["per_level"] == ["no", "no", "yes", UNDECIDED, "no"] and out["claim"]["verdict"] == "mixed"
    assert out["at"] == {"ce": ["s1", "s2", "s3", "s3", "s2"], "talr": ["t1", "t2", "t2", None, "t2"]}
    assert matched_gain({"ce": pts["ce"]})["claim"] is None  # claim needs both methods


def test_errors_name_the_field():
    with pytest.raises(ValueError, match=r"degradation\[1\] = nan"):
        frontier([1, 2], [0, float("nan")], [1])
    with pytest.raises(ValueError, match="2 points but degradation has 1"):
        frontier([1, 2], [0], [1])
    with pytest.raises(ValueError, match="method 'ce': 2 gains but 1 degradations"):
        matched_gain({"ce": ([1, 2], [0])})

"""The plateau criterion (sft.plateau): hand-valued cases, brute force, errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.plateau import Plateau


def brute(values, K, rel, ab):
    for i in range(K, len(values)):
        best = min(values[: i - K + 1])
        if best - min(values[i - K + 1: i + 1]) <= max(rel * abs(best), ab):
            return i
    return None


def test_hand_valued():
    steps = [0, 10, 20, 30, 40, 50, 60]
    v = [100.0, 50.0, 30.0, 29.9, 29.8, 29.85, 29.0]
    # K=2, 1%: at i=4 best before = min(100,50,30)=30, window min(29.9,29.8)=29.8: 0.2 <= 0.3 -> met at 40
    assert Plateau(patience=2, rel_tol=0.01).met_at(steps, v) == 40
    # K=3 at i=5: best before = 30, window min = 29.8: met at 50
    assert Plateau(patience=3, rel_tol=0.01).met_at(steps, v) == 50
    # with no tolerance any strict improvement continues: never met here (the last value improves)
    assert Plateau(patience=2, rel_tol=0.0).met_at(steps, v) is None
    # fewer than K + 1 evaluations: not met
    assert Plateau(patience=3).met_at([0, 1, 2], [3.0, 3.0, 3.0]) is None
    # getting worse is no improvement: met as soon as the window is full
    assert Plateau(patience=1, rel_tol=0.0).met_at([0, 5], [1.0, 2.0]) == 5


def test_absolute_tolerance_near_zero_bits():
    v = [4.0, 1.0, 0.1, 0.01, 0.001, 0.0001]
    assert Plateau(patience=1, rel_tol=0.5).met_at(range(6), v) is None  # each step gains 90%: never met
    # i=3: 0.1 - 0.01 = 0.09 > 0.05; i=4: 0.01 - 0.001 = 0.009 <= max(0.005, 0.05)
    assert Plateau(patience=1, rel_tol=0.5, abs_tol=0.05).met_at(range(6), v) == 4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=0, max_size=25), st.integers(1, 5),
       st.sampled_from([0.0, 0.01, 0.1]), st.sampled_from([0.0, 0.5]))
def test_equals_brute_force(v, K, rel, ab):
    steps = list(range(0, 10 * len(v), 10))
    i = brute(v, K, rel, ab)
    assert Plateau(K, rel, ab).met_at(steps, v) == (None if i is None else steps[i])


def test_describe_states_the_numbers():
    text = Plateau(patience=4, rel_tol=0.02, abs_tol=0.5).describe()
    assert "last 4 evaluations" in text and "2% of the best earlier value" in text and "0.5 bits" in text


def test_bad_input():
    with pytest.raises(ValueError, match="patience: 0 is outside"):
        Plateau(patience=0)
    with pytest.raises(ValueError, match="rel_tol"):
        Plateau(rel_tol=-0.1)
    with pytest.raises(ValueError, match="value at step 20 is nan"):
        Plateau().met_at([0, 10, 20], [1.0, 1.0, np.nan])
    with pytest.raises(ValueError, match="strictly increasing"):
        Plateau().met_at([0, 10, 10], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="2 steps but 3 values"):
        Plateau().met_at([0, 10], [1.0, 1.0, 1.0])

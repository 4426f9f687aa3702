"""Scores of the forecast study on hand-computed inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sft.forecast_metrics import (advisor_choice, advisor_scores, budgets_over, spearman,
                                                  spearman_within_lr, within_2x)


def test_spearman_is_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swap among 4: 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_within_lr_averages_per_rate():
    lr_index = [0, 0, 0, 1, 1, 1]
    forecast = [1, 2, 3, 3, 2, 1]
    measured = [1, 2, 3, 1, 2, 3]
    assert spearman_within_lr(lr_index, forecast, measured) == pytest.approx(0.0)  # (1 + -1) / 2
    assert spearman_within_lr(lr_index, forecast, forecast) == pytest.approx(1.0)


def test_within_2x_counts_ratio_band_and_sign():
    # ratios 1, 2 (edge, inside), 0.5 (edge), 5 (out), negative (out)
    assert within_2x([1, 2, 0.5, 5, -1], [1, 1, 1, 1, 1]) == pytest.approx(3 / 5)
    assert within_2x([-1.0], [-1.5]) == pytest.approx(1.0)  # same sign, ratio 2/3
    # |f - m| <= max / 2 is the ratio band; near zero (both within zero_tol) counts as within
    assert within_2x([0.004, -0.003, 0.02], [-0.002, 0.001, 0.001], zero_tol=0.01) == pytest.approx(2 / 3)
    assert within_2x([0.004, -0.003, 0.02], [-0.002, 0.001, 0.001]) == 0.0
    assert within_2x([float("nan"), 1.0], [1.0, 1.0]) == pytest.approx(0.5)


def test_advisor_picks_max_gain_feasible_config():
    dl = [0.1, 0.5, 2.0, 0.4]
    gain = [1.0, 3.0, 9.0, 3.0]
    assert advisor_choice(dl, gain, 1.0) == 3  # gains 3.0 tie -> smaller dl (0.4)
    assert advisor_choice(dl, gain, 2.0) == 2
    assert advisor_choice(dl, gain, 0.05) == -1
    assert advisor_choice(dl, [1.0, 3.0, 9.0, 2.99], 1.0) == 1  # no tolerance: 3.0 > 2.99
    assert advisor_choice(dl, [1.0, 3.0, 9.0, 2.99], 1.0, gain_tol=0.01) == 3  # 1% tie -> less degrading


def test_advisor_scores_hit_and_budget():
    # one method, three rates; forecast over-predicts dL by 1.5x
    method = np.array(["ce", "ce", "ce"])
    lr_index = np.array([0, 1, 2])
    ms_dl, ms_gain = np.array([1.0, 2.0, 4.0]), np.array([2.0, 5.0, 6.0])
    fc_dl, fc_gain = 1.5 * ms_dl, ms_gain
    out = advisor_scores(method, lr_index, fc_dl, fc_gain, ms_dl, ms_gain, [2.0, 4.0])
    # budget 2: best = index 1, choice = index 0 (1.5 <= 2 < 3): one step away -> hit
    # budget 4: best = index 2, choice = index 1 (3 <= 4 < 6): one step away -> hit
    assert out["advisor_hit_rate"] == 1.0
    assert [b["choice"] for b in out["budgets"]] == [0, 1]
    assert out["advisor_within_budget"] == 1.0
    far = advisor_scores(np.array(["ce"] * 3), lr_index, 100 * ms_dl, fc_gain, ms_dl, ms_gain, [4.0])
    assert far["budgets"][0]["choice"] == -1 and far["advisor_hit_rate"] == 0.0


def test_advisor_hit_by_outcome_across_methods():
    # best: ce@idx1 (gain 5); choice l2@idx0 with gain 4.5 >= ce's one-step-down gain 4.0 and feasible -> hit
    method = np.array(["ce", "ce", "l2", "l2"])
    lr_index = np.array([0, 1, 0, 1])
    ms_dl, ms_gain = np.array([0.5, 1.0, 0.6, 3.0]), np.array([4.0, 5.0, 4.5, 5.5])
    fc_dl, fc_gain = np.array([0.5, 9.0, 0.6, 9.0]), np.array([4.0, 5.0, 4.6, 5.5])
    out = advisor_scores(method, lr_index, fc_dl, fc_gain, ms_dl, ms_gain, [1.0])
    assert out["budgets"][0]["choice"] == 2 and out["budgets"][0]["best"] == 1
    assert out["advisor_hit_rate"] == 1.0
    assert out["budgets"][0]["gain_lost"] == pytest.approx(0.1) and out["advisor_gain_lost"] == pytest.approx(0.1)
    ms_gain2 = np.array([4.0, 5.0, 3.9, 5.5])  # now the choice gains less than one step down
    assert advisor_scores(method, lr_index, fc_dl, fc_gain, ms_dl, ms_gain2, [1.0])["advisor_hit_rate"] == 0.0


def test_advisor_near_tie_at_the_lowest_rate_is_a_miss_whose_gain_lost_is_small():
    """Gains flat in the rate (the best at the lowest rate gains more than one step up): no step's loss is defined,
    so a choice gaining 0.3 % less is a miss; its gain lost says 0.3 %. Nothing chosen: gain lost None."""
    method = np.array(["ce", "ce", "flow"])
    lr_index = np.array([0, 1, 0])
    ms_dl, ms_gain = np.array([0.01, 0.2, 0.01]), np.array([34.0, 33.8, 33.898])
    fc_dl, fc_gain = np.array([0.03, 0.2, 0.02]), np.array([24.7, 37.7, 24.6])
    out = advisor_scores(method, lr_index, fc_dl, fc_gain, ms_dl, ms_gain, [0.025])
    b = out["budgets"][0]
    assert (b["choice"], b["best"], b["hit"]) == (2, 0, False)
    assert b["gain_lost"] == pytest.approx(0.003) and out["advisor_gain_lost"] == pytest.approx(0.003)
    none = advisor_scores(method, lr_index, 100 * fc_dl, fc_gain, ms_dl, ms_gain, [0.025])
    assert none["budgets"][0]["gain_lost"] is None and none["advisor_gain_lost"] is None


def test_budgets_span_the_measured_range():
    b = budgets_over(np.r_[np.linspace(0.1, 10, 50), -1.0], 5)
    assert len(b) == 5 and np.all(np.diff(b) > 0) and b[0] > 0.1 and b[-1] < 10

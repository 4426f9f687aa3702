import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from theory.tilting import fit_effective_step, lambda_from_lr, log_softmax, schedule, smooth, tilt, tilt_log


def _rows(seed, n=5, K=4):
    rng = np.random.default_rng(seed)
    return log_softmax(rng.normal(size=(n, K))), log_softmax(2 * rng.normal(size=(n, K)))


def test_tilt_hand_value():
    # q = (1/2, 1/2), p = (1/4, 3/4), lam = 1/2: sqrt(q p) normalised = (1, sqrt 3)/(1 + sqrt 3)
    out = tilt(np.array([[0.5, 0.5]]), np.array([[0.25, 0.75]]), 0.5)
    assert np.allclose(out, np.array([[1, np.sqrt(3)]]) / (1 + np.sqrt(3)))


def test_boundary_cases_exact_also_with_zero_target():
    logq, logp = _rows(0)
    logp[0, 1] = -np.inf
    logp[2, 1] = -np.inf
    assert np.array_equal(tilt_log(logq, logp, 0.0), logq)
    assert np.array_equal(tilt_log(logq, logp, 1.0), logp)
    lam = np.array([0.0, 1.0, 0.3, 0.0, 1.0])
    out = tilt_log(logq, logp, lam)
    assert np.array_equal(out[0], logq[0]) and np.array_equal(out[1], logp[1])
    assert out[2, 1] == -np.inf and np.exp(out[2]).sum() == pytest.approx(1.0)
    assert np.all(np.isfinite(np.delete(out[2], 1)))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(0.0, 1.0), T=st.integers(1, 6))
def test_tilts_toward_a_fixed_target_compose(seed, lam, T):
    """T steps of lam toward a fixed p equal one step of 1 - (1 - lam)^T (geometric mixing)."""
    logq, logp = _rows(seed)
    cur = logq
    for _ in range(T):
        cur = tilt_log(cur, logp, lam)
    one = tilt_log(logq, logp, 1 - (1 - lam) ** T)
    assert np.allclose(cur, one, atol=1e-10)
    assert np.allclose(np.exp(cur).sum(1), 1.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(0.01, 0.99))
def test_tilting_moves_toward_target_in_kl(seed, lam):
    logq, logp = _rows(seed)
    out = tilt_log(logq, logp, lam)
    p = np.exp(logp)
    kl_before = (p * (logp - logq)).sum(1)
    kl_after = (p * (logp - out)).sum(1)
    assert np.all(kl_after <= kl_before + 1e-12)


def test_smooth():
    p = np.array([[1.0, 0.0, 0.0]])
    assert np.allclose(smooth(p, 0.3), [[0.8, 0.1, 0.1]])
    rho = np.array([[0.2, 0.3, 0.5]])
    assert np.allclose(smooth(p, 0.5, rho), [[0.6, 0.15, 0.25]])
    with pytest.raises(ValueError, match="alpha"):
        smooth(p, 1.0)
    with pytest.raises(ValueError, match="strictly positive"):
        smooth(p, 0.1, np.array([[0.0, 0.5, 0.5]]))


def test_schedules():
    assert np.allclose(schedule("constant", 3, 0.2), 0.2)
    assert np.allclose(schedule("inverse", 4, 0.2), 0.05)
    c = schedule("cosine", 5, 1.0, warmup=1)
    assert c[0] == pytest.approx(1.0) and c[1] == pytest.approx(1.0) and c[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 3 / 4)))
    lin = schedule("linear", 5, 1.0, warmup=2, lam_min=0.2)
    assert np.allclose(lin, [0.5, 1.0, 1.0, 1.0 - 0.8 / 3, 1.0 - 1.6 / 3])
    assert np.allclose(lambda_from_lr(np.array([1e-5, 2e-5]), 1e3), [0.01, 0.02])
    with pytest.raises(ValueError):
        schedule("step", 3, 0.1)
    with pytest.raises(ValueError):
        schedule("cosine", 3, 0.1, warmup=3)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(-0.5, 0.5))
def test_effective_step_recovers_an_exact_tilt(seed, lam):
    logq, logp = _rows(seed)
    fit = fit_effective_step(logq, tilt_log(logq, logp, lam), logp)
    assert np.allclose(fit.lam, lam, atol=1e-9)
    assert np.all(fit.residual < 1e-9)
    assert fit.lam_pooled == pytest.approx(lam, abs=1e-9)


def test_effective_step_orthogonal_update_has_zero_lambda():
    # q uniform on 3 outcomes, r_c = (1, -1, 0); a shift along (1, 1, -2) is q-orthogonal
    logq = np.log(np.full((1, 3), 1 / 3))
    logp = logq + np.array([[1.0, -1.0, 0.0]])
    logp = log_softmax(logp)
    logq1 = log_softmax(logq + 0.01 * np.array([[1.0, 1.0, -2.0]]))
    fit = fit_effective_step(logq, logq1, logp)
    assert abs(fit.lam[0]) < 1e-12
    assert fit.misalignment[0] == pytest.approx(1.0)
    assert fit.eps[0] > 0


def test_effective_step_needs_finite_target():
    logq, logp = _rows(1)
    logp[0, 0] = -np.inf
    with pytest.raises(ValueError, match="finite"):
        fit_effective_step(logq, logq, logp)

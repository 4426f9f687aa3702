import numpy as np
import pytest

from theory.estimate import (
    admissible_C, estimate_constants, first_order_coefficient, hard_set, kl_model_target,
    one_step_delta, same_topology, smoothed_target,
)
from theory.simulate import make_world
from theory.tree import TokenTree


@pytest.fixture(scope="module")
def world():
    return make_world(V=2, depth=3, n_hard=2, q_noise=0.3, seed=3)


def test_first_order_coefficient_is_the_derivative(world):
    logp = smoothed_target(world.p2, 0.1)
    h = 1e-6
    fd = (one_step_delta(world.p1, world.logq0, logp, [h])[0] - one_step_delta(world.p1, world.logq0, logp, [-h])[0]) / (2 * h)
    assert first_order_coefficient(world.p1, world.logq0, logp) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_admissible_C_is_admissible_and_smallest(world):
    logp = smoothed_target(world.p2, 0.1)
    d = first_order_coefficient(world.p1, world.logq0, logp)
    lin = d  # tight linear term: C must absorb the whole convex remainder
    C = admissible_C(world.p1, world.logq0, logp, lin, 0.5, n_grid=60)
    lams = np.linspace(1e-3, 0.5, 50)
    dl = one_step_delta(world.p1, world.logq0, logp, lams)
    assert np.all(dl <= lams * lin + C * lams**2 + 1e-10)
    assert C > 0
    assert np.any(dl > lams * lin + 0.9 * C * lams**2)  # 0.9 C is not enough somewhere
    assert admissible_C(world.p1, world.logq0, logp, d - 1e-3, 0.5) == np.inf


def test_estimate_constants_sane(world):
    e = estimate_constants(world.p1, world.p2, world.logq0, alpha=0.1, threshold=0.1)
    c = e.constants
    assert 0 <= c.w_S <= e.w_S_max <= 1
    assert c.M_h >= 0 and c.M_l >= 0
    assert 0 <= c.s <= c.m <= 3 + 1e-9  # at most depth coded symbols per example
    assert c.mu_T == pytest.approx(kl_model_target(world.tree, world.logq0, smoothed_target(world.p2, 0.1)))
    assert c.H_T == pytest.approx(np.sqrt(e.chi2_P1_Q))
    assert np.isfinite(c.C1) and np.isfinite(c.C2)
    assert e.d1 <= e.lin1 and e.d2 <= e.lin2


def test_hard_set_and_topology_errors(world):
    logq = np.log(np.array([[0.05, 0.9, 0.05]]))
    assert hard_set(logq, 0.1).tolist() == [[True, False, True]]
    other = TokenTree.from_sequences([[0, 1]], max_depth=3)
    with pytest.raises(ValueError, match="topology"):
        estimate_constants(world.p1, other, world.logq0)
    with pytest.raises(ValueError, match="shape"):
        estimate_constants(world.p1, world.p2, world.logq0[:, :2])

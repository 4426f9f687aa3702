"""Constants of Appendix E estimated from (P1 tree, P2 tree, model conditionals).

Both trees must share one topology (build them on ``TokenTree.union`` + ``with_masses``,
or as complete trees from one ``from_distribution``); the model is given as dense
natural-log conditionals ``logq [N, V + 1]`` on that topology. The target is the smoothed
empirical D2 conditional ``p~2 = (1 - alpha) p^2 + alpha rho`` (Assumption B.1).

Sequence-level quantities (``Var_Q(f)``, ``KL(Q || P~2)``) are exact on a tree holding
Q's whole support (a complete tree); elsewhere ``KL(Q || P~2)`` is the chain-rule sum over
the tree's prefixes, a lower bound (conservative for ``mu_T``), and ``Var_Q`` is NaN.

Exact one-step facts used below (per-prefix tilting ``q_lam(.|u) ~ q^{1-lam} p~^lam``):

* ``KL(P || Q_lam) = sum_u P(u) KL(p(.|u) || q_lam(.|u))`` (chain rule),
* ``d/dlam KL(P || Q_lam)|_0 = -sum_u P(u) (E_{p(.|u)} f_u - E_{q(.|u)} f_u)``,
* ``d^2/dlam^2 KL(P || Q_lam) = sum_u P(u) Var_{q_lam(.|u)}(f_u) >= 0``.

So an admissible ``C1`` (``Delta L(P1) <= lam * lin + C1 lam^2`` on ``[0, lam0]``) is
finite iff the exact derivative is ``<= lin``; :func:`admissible_C` returns ``inf`` when
it is not (the paper's first-order term is then wrong, not just loose).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .bounds import Constants
from .divergence import TreeLogProbs, chi2, kl, leaf_log_prob, path_log_prob, var_q
from .tilting import smooth, tilt_log
from .tree import TokenTree

__all__ = [
    "same_topology",
    "active_nodes",
    "smoothed_target",
    "hard_set",
    "one_step_delta",
    "first_order_coefficient",
    "kl_model_target",
    "sequence_var_f",
    "admissible_C",
    "Estimate",
    "estimate_constants",
]


def same_topology(a: TokenTree, b: TokenTree) -> None:
    """Raise unless ``a`` and ``b`` have the same nodes (same parent and token arrays)."""
    if a.n_nodes != b.n_nodes or not (
        np.array_equal(a.parent, b.parent) and np.array_equal(a.token, b.token)
    ):
        raise ValueError(
            f"P1 ({a.n_nodes} nodes) and P2 ({b.n_nodes} nodes) must share one topology: "
            "build both on TokenTree.union(...) and with_masses(...)"
        )


def active_nodes(tree: TokenTree) -> np.ndarray:
    """Nodes whose conditional is coded (not at the forced-end depth)."""
    return ~tree.forced_end()


def _check_logq(tree: TokenTree, logq: np.ndarray) -> np.ndarray:
    logq = np.asarray(logq, dtype=np.float64)
    if logq.shape != (tree.n_nodes, tree.vocab_size + 1):
        raise ValueError(f"logq has shape {logq.shape}, expected ({tree.n_nodes}, {tree.vocab_size + 1})")
    act = active_nodes(tree)
    if not np.all(np.isfinite(logq[act])):
        raise ValueError("model log-conditionals must be finite (full support)")
    return logq


def smoothed_target(p2: TokenTree, alpha: float, logq: np.ndarray | None = None) -> np.ndarray:
    """``log p~2`` ``[N, V + 1]``: ``smooth(p^2, alpha, rho)``, rho = ``exp(logq)`` if given
    else uniform (Assumption B.1). Rows of forced-end nodes are copied from the target."""
    rho = None
    if logq is not None:
        rho = np.exp(logq)
        rho[p2.forced_end()] = 1.0 / rho.shape[1]  # forced-end rows are never coded
    with np.errstate(divide="ignore"):
        return np.log(smooth(p2.cond_full(), alpha, rho))


def hard_set(logq: np.ndarray, threshold: float) -> np.ndarray:
    """Hard tokens S: ``q(a|u) < threshold`` (Assumption B.4, Theorem 3.2), mask ``[N, K]``."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return np.exp(logq) < threshold


def _full_lp(tree: TokenTree, logx: np.ndarray) -> TreeLogProbs:
    return TreeLogProbs.from_full(tree, np.minimum(logx, 0.0))


def one_step_delta(P: TokenTree, logq: np.ndarray, logp: np.ndarray, lams) -> np.ndarray:
    """Exact ``Delta L(P) = KL(P||Q_lam) - KL(P||Q)`` (nats) for each ``lam`` (one step)."""
    base = kl(P, _full_lp(P, logq), unit="nats")
    out = [kl(P, _full_lp(P, tilt_log(logq, logp, lam)), unit="nats") - base for lam in np.atleast_1d(lams)]
    return np.asarray(out)


def first_order_coefficient(P: TokenTree, logq: np.ndarray, logp: np.ndarray) -> float:
    """Exact ``d/dlam Delta L(P)`` at 0 for per-prefix tilting: ``-sum_u P(u)(E_p f - E_q f)``."""
    act = active_nodes(P)
    lq, lp = logq[act], logp[act]
    q, p = np.exp(lq), P.cond_full()[act]
    if np.any(~np.isfinite(lp) & (p > 0)):
        return float("-inf")  # P puts mass where the target has none: tilting pulls hard
    with np.errstate(invalid="ignore"):
        f = np.where(np.isfinite(lp), lp - lq, 0.0)
    per = (p * f).sum(1) - (q * f).sum(1)
    return float(-(P.mass[act] * per).sum())


def kl_model_target(tree: TokenTree, logq: np.ndarray, logp: np.ndarray) -> float:
    """``KL(Q || P~)`` by the chain rule over the tree's prefixes (nats); exact on a
    complete tree, a lower bound otherwise."""
    act = active_nodes(tree)
    qpre = np.exp(path_log_prob(tree, _full_lp(tree, logq)))
    q = np.exp(logq)
    with np.errstate(invalid="ignore"):
        per = (q * (logq - logp)).sum(1)
    return float((qpre[act] * per[act]).sum())


def sequence_var_f(tree: TokenTree, logq: np.ndarray, logp: np.ndarray) -> float:
    """``Var_Q(f)`` with ``f(z) = log P~(z) - log Q(z)`` at sequence level (NaN if the
    tree does not hold Q's support)."""
    lq = _full_lp(tree, logq)
    F = leaf_log_prob(tree, _full_lp(tree, logp)) - leaf_log_prob(tree, lq)
    try:
        return var_q(tree, lq, F)
    except ValueError:
        return float("nan")


def admissible_C(
    P: TokenTree,
    logq: np.ndarray,
    logp: np.ndarray,
    lin: float,
    lam0: float,
    n_grid: int = 40,
) -> float:
    """Smallest ``C >= 0`` with ``Delta L(P)(lam) <= lam * lin + C lam^2`` for lam in (0, lam0].

    ``inf`` when the exact first-order coefficient exceeds ``lin`` (no finite C exists);
    otherwise the max over a geometric grid of ``(Delta L - lam lin) / lam^2``.
    """
    d = first_order_coefficient(P, logq, logp)
    if d > lin + 1e-12 * max(1.0, abs(lin)):
        return float("inf")
    lams = lam0 * np.geomspace(1e-3, 1.0, n_grid)
    dl = one_step_delta(P, logq, logp, lams)
    return float(max(0.0, np.max((dl - lams * lin) / lams**2)))


@dataclass
class Estimate:
    """Constants of Appendix E at one model (nats), plus the diagnostics behind them."""

    constants: Constants
    w_S_max: float
    kl_P1_Q: float
    kl_P2_Q: float
    kl_P2_P2t: float
    chi2_P1_Q: float
    var_f: float
    lin1: float
    lin2: float
    d1: float
    d2: float

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "constants"}
        out.update(self.constants.to_dict())
        return out


def estimate_constants(
    p1: TokenTree,
    p2: TokenTree,
    logq: np.ndarray,
    *,
    alpha: float = 0.1,
    rho: str = "uniform",
    threshold: float = 0.1,
    lam0: float = 0.5,
    eps_fg: float = float("nan"),
    beta: float = 0.0,
    gamma: float = 0.0,
) -> Estimate:
    """Estimate every constant of Appendix E at the model ``logq``.

    * S = ``{(u, a): q(a|u) < threshold}`` at D2 prefixes (``P2(u) > 0``, not forced).
    * ``M_h = max_S |f|``, ``M_l = max_{S^c} |f|`` with ``f = log p~2 - log q``.
    * ``w_S`` = q-mass of S averaged over the D2-prefix distribution (``w_S_max``: sup_u).
    * ``s`` = expected hard tokens per D2 example, ``m`` = expected coded symbols per example.
    * ``H_T = sqrt(chi2(P1||Q))``, ``mu_T = KL(Q||P~2)`` (one model: T = 1 trajectory).
    * ``C1``, ``C2``: :func:`admissible_C` with the linear terms of Theorem E.2:
      ``lin1 = sqrt(Var_Q f) sqrt(chi2(P1||Q))`` (sparse form if Var_Q is unavailable),
      ``lin2 = -(KL(Q||P~2) - KL(P2||P~2))``.
    ``beta``/``gamma`` (Assumption B.5) are properties of a parametrisation and are passed in.
    """
    same_topology(p1, p2)
    logq = _check_logq(p1, logq)
    if rho not in ("uniform", "model"):
        raise ValueError(f"rho must be 'uniform' or 'model', got {rho!r}")
    logp = smoothed_target(p2, alpha, logq if rho == "model" else None)
    act = active_nodes(p2) & (p2.mass > 0)
    if not act.any():
        raise ValueError("P2 has no coded prefix (all mass at forced ends)")
    q = np.exp(logq)
    S = hard_set(logq, threshold)
    f = np.abs(logp - logq)
    f = np.where(np.isfinite(f), f, np.inf)
    Sa, Sc = S[act], ~S[act]
    M_h = float(f[act][Sa].max()) if Sa.any() else 0.0
    M_l = float(f[act][Sc].max()) if Sc.any() else 0.0
    wu = (q * S).sum(1)
    pw = p2.mass[act] / p2.mass[act].sum()
    w_S = float(np.clip((pw * wu[act]).sum(), 0.0, 1.0))
    # s and m: every coded symbol of a D2 response is the edge into a child or an EOS leaf
    p2c = p2.cond_full()
    s = float((p2.mass[act, None] * p2c[act] * S[act]).sum())
    m = float(p2.mass[act].sum())
    lq = _full_lp(p1, logq)
    kl1 = kl(p1, lq, unit="nats")
    klQ2 = kl_model_target(p2, logq, logp)
    kl22 = kl(p2, _full_lp(p2, logp), unit="nats")
    c2 = max(chi2(p1, lq), 0.0)
    var_f = sequence_var_f(p1, logq, logp)
    sqrt_var = np.sqrt(var_f) if np.isfinite(var_f) else (
        np.sqrt(w_S) * M_h + M_l + (beta + gamma) * M_h
    )
    lin1 = float(sqrt_var * np.sqrt(c2))
    lin2 = float(-(klQ2 - kl22))
    C1 = admissible_C(p1, logq, logp, lin1, lam0)
    C2 = admissible_C(p2, logq, logp, lin2, lam0)
    consts = Constants(
        M_h=M_h, M_l=M_l, w_S=w_S, beta=beta, gamma=gamma, H_T=float(np.sqrt(c2)),
        mu_T=klQ2, C1=C1, C2=C2, s=min(s, m), m=max(m, 1.0), eps_fg=eps_fg,
    )
    return Estimate(
        constants=consts,
        w_S_max=float(wu[act].max()),
        kl_P1_Q=kl1,
        kl_P2_Q=kl(p2, lq, unit="nats"),
        kl_P2_P2t=kl22,
        chi2_P1_Q=c2,
        var_f=var_f,
        lin1=lin1,
        lin2=lin2,
        d1=first_order_coefficient(p1, logq, logp),
        d2=first_order_coefficient(p2, logq, logp),
    )

"""Claims ledger: every numbered statement of the paper checked on random exact instances.

Each check returns a :class:`Claim` with a verdict:

* ``holds`` -- no violation on any instance (tightness = bound / actual reported);
* ``holds (loose)`` -- valid, but the quantile table shows a large slack;
* ``holds only asymptotically`` -- true in a limit (T -> oo, eps -> 0, ...) only;
* ``fails`` -- a violation was found; ``counterexample`` is the smallest one found
  (fewest nodes / smallest parameters), with the numbers.

Instances are exact worlds on complete trees (all divergences exact sums, natural logs):
batches of them as arrays (:mod:`theory.batched`, >= 1000 per check, vectorised) and, for the
simulation checks, :func:`theory.simulate.make_world` / ``make_softmax_world``. Each paper
statement is followed by its corrected statement(s) (:mod:`theory.claims_corrected`). ``run_ledger(n)`` runs every check with ``n``
random instances per check (the verdicts are pinned by ``tests/theory/test_claims.py``).
"""
from __future__ import annotations

import numpy as np

from . import bounds as B
from . import batched as Bt
from .claim import Claim, power, power_identity, quantiles
from .corrected import lemma_e1_corrected
from .simulate import SoftmaxConfig, equal_gain_degradation, make_softmax_world, make_world, run_softmax, run_tabular

__all__ = ["Claim", "CHECKS", "run_ledger", "format_ledger", "random_world", "b1_slope", "quantiles"]


_q = quantiles


def random_world(rng: np.random.Generator, depth: int | None = None, V: int | None = None):
    """A random exact world; small (N <= 40 nodes) so hundreds fit in seconds."""
    depth = int(rng.integers(1, 4)) if depth is None else depth
    V = int(rng.integers(1, 4 if depth < 3 else 3)) if V is None else V
    return make_world(
        V=V, depth=depth, n_hard=int(rng.integers(0, depth + 1)),
        hard_mass=float(rng.uniform(0.5, 0.95)), eos_prob=float(rng.uniform(0.01, 0.3)),
        q_noise=float(rng.uniform(0.0, 1.0)), concentration=float(rng.uniform(0.3, 3.0)),
        seed=rng,
    )


def _cat(parts) -> np.ndarray:
    return np.concatenate([np.ravel(p) for p in parts]) if parts else np.zeros(0)


def _sizes_first(items):
    return sorted(items, key=lambda d: (d["n_nodes"], -d.get("gap", 0.0)))


def _rel_tol(*xs) -> np.ndarray:
    """``1e-9`` relative to the largest magnitude of the terms (identities of sums of O(1,500) nats)."""
    return 1e-9 * np.maximum(1.0, np.max([np.abs(x) for x in xs], axis=0))


def _tilt_target(rng, bw):
    """A smoothed (alpha 0.1) or oracle (alpha 0) target and a tilt of weight up to 1 (the domain's edge)."""
    Bn = bw.logq0.shape[0]
    logp = Bt.smoothed_b(bw.tree, bw.logp2, rng.choice([0.0, 0.1], Bn))
    return logp, rng.uniform(0.0, 1.0, Bn)


# --------------------------------------------------------------------- checks
def check_prop_3_1(n: int, rng) -> Claim:
    """Per-level (leaf) form vs chain-rule KL difference on ``n`` batched worlds."""
    lhs, rhs, tol, n_hard = [], [], [], 0
    for hard, bw in Bt.mixed_batches(rng, n):
        t = bw.tree
        logp, lam = _tilt_target(rng, bw)
        q2 = Bt.tilt_b(t, bw.logq0, logp, lam)
        logp1 = Bt.p1_pushed(rng, bw, hard, logp)
        P = np.exp(Bt.leaf_log_prob_b(t, logp1))
        with np.errstate(invalid="ignore"):
            lz = np.where(P > 0, Bt.leaf_log_prob_b(t, bw.logq0) - Bt.leaf_log_prob_b(t, q2), 0.0)
        k2, k0 = Bt.chain_kl(t, logp1, q2), Bt.chain_kl(t, logp1, bw.logq0)
        lhs.append((P * lz).sum(-1))
        rhs.append(k2 - k0)
        tol.append(_rel_tol(k2, k0))
        n_hard += hard * bw.logq0.shape[0]
    lhs, rhs, tol = _cat(lhs), _cat(rhs), _cat(tol)
    errs = np.abs(lhs - rhs)
    bad = int((errs > tol).sum())
    return Claim("Proposition 3.1", "Delta L(P) per level = KL(P||q2) - KL(P||q1)",
                 "holds" if not bad else "fails", n, bad,
                 note=(f"max |difference| = {errs.max():.2e} nats (tolerance 1e-9 relative to the KLs); {Bt.HARD_NOTE}; "
                       "q2 = tilt toward the oracle or smoothed target, lam uniform in [0, 1]. Power: of the identity "
                       "made 1% / 10% wrong."),
                 power=power_identity(lhs, rhs, tol), n_hard=n_hard)


def check_lemma_e1(n: int, rng) -> Claim:
    """Lemma E.1 with sequence-level f = log p~2(z) - log q(z) and per-prefix tilting."""
    found, gaps1, n_deep, n_hard, ex, pa, tl = [], [], 0, 0, [], [], []
    for hard, bw in Bt.mixed_batches(rng, n):
        t = bw.tree
        logp = Bt.smoothed_b(t, bw.logp2, 0.1)
        logp1 = Bt.p1_pushed(rng, bw, hard, logp)
        F = Bt.leaf_log_prob_b(t, logp) - Bt.leaf_log_prob_b(t, bw.logq0)
        EP, EQ, _ = Bt.seq_moments(t, logp1, bw.logq0, F)
        paper = -(EP - EQ)
        exact = lemma_e1_corrected(Bt.node_weights(t, logp1), np.exp(logp1), bw.logq0, logp, 0.0).first_order
        gap = np.abs(exact - paper)
        tol = 1e-8 * np.maximum(1.0, np.abs(exact))
        ex.append(exact), pa.append(paper), tl.append(tol)
        n_hard += hard * gap.size
        if t.max_depth == 1:
            gaps1.append(gap)
            continue
        n_deep += gap.size
        for i in np.flatnonzero(gap > tol):
            found.append({"n_nodes": t.n_nodes, "V": t.vocab_size, "depth": int(t.max_depth),
                          "exact_derivative": float(exact[i]), "paper_derivative": float(paper[i]),
                          "gap": float(gap[i]), "hard_family": bool(hard)})
    g1 = float(np.concatenate(gaps1).max()) if gaps1 else 0.0
    ce = _sizes_first(found)[0] if found else None
    n_found_hard = sum(f["hard_family"] for f in found)
    return Claim(
        "Lemma E.1",
        "d/dlam KL(P||Q_lam)|0 = -(E_P f - E_Q f), remainder lam^2/2 Var_Q(f) + O(lam^3)",
        "fails" if found else "holds", n, len(found), ce,
        note=(f"depth 1 (one prefix): exact, max gap {g1:.1e}. Depth >= 2 with per-prefix tilting "
              "(Def. B.3): the true first-order term is -sum_u P(u)(E_p(.|u) f_u - E_q(.|u) f_u); E_Q f "
              f"weights prefixes by Q, not P, so the lemma's coefficient is wrong on {len(found)}/{n_deep} "
              f"deeper trees ({n_found_hard} of them in the hard family: {Bt.HARD_NOTE}; exact for sequence-level "
              "geometric interpolation only). Power: of the derivative identity made 1% / 10% wrong."),
        power=power_identity(_cat(ex), _cat(pa), _cat(tl)), n_hard=n_hard,
    )


def _lemma_e2_instance(rng, q, edge: bool):
    """``f`` on ``q``'s outcomes, S = the larger half of ``|f|``; ``edge``: ``|f| = M_h`` on S and ``M_l`` off S
    (random signs), where ``E_q f^2`` equals the bound (the chain's second inequality is attained)."""
    K = q.size
    f = rng.normal(0, 1, K) * rng.choice([0.2, 3.0], K)
    S = np.abs(f) > np.median(np.abs(f))
    Mh = np.abs(f[S]).max() if S.any() else 0.0
    Ml = np.abs(f[~S]).max() if (~S).any() else 0.0
    if edge:
        f = np.where(S, Mh, Ml) * np.sign(f)
    return f, S, Mh, Ml


def check_lemma_e2(n: int, rng) -> Claim:
    tight, viol, second, bounds = [], [], [], []
    hard = Bt.hard_rows(rng, n // 2)
    for i in range(n):
        if i < n - n // 2:
            q = rng.dirichlet(np.ones(int(rng.integers(2, 8))))
        else:
            lq = hard[i - (n - n // 2)]
            q = np.exp(lq[np.isfinite(lq)])  # the row's outcomes (log q down to -1,500: q = 0 in float64)
        K = q.size
        f, S, Mh, Ml = _lemma_e2_instance(rng, q, edge=bool(i % 2))
        w = q[S].sum()
        var = q @ (f - q @ f) ** 2
        bound = B.lemma_e2_second_moment_bound(w, Mh, Ml)
        tight.append(bound / max(var, 1e-300))
        second.append(q @ f**2)
        bounds.append(bound)
        if not (var <= q @ f**2 + 1e-12 <= bound + 2e-12):
            viol.append({"K": K})
        # leakage step, read as a bound on the realised shift of Assumption B.5:
        # Delta = (1 + gamma) Pi_S f on S (allowed: ||Pi_S(Delta - g)|| = gamma ||g||)
        # plus leakage of norm (beta + gamma) ||Pi_S f|| on S^c.
    # smallest analytic counterexample of the leakage step (K = 2, f supported on S)
    gamma, beta, wS, Mh = 0.1, 0.0, 0.5, 1.0
    g_norm2 = wS * Mh**2
    realised = (1 + gamma) ** 2 * g_norm2 + (beta + gamma) ** 2 * g_norm2
    eff = float(B.lemma_e2_variance_bound(wS, Mh, 0.0, beta, gamma))
    return Claim(
        "Lemma E.2",
        "Var_Q f <= E_Q f^2 <= w_S M_h^2 + (1-w_S) M_l^2; with leakage <= w_S M_h^2 + (M_l+(beta+gamma)M_h)^2",
        "fails" if viol else "holds (leakage step is a non sequitur)", n, len(viol),
        {"K": 2, "q": [0.5, 0.5], "f": [1.0, 0.0], "S": [True, False], "beta": beta, "gamma": gamma,
         "realised_shift_second_moment": realised, "effective_bound": eff},
        _q(tight),
        note=(f"q: half Dirichlet (K = 2..7), half single rows of the hard family's model (rows 1 - 1e-12, log q "
              "down to -1,500); every other instance at the chain's edge (|f| = M_h on S, M_l off S, where "
              "E_Q f^2 = the bound); power: of E_Q f^2 <= bound made 1% / 10% stronger. "
              "The first chain holds on every instance. The leakage vector l = Pi_Sc Delta log q is "
              "not part of f, so 'E_Q[f^2] = ||f_S||^2 + ||f_Sc + l||^2' is unjustified; the stated "
              "bound on Var_Q(f) still holds only because it adds a non-negative term. Read as a bound "
              "on the realised log-shift allowed by Assumption B.5 it fails: counterexample has "
              f"second moment {realised:.4f} > bound {eff:.4f} (the S-part may grow by (1+gamma))."),
        power=power(second, bounds), n_hard=n // 2,
    )


def check_lemma_e3(n: int, rng) -> Claim:
    lhs, rhs, tol, n_hard = [], [], [], 0
    for hard, bw in Bt.mixed_batches(rng, n):
        t = bw.tree
        logp = Bt.smoothed_b(t, bw.logp2, 0.2)
        logp1 = Bt.p1_pushed(rng, bw, hard, logp)
        F = Bt.leaf_log_prob_b(t, logp) - Bt.leaf_log_prob_b(t, bw.logq0)
        EP, EQ, _ = Bt.seq_moments(t, logp1, bw.logq0, F)
        kls = (Bt.chain_kl(t, logp1, bw.logq0), Bt.chain_kl(t, bw.logq0, logp), Bt.chain_kl(t, logp1, logp))
        lhs.append(EP - EQ)
        rhs.append(B.lemma_e3_rhs(*kls))
        tol.append(10 * _rel_tol(EP, EQ, *kls))
        n_hard += hard * bw.logq0.shape[0]
    lhs, rhs, tol = _cat(lhs), _cat(rhs), _cat(tol)
    errs = np.abs(lhs - rhs)
    bad = int((errs > tol).sum())
    return Claim("Lemma E.3", "E_P f - E_Q f = KL(P||Q) + KL(Q||P~2) - KL(P||P~2)",
                 "holds" if not bad else "fails", n, bad,
                 note=(f"max |lhs - rhs| = {errs.max():.2e} (tolerance 1e-8 relative to the terms); {Bt.HARD_NOTE}. "
                       "Power: of the identity made 1% / 10% wrong."),
                 power=power_identity(lhs, rhs, tol), n_hard=n_hard)


def b1_slope(V: int = 3, seed: int = 0, n_lr: int = 10) -> dict:
    """Theorem B.1 (= E.1) in the softmax world: one SGD step per learning rate, log-log slope of
    the residual (per-node lam_{t,u}) against eps = KL(q_t||q_{t+1})."""
    sw = make_softmax_world(V=V, seed=seed)
    res, eps, mis = [], [], []
    for lr in np.geomspace(1e-3, 1.0, n_lr):
        r = run_softmax(sw, SoftmaxConfig(steps=1, lr=float(lr)))[0]
        res.append(r["residual"]), eps.append(r["eps"]), mis.append(r["misalignment"])
    res, eps = np.asarray(res), np.asarray(eps)
    pos = res > 0
    slope = float(np.polyfit(np.log(eps[pos]), np.log(res[pos]), 1)[0]) if pos.sum() > 2 else float("nan")
    return {"V": V, "slope": slope, "eps_min": float(eps.min()), "eps_max": float(eps.max()),
            "decades": float(np.log10(eps.max() / eps.min())), "residual_max": float(res.max()),
            "misalignment": float(np.median(mis)), "residual_over_sqrt_eps": float(np.median(res / np.sqrt(eps)))}


def check_theorem_e1(n: int, rng) -> Claim:
    runs = [b1_slope(V=3, seed=int(rng.integers(1 << 30))) for _ in range(max(1, min(n // 50, 10)))]
    binary = b1_slope(V=1, seed=0)
    slopes = [r["slope"] for r in runs]
    ce = runs[int(np.argmin(slopes))]
    return Claim(
        "Theorem B.1 (= E.1)",
        "||log q_{t+1} - tilt(lam_{t,u})||_{t,u} = O(eps), eps = KL(q_t||q_{t+1})",
        "fails" if min(slopes) < 0.9 else "holds", len(runs), sum(s < 0.9 for s in slopes), ce,
        note=(f"Softmax world, shared parameters, SGD: log-log slope {np.median(slopes):.3f} over "
              f"{ce['decades']:.1f} decades of eps, i.e. residual = O(sqrt(eps)); the true shift is "
              f"misaligned with the tilting direction (median sine {ce['misalignment']:.2f}, not O(sqrt eps)). "
              "Step 5 assumes 's = alpha r_c + O(eps)' without proof. With K = 2 outcomes (V = 1) every "
              f"update is a tilt and the residual is {binary['residual_max']:.1e} (exact). Power: not defined (a "
              "log-log slope of an O(eps) statement: a rate, which a 1% / 10% stronger constant does not move); "
              "hard family: not applicable (SGD runs of the softmax world, whose rows stay far from 1 - 1e-12 and "
              "log q -1,500); the corrected entry checks single hard-family rows."),
    )


def _admissible_C_b(t, logP, logq, logp, lin, lam0, n_grid=40):
    """Batched :func:`theory.estimate.admissible_C` (``inf`` where the exact derivative > lin)."""
    d = lemma_e1_corrected(Bt.node_weights(t, logP), np.exp(logP), logq, logp, 0.0).first_order
    base = Bt.chain_kl(t, logP, logq)
    C = np.zeros_like(base)
    for lam in lam0 * np.geomspace(1e-3, 1.0, n_grid):
        dl = Bt.chain_kl(t, logP, Bt.tilt_b(t, logq, logp, lam)) - base
        with np.errstate(over="ignore", invalid="ignore"):  # lin = +inf (chi2 beyond float64): C = 0 there
            C = np.maximum(C, np.where(np.isfinite(lin), (dl - lam * lin) / lam**2, 0.0))
    return np.where(d > lin + 1e-12 * np.maximum(1.0, np.abs(lin)), np.inf, C)


def check_theorem_e2(n: int, rng) -> Claim:
    viol, tight1, ratioC, n_hard, margins = [], [], [], 0, []
    from .claims_corrected import _oracle_batches

    for hard, bw in _oracle_batches(rng, n):
        t = bw.tree
        alpha = rng.uniform(0.02, 0.5, size=bw.logq0.shape[0])
        logp = Bt.smoothed_b(t, bw.logp2, alpha)
        logp1 = Bt.p1_pushed(rng, bw, hard, logp)
        n_hard += hard * alpha.size
        F = Bt.leaf_log_prob_b(t, logp) - Bt.leaf_log_prob_b(t, bw.logq0)
        _, _, var_f = Bt.seq_moments(t, logp1, bw.logq0, F)
        lin1 = Bt.seq_cauchy_schwarz(t, logp1, bw.logq0, F)  # in log space: Q(z) may underflow
        lin2 = -(Bt.chain_kl(t, bw.logq0, logp) - Bt.chain_kl(t, bw.logp2, logp))
        C1 = _admissible_C_b(t, logp1, bw.logq0, logp, lin1, 1.0)
        C2 = _admissible_C_b(t, bw.logp2, bw.logq0, logp, lin2, 1.0)
        d1 = lemma_e1_corrected(Bt.node_weights(t, logp1), np.exp(logp1), bw.logq0, logp, 0.0).first_order
        d2 = lemma_e1_corrected(Bt.node_weights(t, bw.logp2), np.exp(bw.logp2), bw.logq0, logp, 0.0).first_order
        for i in np.flatnonzero(~(np.isfinite(C1) & np.isfinite(C2))):
            viol.append({"n_nodes": t.n_nodes, "V": t.vocab_size, "depth": int(t.max_depth), "C1": float(C1[i]),
                         "C2": float(C2[i]), "exact_d1": float(d1[i]), "paper_lin1": float(lin1[i]),
                         "exact_d2": float(d2[i]), "paper_lin2": float(lin2[i]),
                         "gap": float(max(d1[i] - lin1[i], d2[i] - lin2[i])), "hard_family": bool(hard)})
        # power: the smallest relative cut of the first-order terms at which some exact derivative exceeds one
        with np.errstate(invalid="ignore", divide="ignore"):
            margins.append(np.minimum(*((lin - d) / np.abs(lin) for d, lin in ((d1, lin1), (d2, lin2)))))
        dl = Bt.chain_kl(t, logp1, Bt.tilt_b(t, bw.logq0, logp, 0.3)) - Bt.chain_kl(t, logp1, bw.logq0)
        ok = (dl > 1e-9) & np.isfinite(C1)
        tight1.append((0.3 * lin1 + C1 * 0.09)[ok] / dl[ok])
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            ratioC.append((C1 / (0.5 * var_f))[(var_f > 0) & np.isfinite(C1)])
    med = np.median(np.concatenate(ratioC)) if ratioC else float("nan")
    m = _cat(margins)
    m = m[~np.isnan(m)]
    return Claim(
        "Theorem E.2",
        "one step: Delta L(P2) <= -lam(KL(Q||P~2)-KL(P2||P~2)) + C2 lam^2; "
        "Delta L(P1) <= lam sqrt(Var_Q f) sqrt(chi2(P1||Q)) + C1 lam^2",
        "holds (loose)" if not viol else "fails", n, len(viol),
        _sizes_first(viol)[0] if viol else None, _q(np.concatenate(tight1)),
        note=(f"{len(viol)}/{n} instances ({sum(v['hard_family'] for v in viol)} in the hard family; the oracle-inequality "
              "check's instances: a quarter general pairs (Q, P2), half the hard family, there with P1 point masses "
              "on the most pushed-down token too) have no finite C1 or C2: the exact per-prefix "
              "derivative exceeds the bound's first-order term (Lemma E.1 and the oracle inequality fail there; "
              "see their corrected forms). Admissible C1, C2 (smallest over lam in [0, 1], the domain's edge) finite "
              "means the "
              "first-order terms of the bound dominate the exact derivatives. The D1 bound drops the +lam^2/2 Var_Q(f) term into "
              f"C1; the smallest admissible C1 is {med:.2f} x Var_Q(f)/2 (median; often 0 because the "
              "Cauchy-Schwarz first-order term already over-covers; sqrt(Var_Q f chi2(P1||Q)) is formed in log space, "
              "chi2 alone can exceed float64 on hard worlds). Tightness = bound/actual at lam=0.3. Power: both first-order terms made 1% / "
              "10% smaller (no finite C for one of them)."),
        power={f"{x:.0%}": float(np.mean(m < x)) for x in (0.01, 0.1)}, n_hard=n_hard,
    )


def _n_e3(n: int) -> int:
    return max(2, min(n // 10, 30))  # simulated trajectories (each fits C1, C2 per step)


def check_theorem_e3(n: int, rng) -> Claim:
    tight, viol, n_tr, acts, bnds = [], [], _n_e3(n), [], []
    hard_worlds = [bw.world(i) for bw in Bt.hard_batches(rng, n_tr // 2, shapes=Bt.HARD_SHAPES[:1] + Bt.HARD_SHAPES[2:4])
                   for i in range(bw.logq0.shape[0])]
    for i in range(n_tr):
        w = random_world(rng, depth=1 + i % 3) if i < n_tr - n_tr // 2 else hard_worlds[i - (n_tr - n_tr // 2)]
        T = int(rng.integers(2, 8))
        lams = np.full(T, float(rng.uniform(0.02, 1.0)))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # chi2 beyond float64: H = inf
            rows = run_tabular(w, lams, alpha=0.1)
        for r in rows[1:]:
            acts += [r["dL_P1_nats"], r["dL_P2_nats"]]
            bnds += [r["bound_P1_nats"], r["bound_P2_nats"]]
            if r["bound_P1_nats"] < r["dL_P1_nats"] - 1e-9 * max(1.0, abs(r["dL_P1_nats"])) or \
                    r["bound_P2_nats"] < r["dL_P2_nats"] - 1e-9 * max(1.0, abs(r["dL_P2_nats"])):
                viol.append({"n_nodes": w.tree.n_nodes, "t": r["t"], **{k: r[k] for k in ("dL_P1_nats", "bound_P1_nats", "dL_P2_nats", "bound_P2_nats")}})
        last = rows[-1]
        if last["dL_P1_nats"] > 1e-9:
            tight.append(last["bound_P1_nats"] / last["dL_P1_nats"])
    return Claim(
        "Theorem E.3",
        "Delta L_T(P2) <= -sum lam_t KL(Q_t||P2) + C2 S_T; Delta L_T(P1) <= H_T sum lam_t sqrt(Var) + C1 S_T",
        "holds (loose)" if not viol else "fails", n_tr, len(viol),
        _sizes_first(viol)[0] if viol else None, _q(tight),
        note=("Tabular tilting trajectories (T = 2..7, lam in [0.02, 1]) with running sup H_t and max admissible C1, C2; "
              f"half of them on hard-family worlds (depth 8 / V = 3, 5; rows 1 - 1e-12, log q down to -1,500, P1 point "
              "masses). Tightness = bound/actual at T. Power: of both bounds at every step (C1, C2 are the smallest "
              "admissible constants of each step, fitted on the trajectory)."),
        power=power(acts, bnds), n_hard=n_tr // 2,
    )


def check_theorem_e4(n: int, rng) -> Claim:
    mu, C2, d, C1, A = rng.uniform(0.1, 2, (5, n, 1))
    T0 = 4 * C2 * d / mu**2
    Ts = T0 * np.array([1 + 1e-6, 1.01, 2, 10, 100, 1000])  # [n, 6]; T -> T0: the edge of feasibility
    Lam = B.Lambda_T_min(Ts, d, mu, C2)
    short = {f"{x:.0%}": float(np.mean(mu * (1 - x) * Lam - C2 * ((1 - x) * Lam) ** 2 / Ts < d)) for x in (0.01, 0.1)}
    # brute force: smallest Lambda on a grid over [0, 2 Lam] meeting mu L - C2 L^2/T >= d
    grid = np.linspace(0, 2, 20001)
    bad_alg = 0
    for k in range(Ts.shape[1]):
        Lg = Lam[:, k : k + 1] * grid  # [n, G]
        feas = mu * Lg - C2 * Lg**2 / Ts[:, k : k + 1] >= d - 1e-12
        first = np.where(feas.any(1), grid[np.argmax(feas, axis=1)], np.inf)
        bad_alg += int((np.abs(first - 1.0) > 2e-4).sum())
    b = B.degradation_bound(Ts, d, mu, C1, C2, A)
    bad_alg += int((np.diff(b, axis=1) >= 0).any(1).sum())
    e = B.degradation_bound_expansion(Ts[:, -2:], d, mu, C1, C2, A)
    r = (b[:, -2:] - e) * Ts[:, -2:] ** 2
    rems = r[:, 1] / r[:, 0]
    w = make_world(V=2, depth=3, n_hard=1, q_noise=0.05, seed=int(rng.integers(1 << 30)))
    dstar = 0.5 * -run_tabular(w, [1.0], 0.1, constants=False)[-1]["dL_P2_nats"]  # reachable in one step
    tab_u = equal_gain_degradation(w, [1, 4, 16], dstar, rho="uniform")
    tab_m = equal_gain_degradation(w, [1, 4, 16], dstar, rho="model")
    spread_u = max(r["dL_P1_nats"] for r in tab_u) - min(r["dL_P1_nats"] for r in tab_u)
    return Claim(
        "Theorem B.2 (= E.4)",
        "Lambda_T^min = T/(2C2)(mu - sqrt(mu^2 - 4C2 Delta/T)); bound A Delta/mu + (A C2/mu^3 + C1/mu^2) Delta^2/T + O(1/T^2), decreasing in T",
        "holds (bound); not reflected by exact tilting" if bad_alg == 0 else "fails", n, bad_alg,
        {"equal_gain_rho_uniform": tab_u, "equal_gain_rho_model": tab_m},
        None,
        note=("Algebra verified by brute force (smallest feasible Lambda on a 20001-point grid, T from T0 (1 + 1e-6), "
              "the edge of eq. (9)'s feasibility, to 1000 T0; strict decrease "
              f"in T, remainder x T^2 converges: ratio {np.median(rems):.3f} between T=100T0 and 1000T0). But with a "
              "fixed target (rho uniform) T steps of lam equal one step of 1-(1-lam)^T, so at equal domain gain "
              f"the exact degradation is independent of T (spread {spread_u:.1e} nats over T=1..16): the 1/T "
              "improvement of the bound comes from C1 S_T only. With rho = current model the path matters. "
              "Note: (9) is sufficient for the target, not necessary: read E.4 as the least degradation bound "
              "among schedules the domain bound certifies. Power: Lambda_T^min claimed 1% / 10% smaller (then "
              "infeasible). The hard family of worlds does not enter: the statement is algebra in its constants; "
              "its hard instances are T at the feasibility edge T0."),
        power=short,
    )


def check_theorem_e5(n: int, rng) -> Claim:
    bad, loose, asym, over = 0, [], [], {0.01: 0, 0.1: 0}
    for i in range(n):
        T = float(rng.integers(1, 1000))
        eps, H, Mh, C1 = rng.uniform(0.01, 1, 4)
        m = float(rng.integers(1, 200))
        s = float(rng.uniform(0, m))
        Me = float(rng.uniform(0, 0.3)) * Mh
        if i % 2:  # the edges: s = 0 or m, M_e = 0, eps_fg down to 1e-12, T up to 1e6
            s, Me = float(rng.choice([0.0, m, s])), float(rng.choice([0.0, Me]))
            eps, T = float(10 ** rng.uniform(-12, 0)), float(np.ceil(10 ** rng.uniform(0, 6)))
        Vs = float(B.V_s(s, m, Mh, Me))
        lm = float(B.lambda_max(T, eps, H, Vs, C1))
        # lm solves the quadratic of eq. (18) with equality and is its largest safe value
        if abs(T * (H * Vs * lm + C1 * lm**2) - eps) > 1e-9 * eps or T * (H * Vs * lm * 1.001 + C1 * (lm * 1.001) ** 2) <= eps:
            bad += 1
        for x in over:  # power: lambda_max claimed 1% / 10% larger is unsafe
            over[x] += T * (H * Vs * lm * (1 + x) + C1 * (lm * (1 + x)) ** 2) > eps
        per_token = (s / m) * Mh**2 + (1 - s / m) * Me**2
        if per_token > 0:
            loose.append(np.sqrt(Vs**2 / per_token))
        if Vs > 0:  # eq. (20) needs V_s > 0 (s = 0 with M_e = 0: lambda_max = sqrt(eps/(C1 T)))
            asym.append(float(B.lambda_max_asymptotic(T * 1e4, eps, H, Vs) / B.lambda_max(T * 1e4, eps, H, Vs, C1)))
    return Claim(
        "Theorem B.3 (= E.5)",
        "lam_max(T;s) = (-H V_s + sqrt((H V_s)^2 + 4 C1 eps/T))/(2 C1) = eps/(H V_s T) + O(1/T^2); V_s ~ M_h sqrt(s)",
        "holds (loose)" if not bad else "fails", n, bad, None, _q(loose),
        note=("Root and expansion verified (asymptotic/exact ratio at 1e4 T: median "
              f"{np.median(asym):.4f}). Eq. (14) relaxes s/m <= s and 1-s/m <= m-s, so V_s is "
              "sqrt(m)-ish times the per-token bound of eq. (13): tightness column = "
              "V_s / sqrt(per-token bound). Also eq. (12) equates w_S (q-mass at a prefix) with E[s/m] "
              "(a positional fraction under P2): different quantities. Half the instances at the edges (s = 0 or m, "
              "M_e = 0, eps_fg down to 1e-12, T up to 1e6). Power: lambda_max claimed 1% / 10% larger (then unsafe). "
              "The hard family of worlds does not enter (algebra in the constants)."),
        power={f"{x:.0%}": v / n for x, v in over.items()},
    )


def check_theorem_3_1(n: int, rng) -> Claim:
    worst = None
    fails, ex, st = 0, [], []
    for i in range(n):
        A, mu, C1, C2 = rng.uniform(0.1, 2, 4)
        d = float(rng.uniform(0.01, 1)) * mu
        lam = float(rng.uniform(0.001, 0.5) if i % 2 else rng.uniform(0.5, 0.999)) * mu / max(C2, 1e-9)
        exact = float(B.equal_step_degradation_bound(lam, d, mu, C1, C2, A))
        stated = float(B.theorem_3_1_bound(d, lam, A, mu, C1, C2))
        ex.append(exact)
        st.append(stated)
        if stated < exact * (1 - 1e-12):
            fails += 1
            r = {"A": float(A), "mu_T": float(mu), "C1": float(C1), "C2": float(C2), "Delta_star": float(d), "lam": float(lam),
                 "E4_bound_at_lam": exact, "thm31_bound": stated}
            if worst is None or d < worst["Delta_star"]:
                worst = r
    return Claim(
        "Theorem 3.1",
        "Delta L(P1) <= k1 Delta_* + k2 Delta_*^2 lam",
        "fails (not implied by E.4)" if fails else "holds", n, fails, worst, None,
        note=("With equal steps lam, eqs. (9)-(10) give Delta_*(A + C1 lam)/(mu - C2 lam) = "
              "k1 Delta_* + Delta_*(C1/mu + A C2/mu^2) lam + O(lam^2): the lam-term is linear in Delta_*. "
              "The stated k2 Delta_*^2 lam (k2 = A C2/mu^3 + C1/mu^2) is E.4's 1/T term with 1/T renamed "
              "lam; with lam ~ Delta_*/(mu T) it under-states E.4 by the factor Delta_*/mu_T < 1. Half the "
              "instances with lam in [0.5, 0.999] mu_T/C2 (up to the edge of feasibility). Power: of the stated bound "
              "made 1% / 10% stronger. The hard family of worlds does not enter (algebra in the constants)."),
        power=power(ex, st),
    )


def check_theorem_3_2(n: int, rng) -> Claim:
    ratios_T1, ratios_big = [], []
    for _ in range(n):
        eps, H, Mh, C1 = rng.uniform(0.05, 1, 4)
        s, m = 4.0, 16.0
        Me = 0.1 * Mh
        Vs = float(B.V_s(s, m, Mh, Me))
        for T, store in ((1.0, ratios_T1), (1e6, ratios_big)):
            store.append(float(B.lambda_max(T, eps, H, Vs, C1) / B.theorem_3_2_lambda_max(eps, s, T, H, Mh)))
    return Claim(
        "Theorem 3.2",
        "lam_max ~ eps_fg / sqrt(s)",
        "holds only asymptotically", n, 0, None,
        {"exact_over_stated_T1": _q(ratios_T1), "exact_over_stated_T1e6": _q(ratios_big)},
        note=("Exact lam_max (eq. 19) over eps/(H M_h sqrt(s) T): far from 1 at T = 1 (lam_max ~ sqrt(eps/C1) "
              "when C1 eps/T dominates, not linear in eps), -> sqrt(s M_h^2/V_s^2) < 1 as T -> oo because "
              "of the (m - s) M_e^2 term; proportional to 1/sqrt(s) only when M_e sqrt(m-s) << M_h sqrt(s). "
              "Power: not defined (an asymptotic proportionality: the ratio table is the result); the hard family "
              "of worlds does not enter (algebra in the constants)."),
    )


CHECKS = {
    "Proposition 3.1": check_prop_3_1,
    "Lemma E.1": check_lemma_e1,
    "Lemma E.2": check_lemma_e2,
    "Lemma E.3": check_lemma_e3,
    "Theorem B.1 (= E.1)": check_theorem_e1,
    "Theorem E.2": check_theorem_e2,
    "Theorem E.3": check_theorem_e3,
    "Theorem B.2 (= E.4)": check_theorem_e4,
    "Theorem B.3 (= E.5)": check_theorem_e5,
    "Theorem 3.1": check_theorem_3_1,
    "Theorem 3.2": check_theorem_3_2,
}


def run_ledger(n: int = 1000, seed: int = 0, only: list[str] | None = None) -> list[Claim]:
    """Run every check (or those whose id contains one of ``only``) with ``n`` instances;
    each paper statement is followed by its corrected statement(s)
    (:data:`theory.claims_corrected.CORRECTED_CHECKS`). Each check gets its own generator
    derived from ``seed`` (so ``only`` does not change the instances a check sees)."""
    from .claims_corrected import CORRECTED_CHECKS

    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: {n!r} is outside [1, inf) (random instances per check)")

    seeds = np.random.SeedSequence(seed).spawn(len(CHECKS))
    out = []
    for k, ((cid, chk), ss) in enumerate(zip(CHECKS.items(), seeds)):
        if only and not any(o.lower() in cid.lower() for o in only):
            continue
        out.append(chk(n, np.random.default_rng(ss)))
        for j, fn in enumerate(CORRECTED_CHECKS.get(cid, [])):
            out.append(fn(n, np.random.default_rng(np.random.SeedSequence([seed, k, j + 1]))))
    return out


def format_ledger(claims: list[Claim]) -> str:
    lines = []
    for c in claims:
        lines.append(f"{c.id:<36} {c.verdict:<45} n={c.n_instances:<5} violations={c.n_violations}")
        lines.append(f"    claim: {c.statement}")
        if c.tightness:
            t = c.tightness
            if "median" in t:
                lines.append("    bound/actual: " + ", ".join(f"{k}={v:.3g}" for k, v in t.items()))
            else:
                for k, v in t.items():
                    lines.append(f"    {k}: " + ", ".join(f"{a}={b:.3g}" for a, b in (v or {}).items()))
        if c.counterexample:
            lines.append(f"    counterexample: {c.counterexample}")
        lines.append(f"    power: {c.power_text}")
        if c.n_hard is not None:
            lines.append(f"    hard family: {c.n_hard} of {c.n_instances} instances")
        lines.append(f"    note: {c.note}")
    return "\n".join(lines)

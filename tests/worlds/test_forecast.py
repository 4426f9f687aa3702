"""sft.forecast: the optimiser replay, the compute accounting, the advisor, and a forecast on
the smoke world."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.forecast import (VERSION7, VERSION8, ComputeMeter, ForecastConfig, GradientMoments, adam_step, advise,
                          coherence, cosine_lrs, gradient_scale, l2_energy_scale, replay_adam, replay_lora,
                          training_run_units)
from sft.forecast_run import fit_coherence


def _gg(g: torch.Tensor, ce_mean=None, ell0=(1.0, 5.0)) -> GradientMoments:
    n_b, K, P = g.shape
    return GradientMoments.from_batches(g, torch.zeros(K, P) if ce_mean is None else ce_mean, ell0)


def test_cosine_schedule_matches_trainer():
    lrs = cosine_lrs(1e-3, 4)
    assert lrs == pytest.approx([1e-3, 1e-3 * (1 + np.cos(np.pi / 4)) / 2, 5e-4, 1e-3 * (1 + np.cos(3 * np.pi / 4)) / 2])


def test_adam_first_step_is_lr_sign_and_linear_in_lr():
    g = torch.tensor([[[0.3, -0.02, 0.0]], [[0.3, -0.02, 0.0]]])  # [n_b=2, K=1, P=3]
    gg = _gg(g, ell0=(1.0,))
    d1, _ = replay_adam(gg, "ce", np.array([0.1]), track=False)
    assert d1.tolist() == pytest.approx([-0.1, 0.1, 0.0], abs=1e-6)  # Adam's first step: lr * sign(g)
    da, _ = replay_adam(gg, "ce", cosine_lrs(1e-3, 20), track=False)
    db, _ = replay_adam(gg, "ce", cosine_lrs(2e-3, 20), track=False)
    assert db.tolist() == pytest.approx((2 * da).tolist(), rel=1e-5)  # frozen replay: displacement ~ lr


@pytest.mark.parametrize("l2, block", [(0.0, 1), (0.0, 3), (0.1, 1)])
def test_on_step_reports_the_expected_gradient_norm_and_the_clip_every_step(l2, block):
    """``on_step(t, norm, clip)``: at step 1 (theta0, nothing learned yet) the norm is sqrt(E_b ||g_b||^2)
    over the batches by hand and the clip min(1, max_norm / norm); every step reports once, in order."""
    g = torch.tensor([[[3.0, -1.0, 0.5]], [[1.0, 1.0, 0.5]]])  # [n_b=2, K=1, P=3]: ||g_1||^2 = 10.25, ||g_2||^2 = 2.25
    seen = []
    replay_adam(_gg(g, ell0=(1.0,)), "ce", cosine_lrs(1e-2, 7), l2_coeff=l2, max_grad_norm=1.5, block=block,
                on_step=lambda t, n, c: seen.append((t, n, c)))
    assert [t for t, _, _ in seen] == list(range(1, 8))
    assert seen[0][1] == pytest.approx(np.sqrt((10.25 + 2.25) / 2)) and seen[0][2] == pytest.approx(1.5 / np.sqrt(6.25))
    assert all(c == pytest.approx(min(1.0, 1.5 / n)) for _, n, c in seen)


def test_l2_pull_shrinks_the_displacement_and_clipping_applies():
    g = torch.full((1, 1, 4), 0.01)
    gg = _gg(g, ell0=(1.0,))
    lrs = np.full(200, 0.05)
    free, _ = replay_adam(gg, "ce", lrs, track=False)
    pulled, _ = replay_adam(gg, "l2", lrs, l2_coeff=1.0, track=False)
    assert float(pulled.norm()) < 0.5 * float(free.norm())


def test_gradient_scale_follows_the_logit_gradient():
    ell0 = torch.tensor([0.5, 8.0], dtype=torch.float64)
    assert gradient_scale("ce", ell0, ell0, 1.0).tolist() == pytest.approx([1.0, 1.0])
    # CE: (1 - p) / (1 - p0), p = exp(-ell)
    r = gradient_scale("ce", torch.tensor([0.1, 8.0], dtype=torch.float64), ell0, 1.0)
    assert float(r[0]) == pytest.approx((1 - np.exp(-0.1)) / (1 - np.exp(-0.5)))
    # DFT's weight p grows as the loss falls: the scale exceeds 1
    assert float(gradient_scale("dft", torch.tensor([0.5, 4.0], dtype=torch.float64), ell0, 1.0)[1]) > 1.0


def test_tracker_slows_the_replay_once_the_domain_is_learned():
    g = torch.full((1, 1, 4), 0.1)
    ce_mean = torch.full((1, 4), 0.1)  # moving along -g lowers the loss
    gg = _gg(g, ce_mean=ce_mean, ell0=(0.5,))
    lrs = np.full(100, 0.5)
    frozen, _ = replay_adam(gg, "ce", lrs, track=False)
    tracked, ell = replay_adam(gg, "ce", lrs, track=True)
    assert float(tracked.norm()) < 0.5 * float(frozen.norm())
    assert float(ell[0]) < 0.5


def test_lora_replay_is_low_rank():
    torch.manual_seed(0)
    o, i, r = 6, 5, 2
    g = torch.randn(3, 1, o * i)
    layout = [(0, o, i, 0)]
    delta, _ = replay_lora(_gg(g, ell0=(1.0,)), layout, np.full(10, 1e-2), r=r, alpha=4, track=False)
    W = delta.reshape(o, i)
    assert float(W.norm()) > 0
    assert int(torch.linalg.matrix_rank(W, atol=1e-7)) <= r


def test_compute_accounting():
    m = ComputeMeter()
    m.forward(10)
    m.forward_backward(10)
    assert m.units == 40.0
    with m.phase("probes"):
        m.forward_backward(2)
        with m.phase("d1_evals"):
            m.forward(5)
            m.replay(4, 10.0)  # replays are their own part, whatever the phase
        m.backward(1)
    m.forward(1)
    assert m.parts == {"other": 41.0, "probes": 8.0, "d1_evals": 5.0, "replays": 20.0}
    assert sum(m.parts.values()) == m.units == 74.0 and m.replay_units == 20.0
    ex = [{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2, 3, 4, 5]}]
    assert training_run_units(ex, steps=10, batch=2) == 3 * 10 * 2 * 4.0


def test_advise_on_a_hand_made_table():
    rows = [{"method": "ce", "lr": 1e-4, "dL_P1_bits": 0.5, "domain_gain_bits": 5.0},
            {"method": "ce", "lr": 3e-4, "dL_P1_bits": 2.0, "domain_gain_bits": 9.0},
            {"method": "talr", "lr": 3e-4, "dL_P1_bits": 1.0, "domain_gain_bits": 7.0},
            {"method": "l2", "lr": 3e-4, "dL_P1_bits": 0.9, "domain_gain_bits": 7.02}]
    best, second = advise(rows, 1.5)
    assert (best["method"], second["method"]) == ("l2", "talr")  # 7.02 and 7.0 tie within 1%: less dL first
    best, second = advise(rows, 1.5, gain_tol=0.0)
    assert (best["method"], second["method"]) == ("l2", "talr")
    assert advise(rows, 5.0)[0]["lr"] == 3e-4 and advise(rows, 5.0)[0]["method"] == "ce"
    assert advise(rows, 0.1) == (None, None)


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match="methods"):
        ForecastConfig(methods=("ce", "adam"))
    with pytest.raises(ValueError, match="lrs"):
        ForecastConfig(lrs=(1e-3, 2.0))
    with pytest.raises(ValueError, match="steps"):
        ForecastConfig(steps=0)


def test_fit_coherence_recovers_the_decay_length():
    lrs = np.array([1e-3, 2e-3, 1e-3, 3e-3, 1e-3])
    lam = np.concatenate([[0.0], np.cumsum(lrs)[:-1]])  # 0, 1e-3, 3e-3, 4e-3, 7e-3
    cos = 0.4 * np.exp(-lam / 2.5e-3)  # cos_0 = 0.4 < 1 (batch noise) does not matter
    assert fit_coherence(cos, lrs) == pytest.approx(2.5e-3, rel=1e-9)
    assert coherence(5e-3, 2.5e-3) == pytest.approx(np.exp(-2.0)) and coherence(1.0, np.inf) == 1.0
    assert fit_coherence([0.4, 0.45, 0.5], lrs[:3]) == np.inf  # no decay: no rotation
    assert fit_coherence([-0.1, 0.3], lrs[:2]) == np.inf  # undefined reference
    # a step whose gradient turned against the frozen one is left out (log of a negative cosine)
    cos2 = np.append(cos, -0.05)
    assert fit_coherence(cos2, np.append(lrs, 1e-3)) == pytest.approx(2.5e-3, rel=1e-9)


def test_fit_coherence_in_linear_space_is_not_pulled_by_a_cosine_in_the_noise():
    """``coherence_fit="linear"`` (tried as version 4): least squares of cos_t / cos_0 - exp(-Lambda_t / lam_c). Exact on a clean
    exponential; a last cosine that has decayed into the batch noise (0.002 instead of 0.061 x
    cos_0) pulls the log-space fit to 1.39e-3 (its log weighs -6.2 against -2.8), the linear fit
    to 2.43e-3 (3 %)."""
    lrs = np.array([1e-3, 2e-3, 1e-3, 3e-3, 1e-3])
    lam = np.concatenate([[0.0], np.cumsum(lrs)[:-1]])
    cos = 0.4 * np.exp(-lam / 2.5e-3)
    assert fit_coherence(cos, lrs, "linear") == pytest.approx(2.5e-3, rel=1e-6)
    assert fit_coherence([0.4, 0.45, 0.5], lrs[:3], "linear") == np.inf  # no decay: no rotation
    assert fit_coherence([-0.1, 0.3], lrs[:2], "linear") == np.inf
    noisy = cos.copy()
    noisy[-1] = 0.4 * 0.002
    assert fit_coherence(noisy, lrs, "log") == pytest.approx(1.39e-3, rel=0.01)
    assert fit_coherence(noisy, lrs, "linear") == pytest.approx(2.43e-3, rel=0.01)
    with pytest.raises(ValueError, match="space"):
        fit_coherence(cos, lrs, "cubic")


def test_kl_term_only_is_the_decomposition_s_kl_term_and_never_negative(smoke_world, pretrained):
    """``kl_term_only`` (tried as version 4) reads dL(P1) as the KL term of the per-prefix decomposition on the D1 sample (the
    first-order term vanishes at a pretraining stationary point; on a sample it is noise). Same
    displacements either way (no size probe): with ``kl_term_only`` each row's dL is its KL term
    (>= 0 by Gibbs); without it, the two terms' sum (the default)."""
    from sft.forecast_run import forecast_grid
    from sft.world_runs import general_sample, general_tree

    model, _, _ = pretrained
    w = smoke_world
    kw = dict(methods=("ce", "dft"), lrs=(1e-4, 3e-3), steps=12, batch=8, n_batches=2, n_general=32, probe_steps=4,
              pad_token_id=w.pad_id, size_probe=False)
    rows = {}
    for kl in (True, False):
        cfg = ForecastConfig(kl_term_only=kl, **kw)
        rows[kl] = forecast_grid(model, w.d2_train, general_sample(w, 32), cfg, progress=False,
                                 d1_tree=general_tree(w, 32))["rows"]
    for a, b in zip(rows[True], rows[False]):
        assert a["size_correction"] == b["size_correction"] == 1.0
        assert a["kl_term_bits"] == pytest.approx(b["kl_term_bits"], rel=1e-6)
        assert a["dL_P1_bits"] == pytest.approx(a["kl_term_bits"], rel=1e-12) and a["dL_P1_bits"] >= 0
        assert b["dL_P1_bits"] == pytest.approx(b["first_order_bits"] + b["kl_term_bits"], abs=1e-9)


def test_rotation_keeps_only_the_coherent_part_of_the_gradient():
    """lam_c -> 0: after step 1 the frozen direction carries no gradient, so the replay is
    Adam's first step followed by its momentum alone (hand-replayed with zero gradients); an
    L2 pull keeps the first-order scale (the rotation is ignored)."""
    g = torch.tensor([[[0.3, -0.02, 0.0]]])
    lrs = np.full(5, 0.1)
    gg = _gg(g, ell0=(1.0,))
    gg.lam_c = 1e-12
    delta, _ = replay_adam(gg, "ce", lrs)
    state, want = {"m": torch.zeros(3), "v": torch.zeros(3)}, torch.zeros(3)
    for t in range(1, 6):
        want -= 0.1 * adam_step(state, g[0, 0] if t == 1 else torch.zeros(3), t)
    assert delta.tolist() == pytest.approx(want.tolist(), rel=1e-5)
    coherent, _ = replay_adam(_gg(g, ell0=(1.0,)), "ce", lrs)
    assert float(delta.norm()) < 0.65 * float(coherent.norm())  # 0.297 vs 0.5 per coordinate
    l2_rot, _ = replay_adam(gg, "l2", lrs, l2_coeff=0.01)
    l2_inf, _ = replay_adam(_gg(g, ell0=(1.0,)), "l2", lrs, l2_coeff=0.01)
    assert l2_rot.tolist() == pytest.approx(l2_inf.tolist())


def test_forecast_on_the_smoke_world_is_monotone_in_lr(smoke_world, pretrained):
    from sft.world_runs import general_sample
    from sft.forecast_run import forecast_grid

    model, _, _ = pretrained
    w = smoke_world
    cfg = ForecastConfig(methods=("ce", "talr"), lrs=(3e-4, 1e-3, 3e-3), steps=20, batch=8, n_batches=2,
                         n_general=32, probe_steps=4, pad_token_id=w.pad_id)
    res = forecast_grid(model, w.d2_train, general_sample(w, 32), cfg, progress=False)
    ce = [r for r in res["rows"] if r["method"] == "ce"]
    assert len(res["rows"]) == 6
    # L2 shares CE's replay at each rate (its gain is CE's), its displacement held by the descent bound
    # (version 3's L2: the bound alone, no relaxation by the pull: L2 is CE wherever the bound does not bind)
    l2cfg = ForecastConfig(methods=("ce", "l2"), lrs=(3e-4, 3e-3), steps=20, batch=8, n_batches=2, n_general=32,
                           probe_steps=4, pad_token_id=w.pad_id, l2_relax="")
    both = forecast_grid(model, w.d2_train, general_sample(w, 32), l2cfg, progress=False)["rows"]
    by = {(r["method"], r["lr"]): r for r in both}
    relaxed = {(r["method"], r["lr"]): r for r in forecast_grid(model, w.d2_train, general_sample(w, 32),
                                                                 replace(l2cfg, l2_relax="tracked"), progress=False)["rows"]}
    for lr in (3e-4, 3e-3):
        assert by["l2", lr]["domain_gain_bits"] == by["ce", lr]["domain_gain_bits"]
        assert 0.0 <= by["l2", lr]["l2_energy_scale"] <= 1.0
        if by["l2", lr]["l2_energy_scale"] == 1.0:
            assert by["l2", lr]["dL_P1_bits"] == pytest.approx(by["ce", lr]["dL_P1_bits"])
        # version 5: Adam's pull shortens L2's displacement, never lengthens it (CE's row is unchanged)
        assert relaxed["ce", lr]["dL_P1_bits"] == pytest.approx(by["ce", lr]["dL_P1_bits"])
        assert relaxed["l2", lr]["dL_P1_bits"] <= by["l2", lr]["dL_P1_bits"] + 1e-9
    dls = [r["dL_P1_bits"] for r in ce]
    gains = [r["domain_gain_bits"] for r in ce]
    assert dls[0] < dls[1] < dls[2]
    assert gains[0] <= gains[1] <= gains[2] and gains[0] > 0
    c = res["compute"]
    assert c["compute_ratio"] == pytest.approx(c["forecast_units"] / c["training_run_units"])
    assert c["training_run_units"] == pytest.approx(training_run_units(w.d2_train, 20, 8))
    # the parts say what spent the compute: every model pass sits in a named phase, and they sum up
    assert set(c["parts"]) == {"gradients", "probes", "d1_evals", "replays"}
    assert sum(c["parts"].values()) == pytest.approx(c["compute_ratio"])
    assert c["parts"]["replays"] == pytest.approx(c["replay_ratio"])
    # two 4-step probes of batch 8 (3 passes a token; the hard-token groups come from CE's pass)
    probe_tokens = 2 * 4 * 8 * 3 * np.mean([len(e["input_ids"]) for e in w.d2_train])
    assert c["parts"]["probes"] * c["training_run_units"] == pytest.approx(probe_tokens, rel=0.3)
    # the model is untouched by the forecast (it evaluates in place and restores theta0 bit for bit);
    # micro-batches of 3 rows (gradients and probes) give the same forecast up to float32 summation order
    before = [p.detach().clone() for p in model.parameters()]
    res2 = forecast_grid(model, w.d2_train, general_sample(w, 32), replace(cfg, micro_batch=3), progress=False)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert [r["dL_P1_bits"] for r in res2["rows"]] == pytest.approx([r["dL_P1_bits"] for r in res["rows"]], rel=1e-3)
    assert [r["domain_gain_bits"] for r in res2["rows"]] == pytest.approx(gains + [r["domain_gain_bits"] for r in res["rows"][3:]], rel=1e-3)
    assert res2["compute"]["parts"]["probes"] == pytest.approx(c["parts"]["probes"])
    # ``only`` forecasts a subset of the product, with the same numbers for the pairs it keeps
    sub = forecast_grid(model, w.d2_train, general_sample(w, 32), cfg, progress=False,
                        only={("talr", 1e-3), ("ce", 3e-3)})
    assert [(r["method"], r["lr"]) for r in sub["rows"]] == [("ce", 3e-3), ("talr", 1e-3)]
    full = {(r["method"], r["lr"]): r["dL_P1_bits"] for r in res["rows"]}
    assert [r["dL_P1_bits"] for r in sub["rows"]] == pytest.approx([full["ce", 3e-3], full["talr", 1e-3]])


def test_extra_eval_sees_each_configurations_predicted_model(smoke_world, pretrained):
    """``extra_eval`` runs on theta0 + sqrt(r) d_theta: without a size probe (r = 1) the D1 sample's
    code length there minus theta0's is the row's replayed dL exactly; with it, the evaluation moves
    with sqrt(r) (a larger r, a larger change); the model is restored after each call."""
    from sft.forecast_run import forecast_grid, mean_bits
    from sft.world_runs import general_sample

    model, _, _ = pretrained
    w = smoke_world
    d1 = general_sample(w, 32)
    base = mean_bits(model, d1, w.pad_id)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def ev(m):
        calls.append(1)
        return {"d1": mean_bits(m, d1, w.pad_id) - base}

    cfg = ForecastConfig(methods=("ce", "l2"), lrs=(3e-4, 3e-3), steps=20, batch=8, n_batches=2, n_general=32,
                         probe_steps=4, pad_token_id=w.pad_id, size_probe=False)
    res = forecast_grid(model, w.d2_train, d1, cfg, progress=False, extra_eval=ev)
    assert len(calls) == 4 and res["extra_eval_seconds"] > 0
    for r in res["rows"]:
        assert r["size_correction"] == 1.0
        assert r["extra_eval"]["d1"] == pytest.approx(r["replay_dL_P1_bits"], rel=1e-9, abs=1e-12)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    sized = forecast_grid(model, w.d2_train, d1, replace(cfg, size_probe=True), progress=False, extra_eval=ev)
    checked = [r for r in sized["rows"] if abs(r["size_correction"] - 1.0) > 0.05 and r["replay_dL_P1_bits"] > 0.05]
    assert checked
    for r in checked:
        assert (r["extra_eval"]["d1"] > r["replay_dL_P1_bits"]) == (r["size_correction"] > 1.0)


@pytest.mark.parametrize("size_model", ["auto", "diffusion"])
def test_spill_gives_the_same_forecast_with_the_moments_on_disk_while_models_are_evaluated(smoke_world, pretrained,
                                                                                           tmp_path, size_model):
    """`Spill`: every row bit-identical with and without it (CE, L2, LoRA, TALR, FLOW, with the size
    probe); while a configuration's model is evaluated its method's moments are on disk (the bytes away
    are those of its mean, covariances and, for TALR and FLOW, the CE direction); the folder is gone after.
    Sized by diffusion, version 8's LoRA share and walk factors, measured while CE's moments are on disk, are
    the same too."""
    from sft.forecast_run import Spill, forecast_grid, mean_bits
    from sft.world_runs import general_sample

    model, _, _ = pretrained
    w = smoke_world
    d1 = general_sample(w, 32)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = ForecastConfig(methods=("ce", "l2", "lora", "talr", "flow"), lrs=(3e-4, 3e-3), steps=20, batch=8,
                         n_batches=2, n_general=32, probe_steps=4, pad_token_id=w.pad_id, size_model=size_model)
    ev = lambda m: {"d1": mean_bits(m, d1, w.pad_id)}  # noqa: E731
    plain = forecast_grid(model, w.d2_train, d1, cfg, progress=False, extra_eval=ev)
    spill, away = Spill(tmp_path), []
    folder = spill.dir
    assert folder.is_dir() and folder.parent == tmp_path

    def ev_away(m):
        away.append(spill.away_bytes)
        return ev(m)

    res = forecast_grid(model, w.d2_train, d1, cfg, progress=False, extra_eval=ev_away, spill=spill)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "extra_eval"} for r in rows]  # noqa: E731
    assert strip(res["rows"]) == strip(plain["rows"]) and res["probe"] == plain["probe"]
    assert [r["extra_eval"] for r in res["rows"]] == [r["extra_eval"] for r in plain["rows"]]
    by = [r["method"] for r in res["rows"]]
    # 4 bytes a float: mean 2 N + covariances 3 N, and the CE direction 2 N of TALR's and FLOW's own moments
    assert away == [4 * n * (5 + 2 * (m in ("talr", "flow"))) for m in by]
    assert res["spill"]["spilled_gb"] > 0 and not folder.exists() and list(tmp_path.iterdir()) == []
    assert plain["spill"] == {}
    measured = {"lora_share", "method_factors"} & set(res["probe"])
    assert measured == (set() if size_model == "auto" else {"lora_share", "method_factors"})


@pytest.mark.parametrize("lam_c", [float("inf"), 0.02])
def test_fit_kappa_binary_search_equals_the_exhaustive_grid(lam_c):
    """The tracked loss falls monotonically in kappa, so the binary search lands on the grid's
    argmin: targets above, inside and below the reachable range, with and without rotation."""
    from sft.forecast_run import fit_kappa

    gen = torch.Generator().manual_seed(1)
    g = torch.randn(3, 2, 500, generator=gen) * 1e-2 + 3e-3
    lrs = cosine_lrs(3e-3, 40)[:8]
    for hard_target in (3.99, 3.5, 2.0, 0.3, 1e-3):
        for easy_target in (0.49, 0.3, 0.05):
            target = np.tile([easy_target, hard_target, 0.0], (8, 1))
            ks = []
            for exhaustive in (False, True):
                gg = _gg(g.clone(), ce_mean=g.mean(0), ell0=(0.5, 4.0))
                gg.lam_c = lam_c
                ks.append(fit_kappa(gg, lrs, target, exhaustive=exhaustive).tolist())
            assert ks[0] == ks[1], (hard_target, easy_target)


def test_fit_kappa_with_a_held_denominator_stays_within_a_grid_step():
    """``fit_block`` (tried as version 4: 12) fits kappa on replays whose Adam denominator is held for the whole 8-step probe
    (``block``; the forecast's ``fit_block``): at most one step of `KAPPA_GRID` from the exact
    replay's kappa, at less than a quarter of its replay compute."""
    from sft.forecast_run import KAPPA_GRID, fit_kappa

    gen = torch.Generator().manual_seed(1)
    g = torch.randn(3, 2, 500, generator=gen) * 1e-2 + 3e-3
    lrs = cosine_lrs(3e-3, 40)[:8]
    grid = [round(float(x), 12) for x in KAPPA_GRID]
    for hard_target, easy_target in ((3.5, 0.3), (2.0, 0.05), (0.3, 0.49)):
        target = np.tile([easy_target, hard_target, 0.0], (8, 1))
        ks, units = [], []
        for block in (1, 8):
            gg = _gg(g.clone(), ce_mean=g.mean(0), ell0=(0.5, 4.0))
            gg.noise_floor = True
            meter = ComputeMeter()
            ks.append([grid.index(round(k, 12)) for k in fit_kappa(gg, lrs, target, meter=meter, block=block).tolist()])
            units.append(meter.replay_units)
        assert max(abs(a - b) for a, b in zip(*ks)) <= 1, (hard_target, easy_target, ks)
        assert units[1] < units[0] / 4


def test_mean_field_replay_is_adam_on_the_mean_gradient_when_batches_agree():
    """Identical batches have no noise (sq = mean^2): the replay is AdamW on that gradient, hand
    replayed with `adam_step` and the clipping of the trainer; with L2's pull too; and slicing the
    coordinates into chunks changes nothing."""
    gen = torch.Generator().manual_seed(3)
    g1 = torch.randn(1, 2, 7, generator=gen)
    g = g1.repeat(3, 1, 1)
    lrs = cosine_lrs(0.05, 12)
    for l2 in (0.0, 0.5):
        want, state = torch.zeros(7), {"m": torch.zeros(7), "v": torch.zeros(7)}
        for t, lr in enumerate(lrs, start=1):
            gt = g1[0].sum(0) + 2 * l2 * want
            n = float(gt.norm())
            c = 1.0 / (n + 1e-6) if n > 1.0 else 1.0
            want -= float(lr) * adam_step(state, gt * c, t)
        for chunk in (3, 1 << 20):
            got, _ = replay_adam(_gg(g), "l2" if l2 else "ce", lrs, l2_coeff=l2, track=False, chunk=chunk)
            assert got.tolist() == pytest.approx(want.tolist(), rel=1e-4, abs=1e-7)


def test_mean_field_noise_slows_adam_where_batches_disagree():
    """A coordinate whose batch gradients cancel (+1, -1) does not move; one with a consistent
    sign but the same second moment moves by lr per step (Adam's sign step)."""
    g = torch.tensor([[[1.0, 1.0]], [[1.0, -1.0]]])  # [n_b=2, K=1, P=2]
    gm = _gg(g, ell0=(1.0,))
    assert gm.raw_sq()[0].tolist() == pytest.approx([1.0, 1.0]) and gm.mean[0].tolist() == pytest.approx([1.0, 0.0])
    assert gm.noise_pairs()[0].tolist() == pytest.approx([0.0, 1.0])
    d, _ = replay_adam(gm, "ce", np.full(10, 0.01), track=False, max_grad_norm=0.0)
    assert d.tolist() == pytest.approx([-0.1, 0.0], abs=1e-6)


def test_streamed_moments_equal_the_per_batch_gradients(smoke_world, pretrained):
    """`method_gradients` streams the batches: its mean, batch covariances (Welford), second moments and
    CE direction equal the brute-force ones from each batch's explicit group gradients (TALR: its own
    weights)."""
    from sft import losses as L
    from sft.data import PadCollator
    from sft.forecast import HARD_GROUP_P, method_gradients
    from sft.models import token_nll

    model, _, _ = pretrained
    w = smoke_world
    batches = [w.d2_train[i:i + 4] for i in (0, 4, 8)]
    params = [p for p in model.parameters() if p.requires_grad]

    def flat(loss):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for x, p in zip(gs, params)])

    per, ce, ntok = [], torch.zeros(2, sum(p.numel() for p in params)), torch.zeros(2)
    for ex in batches:
        b = PadCollator(w.pad_id)(list(ex))
        nll, si = token_nll(model, b["input_ids"], b["attention_mask"], b["labels"])  # chunked, as the forecast
        wt, _ = L.token_weights("talr", nll, si, 4)
        hard = torch.exp(-nll.detach()) < HARD_GROUP_P
        per.append(torch.stack([flat((wt.detach() * nll * m).sum() / nll.numel()) for m in (~hard, hard)]))
        for k, m in enumerate((~hard, hard)):
            ce[k] += flat((nll * m).sum())
            ntok[k] += float(m.sum())
    g = torch.stack(per)
    ref = GradientMoments.from_batches(g, ce / ntok[:, None], (1.0, 1.0))
    # the whole batch at once, and micro-batches of 1 and 3 rows (TALR's tau from the whole batch):
    # equal up to float32 summation order (the lm-head is chunked over supervised positions)
    for micro in (0, 1, 3):
        gm = method_gradients(model, batches, "talr", pad_token_id=w.pad_id, micro_batch=micro)
        assert torch.allclose(gm.mean, ref.mean, rtol=1e-5, atol=1e-8), micro
        assert torch.allclose(gm.cov, ref.cov, rtol=1e-4, atol=1e-10), micro
        err = (gm.raw_sq() - ref.raw_sq()).abs() / ref.raw_sq().abs().amax(1, keepdim=True)
        assert float(err.max()) < 1e-5, (micro, float(err.max()))  # relative to each pair's scale: (0, 1) crosses zero
        assert torch.allclose(gm.ce_mean, ref.ce_mean, rtol=1e-5, atol=1e-8), micro
        assert torch.allclose(gm.sq_sum, ref.raw_sq().double().sum(1), rtol=1e-6)
        brute = torch.stack([(g[:, k] * g[:, l]).mean(0) for k, l in ((0, 0), (0, 1), (1, 1))])  # E_b[g_k g_l]
        assert float(((ref.raw_sq() - brute).abs() / brute.abs().amax(1, keepdim=True)).max()) < 1e-5
        assert gm.tau == pytest.approx(float(np.median([float(L.talr_tau(L.sequence_mean_losses(
            *token_nll(model, *(lambda b: (b["input_ids"], b["attention_mask"], b["labels"]))(PadCollator(w.pad_id)(list(ex)))),
            4))) for ex in batches])), rel=1e-5)
    shared = method_gradients(model, batches, "dft", pad_token_id=w.pad_id, ce_mean=gm.ce_mean)
    assert shared.ce_mean is gm.ce_mean  # a given direction is reused, not recomputed


def test_memory_formula_is_linear_in_parameters_and_blind_to_the_grid():
    from sft.forecast import CHUNK, forecast_memory_bytes

    a = forecast_memory_bytes(1e9, grid=30, n_batches=6)
    b = forecast_memory_bytes(2e9, grid=30, n_batches=6)
    assert b["peak"] - 32 * CHUNK == pytest.approx(2 * (a["peak"] - 32 * CHUNK))
    # bf16 weights, float32 moments: 2 + (4 x 4 + 3 x 4) + 4 + 2 = 36 bytes per parameter
    assert a["peak"] == pytest.approx(1e9 * (2 + 4 * 4 + 3 * 4 + 4 + 2) + 32 * CHUNK)
    assert forecast_memory_bytes(1e9, grid=300, n_batches=60)["peak"] == a["peak"]
    # a 3B model: 115.6 GB, over one 80 GB GPU (one H200); every moment in bf16 (broken on SmolLM2) 70.6 GB
    assert 80e9 < forecast_memory_bytes(3.21e9)["peak"] < 141e9
    assert forecast_memory_bytes(3.21e9, store_bytes=2, noise_bytes=2)["peak"] == pytest.approx(22 * 3.21e9 + 32 * CHUNK)
    # fp32 weights, 1-byte moments: the probe (5 s + 4 w = 21 bytes a parameter beside the model) is the largest part
    c = forecast_memory_bytes(1e9, weight_bytes=4, store_bytes=1, noise_bytes=1)
    assert c["probe"] == pytest.approx(21e9) and c["gradient_pass"] == pytest.approx(19e9)
    assert c["peak"] == pytest.approx(4e9 + 21e9 + 32 * CHUNK)
    # the model on an accelerator, the state in host memory: the device holds the model and a probe's
    # copy, gradient and two AdamW states (5 w N); the host the moments, the displacement and theta0's copy
    assert a["device_peak"] == pytest.approx(5 * 2 * 1e9)
    assert a["host_peak"] == pytest.approx(1e9 * (4 * 4 + 3 * 4 + 4 + 2) + 32 * CHUNK)
    assert a["device_peak"] + a["host_peak"] > a["peak"]  # a split never needs less in all
    # a 3B model: 32.1 GB on the device with bf16 weights, 64.2 GB with float32 ones: one 80 GB GPU either way
    assert forecast_memory_bytes(3.21e9)["device_peak"] == pytest.approx(32.1e9)
    assert forecast_memory_bytes(3.21e9, weight_bytes=4)["device_peak"] < 80e9
    # with the unread state on disk (`Spill`): SmolLM2 in float32 (w = s = c = 4) 36 N instead of 44 N bytes
    # (a pass: 4 + 20 + 12; a replay: 4 + 28 + 4); bf16 weights 34 N instead of 36 N; never more than without
    sm = forecast_memory_bytes(1e9, weight_bytes=4)
    assert sm["peak"] == pytest.approx(44e9 + 32 * CHUNK) and sm["spill_peak"] == pytest.approx(36e9 + 32 * CHUNK)
    assert a["spill_peak"] == pytest.approx(34e9 + 32 * CHUNK)
    assert c["spill_peak"] == pytest.approx(4e9 + max(2e9 + 16e9, 5e9 + 12e9, 11e9, 12e9) + 32 * CHUNK)  # the probe
    assert sm["spill_host_peak"] == pytest.approx(32e9 + 32 * CHUNK) and sm["spill_host_peak"] < sm["host_peak"]
    for x in (a, b, c, sm):
        assert x["spill_peak"] <= x["peak"] and x["spill_host_peak"] <= x["host_peak"]
    # version 8's walk factors (n_f = 4 flat float32 gradients of one weighting, 16 N, and theta0's copy w N beside
    # CE's moments): the largest part in one memory, 46 N + w N; spilled (20 N + w N) below the pass and the replay
    wk = forecast_memory_bytes(1e9, walk_batches=4)
    assert wk["method_walk"] == pytest.approx((28 + 16 + 2) * 1e9) and a["method_walk"] == 0.0
    assert wk["peak"] == pytest.approx((2 + 46) * 1e9 + 32 * CHUNK) and wk["host_peak"] == pytest.approx(46e9 + 32 * CHUNK)
    assert wk["spill_peak"] == a["spill_peak"] and wk["spill_host_peak"] == a["spill_host_peak"]
    assert wk["device_peak"] == a["device_peak"]  # a factor's backward holds the model's gradient, w N < a probe's
    assert forecast_memory_bytes(1e9, walk_batches=16)["spill_peak"] == pytest.approx((2 + 64 + 2) * 1e9 + 32 * CHUNK)
    with pytest.raises(ValueError, match="walk_batches"):
        forecast_memory_bytes(1e9, walk_batches=-1)


def _fake_cuda():
    """A fake-tensor mode whose "cuda" tensors carry no data but check devices as a GPU run would (any op
    mixing cuda and cpu tensors raises), on a machine without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, pytest.raises(Exception, match="device"):
        torch.zeros(2, device="cuda") + torch.zeros(2)  # the mode does check devices
    return mode


def test_the_state_stays_on_the_host_for_a_model_on_a_gpu():
    """The boundaries between a model on an accelerator and the forecast's N-sized state in host memory:
    `Shifted` keeps theta0's copy on the host and moves the (host) displacement to the model's device
    parameter by parameter; the streamed moments take each group gradient (and the CE direction's) to the
    host. Under a fake "cuda" a missing transfer raises a device mismatch. (This CPU build's fake cuda
    cannot copy_ into a cuda tensor, so Shifted's exit is not covered here.)"""
    from torch import nn

    from sft.forecast import CHUNK, HOST, Shifted, StreamedMoments
    from sft.models import model_device

    with _fake_cuda():
        lin = nn.Linear(CHUNK + 3, 2, device="meta")  # a weight of more than one chunk
        lin.weight, lin.bias = (nn.Parameter(torch.zeros(p.shape, device="cuda")) for p in (lin.weight, lin.bias))
        assert model_device(lin).type == "cuda"
        N = sum(p.numel() for p in lin.parameters())
        sh = Shifted(lin, torch.ones(N), scale=0.5)  # (its exit, a host -> device copy_, needs a real GPU)
        assert sh.__enter__() is lin
        assert {s.device for s in sh.saved} == {HOST}
        acc = StreamedMoments(list(lin.parameters()), True, torch.float32)
        grads = [[torch.ones_like(p) for p in lin.parameters()], [None, torch.ones_like(lin.bias)]]
        acc.add(grads)
        acc.add_ce(1, grads[0])
        assert {acc.mean.device, acc.cov.device, acc.ce.device} == {HOST}


def test_size_correction_interpolates_the_probe_ratios_in_log_rate():
    from sft.forecast_run import size_correction

    pts = [(1e-4, 2.0, 1.0), (1e-2, 1.0, 4.0)]  # ratios 2 at 1e-4, 1/4 at 1e-2
    assert size_correction(pts, 1e-3) == pytest.approx(np.sqrt(2.0 * 0.25))  # the geometric middle
    assert size_correction(pts, 1e-5) == pytest.approx(2.0) and size_correction(pts, 1.0) == pytest.approx(0.25)
    assert size_correction([(1e-3, -0.1, 1.0), (1e-2, 3.0, 1.0)], 1e-4) == pytest.approx(3.0)  # a non-positive dL is left out
    assert size_correction([], 1e-3) == 1.0


def test_decorrelation_hand_values_and_brute_force():
    """F = sum_st d_s d_t exp(-|L_s - L_t| / lam_c) / (sum d)^2: two equal steps half a kernel
    apart give (1 + 1 + 2 x 0.5) / 4 = 0.75; no rotation gives 1; a vanishing lam_c leaves the
    diagonal sum d^2 / (sum d)^2; the O(T) recursion equals the O(T^2) double sum."""
    from sft.forecast import decorrelation

    lam_c = 2e-3
    assert decorrelation([1.0, 1.0], [0.0, lam_c * np.log(2.0)], lam_c) == pytest.approx(0.75)
    assert decorrelation([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], float("inf")) == 1.0
    d = np.array([1.0, 2.0, 3.0])
    assert decorrelation(d, [0.0, 1.0, 2.0], 1e-9) == pytest.approx(float((d**2).sum() / d.sum() ** 2))
    rng = np.random.default_rng(0)
    d, lam = rng.random(40), np.cumsum(rng.random(40)) * 1e-3
    K = np.exp(-np.abs(lam[:, None] - lam[None, :]) / lam_c)
    assert decorrelation(d, lam, lam_c) == pytest.approx(float(d @ K @ d / d.sum() ** 2), rel=1e-12)
    # a longer coherence never shortens the path
    vals = [decorrelation(d, lam, lc) for lc in (1e-4, 1e-3, 1e-2, 1e-1)]
    assert all(a <= b for a, b in zip(vals, vals[1:])) and 0 < vals[0] < vals[-1] <= 1


def test_keep_norm_shortens_the_straight_path_by_sqrt_f():
    """With ``keep_norm`` the rotation does not touch the steps: the replay is the straight
    (unrotated) path scaled by sqrt(F) of its own step sizes (`decorrelation`), recomputed here
    from the straight path's prefixes."""
    from sft.forecast import decorrelation

    gen = torch.Generator().manual_seed(5)
    g = torch.randn(3, 2, 6, generator=gen)
    lrs = cosine_lrs(0.05, 6)
    lam_c = 0.07

    def run(lc, n):
        gm = _gg(g, ce_mean=torch.randn(2, 6, generator=torch.Generator().manual_seed(1)) * 0.1)
        gm.keep_norm, gm.lam_c = True, lc
        return replay_adam(gm, "ce", lrs[:n])[0]

    straight = [torch.zeros(6)] + [run(1e300, n) for n in range(1, 7)]
    d = [float((straight[t] - straight[t - 1]).norm()) for t in range(1, 7)]
    lam = np.concatenate([[0.0], np.cumsum(lrs)[:-1]])
    F = decorrelation(d, lam, lam_c)
    assert 0.3 < F < 1.0
    assert run(lam_c, 6).tolist() == pytest.approx((straight[-1] * F**0.5).tolist(), rel=1e-5, abs=1e-8)


def test_noise_floor_splits_mean_and_noise():
    """Hand values: batches (1, 0) and (3, 2) have mean (2, 1), E g^2 = (5, 2), noise (1, 1); at a
    mean scale 0.5 the second moment is 0.25 (4, 1) + (1, 1) = (2, 1.25) and the expected squared
    norm its sum, 3.25; at rho = 1 it is E g^2 itself (the model is exact at theta0)."""
    g = torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]]])
    gm = _gg(g, ell0=(1.0,))
    gm.noise_floor = True
    half, one = torch.tensor([0.5], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    assert gm.second_moment(half).tolist() == pytest.approx([2.0, 1.25])
    assert gm.norm2(half) == pytest.approx(3.25)
    assert gm.second_moment(one).tolist() == pytest.approx([5.0, 2.0]) and gm.norm2(one) == pytest.approx(7.0)
    assert gm.second_moment(half, rn=half).tolist() == pytest.approx([1.25, 0.5])  # the noise scaled too
    gm.noise_floor = False
    assert gm.second_moment(half).tolist() == pytest.approx([1.25, 0.5])


def test_noise_floor_changes_nothing_without_batch_noise():
    """Identical batches (no noise): the noise-floor replay equals the plain one (both scale the
    mean by the tracked loss); a coordinate of pure batch noise does not move."""
    gen = torch.Generator().manual_seed(7)
    g1 = torch.randn(1, 2, 5, generator=gen)
    ce = torch.randn(2, 5, generator=gen)
    lrs = cosine_lrs(0.05, 20)

    def run(g, nf):
        gm = _gg(g, ce_mean=ce)
        gm.kappa = torch.tensor([3.0, 3.0], dtype=torch.float64)
        gm.noise_floor, gm.lam_c = nf, 1e300  # 1e300: the tracked loss, no rotation
        return replay_adam(gm, "ce", lrs)[0]

    same = g1.repeat(3, 1, 1)
    assert run(same, True).tolist() == pytest.approx(run(same, False).tolist(), rel=1e-5, abs=1e-8)
    # one group: a coordinate of pure noise (batches +1, -1) never moves, a consistent one does
    gm = _gg(torch.tensor([[[1.0, 1.0]], [[1.0, -1.0]]]), ce_mean=torch.tensor([[1.0, 0.0]]), ell0=(1.0,))
    gm.noise_floor, gm.lam_c = True, 1e300
    d, _ = replay_adam(gm, "ce", np.full(10, 0.01), max_grad_norm=0.0)
    assert d[1].item() == 0.0 and -0.1 - 1e-6 <= d[0].item() < -0.01


def test_noise_scale_is_the_token_weight_ratio():
    """CE's noise keeps its size (w = 1); DFT's scales by w(p) / w(p0) = p / p0."""
    from sft.forecast import noise_scale

    ell0, ell = torch.tensor([2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.25], dtype=torch.float64)
    assert noise_scale("ce", ell, ell0, tau=1.0).tolist() == pytest.approx([1.0, 1.0])
    assert noise_scale("dft", ell, ell0, tau=1.0).tolist() == pytest.approx(torch.exp(ell0 - ell).tolist())


def test_replay_flops_counts_the_noise_floor():
    """Compute accounting: the replay's flops per parameter and step by method, and the meter's
    replay units (flops / 2 per step: a token pass is 2 N flops)."""
    from sft.forecast import forecast_compute_ratio
    from sft.forecast_run import replay_flops

    v3 = dict(replay_block=10, lora_block=2)  # version 3's blocks
    on, off = ForecastConfig(**v3), ForecastConfig(noise_floor=False, **v3)
    # blocks of b steps: (50 + 2 x) / b without an L2 pull (x = 15 with the noise floor), L2's own
    # replay 45 + x, LoRA (12 r + 10 + x) / lora_block; b = 10, lora_block = 2, r = 8
    assert [replay_flops(m, off) for m in ("ce", "talr", "l2", "lora")] == [5.0, 5.0, 45.0, 53.0]
    assert [replay_flops(m, on) for m in ("ce", "talr", "l2", "lora")] == [8.0, 8.0, 60.0, 60.5]
    v4 = ForecastConfig(replay_block=25, lora_block=3)  # the blocks tried as version 4, version 5's defaults
    assert [replay_flops(m, v4) for m in ("ce", "talr", "l2")] == [3.2, 3.2, 60.0]
    assert replay_flops("ce", ForecastConfig()) == 3.2
    assert replay_flops("lora", v4) == pytest.approx(121.0 / 3)
    exact = ForecastConfig(replay_block=1, lora_block=1)
    assert [replay_flops(m, exact) for m in ("ce", "l2", "lora")] == [80.0, 60.0, 121.0]
    m = ComputeMeter()
    m.replay(150, 45.0)
    assert m.units == m.replay_units == 45.0 * 150 / 2
    r = forecast_compute_ratio(steps=150, batch=16, len_d2=512, n_general=128, len_d1=512, n_batches=2,
                               n_weightings=4, grid=30, probe_steps=6)
    assert r["replay_ratio"] == pytest.approx(30 * 150 * 15.4 / 2 / (3 * 150 * 16 * 512))
    # two probes (6 k B L2) and G + 5 D1 evaluations; one probe (no size probe): 3 k B L2 and G + 2
    run = 3 * 150 * 16 * 512
    assert r["passes_ratio"] == pytest.approx(((5 * 2 * 4 + 6 * 6) * 16 * 512 + 35 * 128 * 512) / run)
    r1 = forecast_compute_ratio(steps=150, batch=16, len_d2=512, n_general=128, len_d1=512, n_batches=2,
                                n_weightings=4, grid=30, probe_steps=6, probes=1, replay_flops=8.9)
    assert r1["passes_ratio"] == pytest.approx(((5 * 2 * 4 + 3 * 6) * 16 * 512 + 32 * 128 * 512) / run)
    # version 8's walk factors: n_f (forward + backward of B rows + a D1 pass) per weighting, and 5 D1 passes
    rw = forecast_compute_ratio(steps=150, batch=16, len_d2=512, n_general=128, len_d1=512, n_batches=2,
                                n_weightings=4, grid=30, probe_steps=6, walk_batches=4)
    assert rw["walk_ratio"] == pytest.approx((4 * 4 * (3 * 16 * 512 + 128 * 512) + 5 * 128 * 512) / run)
    assert rw["passes_ratio"] == pytest.approx(r["passes_ratio"] + rw["walk_ratio"]) and r["walk_ratio"] == 0.0
    # the default per-configuration flops: the six methods' replay_flops averaged
    assert np.mean([replay_flops(m, on) for m in ("ce", "talr", "dft", "flow", "lora")] + [0.0]) == pytest.approx(15.4, abs=0.05)
    assert np.mean([replay_flops(m, v4) for m in ("ce", "talr", "dft", "flow", "lora")] + [0.0]) == pytest.approx(8.9, abs=0.05)


def test_block_replay_is_exact_while_the_scales_hold_and_close_when_they_move():
    """Held Adam denominators (``block``): with a frozen scale and no clipping the bias-corrected
    moments are constant (a_hat = rho, bb_hat = rho^2), so any block gives the per-step replay to
    rounding; with tracking, noise floor and clipping the blocks move the displacement little and
    block=1 is the per-step replay whatever the chunking."""
    torch.manual_seed(3)
    g = torch.randn(5, 2, 300) * 0.05 + torch.randn(1, 2, 300) * 0.05
    lrs = cosine_lrs(3e-3, 60)

    def gm(nf=False):
        out = GradientMoments.from_batches(g, None, (1.0, 3.0))
        out.ce_mean, out.ce_scale = None, torch.tensor([1.0, 1.0])
        out.noise_floor, out.keep_norm, out.lam_c = nf, nf, (0.05 if nf else float("inf"))
        return out

    ref, _ = replay_adam(gm(), "ce", lrs, track=False, max_grad_norm=0.0)
    for block in (4, 7, 60):
        got, _ = replay_adam(gm(), "ce", lrs, track=False, max_grad_norm=0.0, block=block)
        assert got.tolist() == pytest.approx(ref.tolist(), rel=1e-5, abs=1e-9)
    exact, ell1 = replay_adam(gm(True), "ce", lrs, max_grad_norm=0.5)
    chunked, ell2 = replay_adam(gm(True), "ce", lrs, max_grad_norm=0.5, chunk=37)
    assert chunked.tolist() == pytest.approx(exact.tolist(), rel=1e-4, abs=1e-8)
    blocked, ell3 = replay_adam(gm(True), "ce", lrs, max_grad_norm=0.5, block=10)
    assert 0 < float((blocked - exact).norm() / exact.norm()) < 0.05
    assert ell3.tolist() == pytest.approx(ell1.tolist(), rel=0.05)


def test_lora_block_one_is_the_per_step_replay_and_two_stays_close():
    torch.manual_seed(0)
    layout = [(0, 6, 5, 0), (30, 4, 6, 1)]
    g = torch.randn(4, 2, 54) * 0.1
    gm = GradientMoments.from_batches(g, None, (1.0, 3.0))
    gm.ce_mean, gm.ce_scale = None, torch.tensor([1.0, 1.0])
    lrs = cosine_lrs(1e-2, 40)
    d1, _ = replay_lora(gm, layout, lrs, r=2, alpha=4, block=1)
    d0, _ = replay_lora(gm, layout, lrs, r=2, alpha=4)
    assert d1.tolist() == d0.tolist()
    d2, _ = replay_lora(gm, layout, lrs, r=2, alpha=4, block=2)
    assert 0 < float((d2 - d1).norm() / d1.norm()) < 0.15


def test_l2_energy_scale_hand_values():
    """s^2 = min(1, drop / (l2 |d|^2 size)), drop = the token-weighted fall of the group losses:
    ell0 = (1, 3), ell_T = (0.5, 1), tokens (3, 1): drop = (0.5 * 3 + 2 * 1) / 4 = 0.875 nats."""
    args = ((1.0, 3.0), (0.5, 1.0), (3.0, 1.0))
    assert l2_energy_scale(175.0, *args, 0.01) == pytest.approx(np.sqrt(0.875 / 1.75))  # need 1.75
    assert l2_energy_scale(175.0, *args, 0.01, size=2.0) == pytest.approx(0.5)  # need 3.5
    assert l2_energy_scale(50.0, *args, 0.01) == 1.0  # the bound is slack: need 0.5 < 0.875
    assert l2_energy_scale(0.0, *args, 0.01) == 1.0
    assert l2_energy_scale(10.0, (1.0, 1.0), (1.5, 1.5), (1.0, 1.0), 0.01) == 0.0  # no drop: no displacement


def test_l2_relaxation_hand_values_and_the_ode():
    """L2's d_i = CE's d_i x f(x_i), f(x) = (1 - e^{-x}) / x, x_i = 2 l2 Lambda_T / sigma_i, sigma_i^2 =
    sq_00 + 2 sq_01 + sq_11 (rho = 1) or rho-weighted. Hand values; f -> 1 without a pull; the large-x
    limit is the pull's equilibrium |d| = |g| / (2 l2); and it solves dd/dLambda = u - (2 l2 / sigma) d
    from 0 (Euler, fine steps) for a constant step u = g / sigma, whose pull-free path is u Lambda."""
    from sft.forecast import l2_relaxation

    sq = torch.tensor([[0.01, 1e-6, 4e-4], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # sigma = 0.1, 1e-3, 0.02
    d = torch.tensor([1.0, -2.0, 0.5])
    lam, l2 = 0.25, 0.01
    x = 2 * l2 * lam / np.array([0.1, 1e-3, 0.02])  # 0.05, 5, 0.25
    want = d.numpy() * (1 - np.exp(-x)) / x
    assert l2_relaxation(d, sq, lam, l2).numpy() == pytest.approx(want, rel=1e-5)
    assert l2_relaxation(d, sq, lam, 0.0).numpy() == pytest.approx(d.numpy())  # no pull: CE's displacement
    # rho = (0.5, 0.5) halves sigma where only group 0's moment is set: x doubles
    rho = torch.tensor([0.5, 0.5], dtype=torch.float64)
    x2 = 2 * l2 * lam / (0.5 * np.array([0.1, 1e-3, 0.02]))
    assert l2_relaxation(d, sq, lam, l2, rho=rho).numpy() == pytest.approx(d.numpy() * (1 - np.exp(-x2)) / x2, rel=1e-5)
    # the equilibrium: huge Lambda, CE's straight path u Lambda -> L2's u sigma / (2 l2) = g / (2 l2)
    g, sig, big = 0.003, 0.05, 1e3
    sq1 = torch.tensor([[sig**2]])
    out = l2_relaxation(torch.tensor([g / sig * big]), sq1, big, l2)
    assert float(out) == pytest.approx(g / (2 * l2), rel=1e-4)
    # the ODE, Euler in Lambda
    u, n = g / sig, 200000
    dd, h = 0.0, lam / n
    for _ in range(n):
        dd += h * (u - 2 * l2 / sig * dd)
    assert float(l2_relaxation(torch.tensor([u * lam]), sq1, lam, l2)) == pytest.approx(dd, rel=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_l2_relaxation_only_shrinks_and_is_monotone_in_lambda(seed):
    """0 < f <= 1 and f decreasing in x: every coordinate keeps CE's sign and shrinks, more at a larger summed
    rate, and |d_i| never exceeds the pull's equilibrium sigma_i |u_i| / (2 l2) x (1 - e^{-x}) <= |g_i| / (2 l2)."""
    from sft.forecast import l2_relaxation

    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(50, generator=gen)
    sq = torch.rand(3, 50, generator=gen) * 1e-3
    sq[1] = 0.0
    a = l2_relaxation(d, sq, 0.01, 0.01)
    b = l2_relaxation(d, sq, 0.1, 0.01)
    assert torch.all(torch.sign(a) == torch.sign(d)) and torch.all(a.abs() <= d.abs() + 1e-7)
    assert torch.all(b.abs() <= a.abs() + 1e-7)


def test_size_correction_in_summed_rate():
    """``size_axis="lambda"``: each probe sits at the sum of its probe_steps rates, a configuration at its
    run's summed rate Lambda_T; log of the ratio interpolated linearly in log Lambda (held outside)."""
    from sft.forecast_run import ForecastGrid

    g = ForecastGrid.__new__(ForecastGrid)
    g.cfg = ForecastConfig(steps=10, probe_steps=2, size_axis="lambda")
    g.size_points = [(1e-4, 2.0, 1.0), (1e-2, 1.0, 4.0)]  # ratios 2 and 1/4
    l_lo, l_hi = cosine_lrs(1e-4, 10)[:2].sum(), cosine_lrs(1e-2, 10)[:2].sum()  # 100x apart
    mid = float(np.sqrt(l_lo * l_hi))
    assert g.size_at(123.0, mid) == pytest.approx(np.sqrt(2.0 * 0.25))  # the rate itself is not read
    assert g.size_at(1e-4, l_lo / 10) == pytest.approx(2.0) and g.size_at(1e-2, 10 * l_hi) == pytest.approx(0.25)
    g.cfg = ForecastConfig(steps=10, probe_steps=2, size_axis="rate")  # version 3: log peak rate
    assert g.size_at(1e-3, 123.0) == pytest.approx(np.sqrt(2.0 * 0.25))


def test_l2_relax_config_and_l2_stays_below_ce(smoke_world, pretrained):
    """Bad values are refused; on the smoke world L2's forecast with the relaxation is CE's replay shrunk per
    coordinate (same size correction): its dL there is at most CE's at each rate, its gain is CE's."""
    from sft.forecast_run import forecast_grid
    from sft.world_runs import general_sample

    with pytest.raises(ValueError, match="l2_relax"):
        ForecastConfig(l2_relax="yes")
    with pytest.raises(ValueError, match="size_axis"):
        ForecastConfig(size_axis="steps")
    model, _, _ = pretrained
    w = smoke_world
    cfg = ForecastConfig(methods=("ce", "l2"), lrs=(3e-4, 3e-3), steps=20, batch=8, n_batches=2, n_general=32,
                         probe_steps=4, pad_token_id=w.pad_id, l2_relax="tracked", size_axis="lambda")
    by = {(r["method"], r["lr"]): r for r in forecast_grid(model, w.d2_train, general_sample(w, 32), cfg,
                                                           progress=False)["rows"]}
    for lr in cfg.lrs:
        assert by["l2", lr]["dL_P1_bits"] <= by["ce", lr]["dL_P1_bits"] + 1e-9
        assert by["l2", lr]["domain_gain_bits"] == pytest.approx(by["ce", lr]["domain_gain_bits"])


def test_tau_at_follows_the_token_mean_of_the_tracked_loss():
    """``tau_track``: tau_t = tau0 x (sum_k n_k ell_k) / (sum_k n_k ell0_k); held at tau0 without it."""
    gm = _gg(torch.zeros(2, 2, 3), ell0=(0.5, 4.0))
    gm.tau, gm.tokens_per_seq = 1.3, torch.tensor([30.0, 10.0], dtype=torch.float64)
    ell = torch.tensor([0.25, 1.0], dtype=torch.float64)
    assert gm.tau_at(ell) == 1.3
    gm.tau_track = True
    assert gm.tau_at(ell) == pytest.approx(1.3 * (30 * 0.25 + 10 * 1.0) / (30 * 0.5 + 10 * 4.0))
    assert gm.tau_at(gm.ell0) == pytest.approx(1.3)


@pytest.mark.parametrize("c", [0.9, 0.5, 0.2])
def test_tracked_tau_keeps_talr_weights_when_losses_fall_in_proportion(c):
    """Every group's loss x c and tau x c: TALR's weight exp(-ell / tau) is unchanged, so the
    gradient scale is CE's (1 - p) / (1 - p0); with tau held the hard group's weight rises."""
    ell0 = torch.tensor([0.3, 3.0], dtype=torch.float64)
    ell, tau0 = c * ell0, 0.8
    tracked = gradient_scale("talr", ell, ell0, tau0, w_min=1e-9, tau_t=c * tau0)
    assert tracked.tolist() == pytest.approx(gradient_scale("ce", ell, ell0, tau0).tolist(), rel=1e-9)
    held = gradient_scale("talr", ell, ell0, tau0, w_min=1e-9)
    assert float(held[1]) > float(tracked[1])
    from sft.forecast import noise_scale
    assert noise_scale("talr", ell, ell0, tau0, w_min=1e-9, tau_t=c * tau0).tolist() == pytest.approx([1.0, 1.0])
    # CE and DFT carry no tau: tau_t changes nothing
    for m in ("ce", "dft"):
        assert gradient_scale(m, ell, ell0, tau0, tau_t=0.1).tolist() == gradient_scale(m, ell, ell0, tau0).tolist()


def test_tau_tracking_slows_talr_replay_and_leaves_ce_alone():
    """A hard and an easy group along separate coordinates: with tau tracking TALR's hard-group
    weight stays down as the domain is learned, so the replay moves the hard coordinates less; with
    the tracker weighted too (``tracker_weight``) the hard group's tracked loss also falls less
    (without it the tracker sees the weights only through Adam's denominator). CE's replay is the
    same bit for bit under both flags (its weight ratio is 1)."""
    torch.manual_seed(0)
    g = torch.zeros(4, 2, 6)
    g[:, 0, :3] = 0.05 + 0.01 * torch.randn(4, 3)  # easy group (low loss) on coordinates 0-2
    g[:, 1, 3:] = 0.05 + 0.01 * torch.randn(4, 3)  # hard group on 3-5
    ce_mean = g.mean(0) * 2.0
    lrs = cosine_lrs(0.05, 80)

    def run(method, track_tau, weighted=False):
        gm = _gg(g, ce_mean=ce_mean, ell0=(0.4, 4.0))
        gm.tau, gm.tokens_per_seq = 1.0, torch.tensor([20.0, 5.0], dtype=torch.float64)
        gm.noise_floor, gm.keep_norm, gm.lam_c = True, True, 1e300
        gm.tau_track, gm.tracker_weight = track_tau, weighted
        return replay_adam(gm, method, lrs, max_grad_norm=0.0)

    d_held, trk_held = run("talr", False, True)
    d_track, trk_track = run("talr", True, True)
    assert float(d_track[3:].norm()) < float(d_held[3:].norm())
    assert float(trk_track[1]) > float(trk_held[1])
    assert float(run("talr", True)[0][3:].norm()) < float(run("talr", False)[0][3:].norm())
    ce_a, ce_b = run("ce", False), run("ce", True, True)
    assert torch.equal(ce_a[0], ce_b[0]) and torch.equal(ce_a[1], ce_b[1])


@pytest.mark.parametrize("n", [2, 3, 5])
def test_debiased_alignment_is_the_cross_batch_u_statistic(n):
    """``cross_fit``'s alignment of a CE's own moments: ce_scale_k x sum_i (mean_k mean_j -
    noise_kj / (n - 1)) / denom = the mean over ordered pairs of *different* batches a != b of
    ce_scale_k g_ak . g_bj / denom (brute force), which has no batch's product with itself (the
    in-sample noise); without ``debias`` it is the in-sample ce_k . mean_j."""
    torch.manual_seed(n)
    g = torch.randn(n, 2, 7)
    gm = GradientMoments.from_batches(g, None, (1.0, 3.0))
    gm.ce_scale, gm.n_batches = torch.tensor([2.0, 0.5], dtype=torch.float64), n
    denom = torch.rand(7) + 0.5
    sl = slice(None)
    gm.debias = False
    inside = gm.alignment(sl, gm.mean[:, sl].float(), denom)
    assert inside.numpy() == pytest.approx((gm.ce(sl) @ (gm.mean / denom).t()).double().numpy(), rel=1e-5)
    gm.debias = True
    got = gm.alignment(sl, gm.mean[:, sl].float(), denom)
    want = torch.zeros(2, 2, dtype=torch.float64)
    for a in range(n):
        for b in range(n):
            if a != b:
                want += (g[a].double() / denom.double()) @ g[b].double().t()
    want = gm.ce_scale[:, None] * want / (n * (n - 1))
    assert got.numpy() == pytest.approx(want.numpy(), rel=1e-4, abs=1e-6)
    # pure noise: the in-sample alignment is positive on the diagonal, the debiased one is not biased
    gm.ce_mean = torch.zeros(2, 7)  # an explicit (other batches') direction is never corrected
    assert torch.equal(gm.alignment(sl, gm.mean[:, sl].float(), denom),
                       (gm.ce(sl) @ (gm.mean / denom).t()).double())


def test_pure_noise_batches_have_no_debiased_progress():
    """Batches of pure noise (zero mean gradient): over many draws the in-sample alignment of CE's
    own moments averages to about Sigma / n > 0 on the diagonal (the tracker credited progress
    that is not there); the debiased one averages to about 0."""
    torch.manual_seed(0)
    ins, deb = [], []
    for _ in range(400):
        g = torch.randn(2, 2, 50)
        gm = GradientMoments.from_batches(g, None, (1.0, 3.0))
        gm.ce_scale, gm.n_batches = torch.ones(2, dtype=torch.float64), 2
        denom = torch.ones(50)
        ins.append(float(gm.alignment(slice(None), gm.mean.float(), denom).diagonal().mean()))
        gm.debias = True
        deb.append(float(gm.alignment(slice(None), gm.mean.float(), denom).diagonal().mean()))
    assert np.mean(ins) == pytest.approx(25.0, rel=0.1)  # 50 coordinates x variance 1 / n = 2
    assert abs(np.mean(deb)) < 2.0  # its standard error over 400 draws is about 0.35 x 5


def test_cross_fit_batches_are_disjoint_and_the_smoke_forecast_runs(smoke_world, pretrained):
    """With ``cross_fit`` TALR's moments come from batches disjoint from CE's (whose mean is its
    tracker's direction) and CE's alignment is debiased: the forecasts change, stay finite and keep
    CE's gain monotone in the rate; without it both use the same batches."""
    from sft.world_runs import general_sample
    from sft.forecast_run import probe_batches, forecast_grid

    model, _, _ = pretrained
    w = smoke_world
    cfg = ForecastConfig(methods=("ce", "talr"), lrs=(3e-4, 1e-3, 3e-3), steps=20, batch=8, n_batches=2,
                         n_general=32, probe_steps=4, pad_token_id=w.pad_id, cross_fit=True)
    ce_b, own_b = probe_batches(w.d2_train, cfg, np.random.default_rng(0))
    ids = lambda bs: {id(ex) for b in bs for ex in b}  # noqa: E731
    assert len(ce_b) == len(own_b) == 2 and not ids(ce_b) & ids(own_b)
    same = probe_batches(w.d2_train, replace(cfg, cross_fit=False), np.random.default_rng(0))
    assert same[0] == same[1] == ce_b
    tiny = probe_batches(w.d2_train[:8], cfg, np.random.default_rng(0))  # one batch only: shared
    assert tiny[0] == tiny[1]
    res = forecast_grid(model, w.d2_train, general_sample(w, 32), cfg, progress=False)
    old = forecast_grid(model, w.d2_train, general_sample(w, 32), replace(cfg, cross_fit=False), progress=False)
    rows = res["rows"]
    assert all(np.isfinite([r["dL_P1_bits"], r["domain_gain_bits"]]).all() for r in rows)
    gains = [r["domain_gain_bits"] for r in rows if r["method"] == "ce"]
    assert gains[0] <= gains[1] <= gains[2]
    assert [r["domain_gain_bits"] for r in rows] != pytest.approx([r["domain_gain_bits"] for r in old["rows"]])


def _tracker(method, ell0, group, seq, w_min=0.01):
    from sft.forecast import TokenLosses, TokenTracker

    gm = GradientMoments.from_batches(torch.ones(1, 2, 3), None, (1.0, 3.0))
    gm.tokens = TokenLosses(torch.tensor(ell0, dtype=torch.float64), torch.tensor(group), torch.tensor(seq))
    return TokenTracker(gm, method, w_min)


def test_token_tracker_one_token_per_group_solves_its_ode():
    """CE, one token per group: d ell = -D (1 - e^-ell)^2 / (1 - e^-ell0)^2 per unit of the group's drop
    D (the first-order drop at theta0), integrated here by a fine Euler scheme over 40 steps."""
    tr = _tracker("ce", [0.7, 4.0], [0, 1], [0, 1])
    drops = torch.tensor([0.05, 0.3], dtype=torch.float64)
    for _ in range(40):
        got = tr.step(drops)
    for k, (e0, d) in enumerate(((0.7, 0.05), (4.0, 0.3))):
        e, n = e0, 40 * 20000
        for _ in range(n):
            e = max(e - d * 40 / n * (1 - np.exp(-e)) ** 2 / (1 - np.exp(-e0)) ** 2, 0.0)
        assert float(got[k]) == pytest.approx(e, rel=5e-3, abs=1e-4)  # sub-steps of 0.05 nats, midpoint rule


def test_token_tracker_talr_leaves_the_hardest_tokens_and_tracks_the_trainers_tau():
    """Three sequences, hard tokens at 1.7, 4 and 9 nats: under CE all three fall; under TALR the
    9-nat token's weight is at the floor, so it barely moves while the others are learned, and the
    group mean saturates above CE's. tau is the median of the per-sequence mean losses (hand)."""
    ell0, group, seq = [0.1, 1.7, 0.2, 4.0, 0.3, 9.0], [0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 2, 2]
    talr, ce = _tracker("talr", ell0, group, seq), _tracker("ce", ell0, group, seq)
    assert talr.tau() == pytest.approx(2.1)  # per-sequence means 0.9, 2.1, 4.65
    assert ce.tau() is None
    drops = torch.tensor([0.02, 0.4], dtype=torch.float64)
    for _ in range(60):
        m_talr, m_ce = talr.step(drops), ce.step(drops)
    assert float(talr.ell[5]) > 7.0 and float(ce.ell[5]) < 1.0  # its weight exp(-9 / 2.1) ~ 0.014
    assert float(talr.ell[1]) < 0.5  # the mildly hard token is learned
    assert float(m_talr[1]) > 2.0 > 0.5 > float(m_ce[1])
    seq_means = [(float(talr.ell[0]) + float(talr.ell[1])) / 2, (float(talr.ell[2]) + float(talr.ell[3])) / 2,
                 (float(talr.ell[4]) + float(talr.ell[5])) / 2]
    assert talr.tau() == pytest.approx(float(np.median(seq_means)))


def test_l2_relaxation_takes_an_explicit_second_moment():
    """``moment(sl)`` replaces sum_kl rho_k rho_l sq_kl: with the same values both agree; with a
    larger sigma^2 (the batch noise kept) the pull holds less."""
    from sft.forecast import l2_relaxation

    torch.manual_seed(0)
    sq = torch.rand(3, 10) + 0.1
    sq[1] = 0.05
    delta = torch.randn(10)
    rho = torch.tensor([0.3, 0.7], dtype=torch.float64)
    w = torch.tensor([0.09, 2 * 0.21, 0.49])
    a = l2_relaxation(delta, sq, 0.5, 0.1, rho=rho)
    b = l2_relaxation(delta, sq, 0.5, 0.1, rho=rho, moment=lambda sl: (w[:, None] * sq[:, sl]).sum(0))
    assert torch.allclose(a, b, rtol=1e-6)
    c = l2_relaxation(delta, sq, 0.5, 0.1, rho=rho, moment=lambda sl: 4 * (w[:, None] * sq[:, sl]).sum(0))
    assert bool((c.abs() >= a.abs() - 1e-7).all()) and bool((c.abs() > a.abs()).any())


def test_token_tracker_forecast_on_the_smoke_world(smoke_world, pretrained):
    """The moments keep the probe batches' tokens (their group means are ``ell0``); a forecast with
    ``token_tracker`` is finite, CE's gain grows with the rate and stays below the tokens' whole loss."""
    from sft.world_runs import general_sample
    from sft.forecast import method_gradients
    from sft.forecast_run import probe_batches, forecast_grid

    model, _, _ = pretrained
    w = smoke_world
    cfg = ForecastConfig(methods=("ce", "talr", "l2"), lrs=(3e-4, 1e-3, 3e-3), steps=20, batch=8, n_batches=2,
                         n_general=32, probe_steps=4, pad_token_id=w.pad_id, token_tracker=True)
    gm = method_gradients(model, probe_batches(w.d2_train, cfg, np.random.default_rng(0))[0], "talr",
                          pad_token_id=w.pad_id, micro_batch=3)
    tk = gm.tokens
    assert tk.ell0.numel() == round(float(gm.tokens_per_seq.sum()) * 16)  # every supervised token of 2 x 8 rows
    for k in range(2):
        assert float(tk.ell0[tk.group == k].mean()) == pytest.approx(float(gm.ell0[k]), rel=1e-6)
    assert int(tk.seq.max()) + 1 == 16
    rows = forecast_grid(model, w.d2_train, general_sample(w, 32), cfg, progress=False)["rows"]
    assert all(np.isfinite([r["dL_P1_bits"], r["domain_gain_bits"]]).all() for r in rows)
    gains = [r["domain_gain_bits"] for r in rows if r["method"] == "ce"]
    whole = float((gm.ell0 * gm.tokens_per_seq).sum()) / np.log(2)
    assert 0 < gains[0] <= gains[1] <= gains[2] < 1.5 * whole


def test_ce_moments_carry_the_groups_and_temperatures_of_their_batches(smoke_world, pretrained):
    """CE's gradient pass sees the probe examples at theta0, so the probe's token groups, FLOW's
    temperature and TALR's per-batch tau are read from its tokens instead of three more forward
    passes: they equal the passes' values (micro-batched: tau from a whole batch, not a micro-batch),
    and the forecast's gradient part is then exactly 1 forward + 2 backwards per token and weighting."""
    from sft import losses as L
    from sft.data import PadCollator
    from sft.forecast import method_gradients, sequence_losses
    from sft.forecast_run import HARD_GROUP_P, forecast_grid, probe_batches, token_groups
    from sft.models import token_nll
    from sft.world_runs import general_sample

    model, _, _ = pretrained
    w = smoke_world
    cfg = ForecastConfig(methods=("ce", "talr", "flow"), lrs=(1e-4, 1e-3), steps=12, batch=8, n_batches=2,
                         n_general=32, probe_steps=4, pad_token_id=w.pad_id, micro_batch=3)
    batches, _ = probe_batches(w.d2_train, cfg, np.random.default_rng(cfg.seed))
    examples = [ex for b in batches for ex in b]
    tok = method_gradients(model, batches, "ce", pad_token_id=w.pad_id, micro_batch=3).tokens
    groups = token_groups(model, examples, w.pad_id, HARD_GROUP_P, ComputeMeter())
    assert len(tok.hard_by_sequence()) == len(groups) == 16
    assert all(np.array_equal(a, b) for a, b in zip(tok.hard_by_sequence(), groups))
    assert tok.sequence_means() == pytest.approx(sequence_losses(model, examples, pad_token_id=w.pad_id)[1], rel=1e-5)
    collate = PadCollator(w.pad_id)
    want = []
    for b in batches:  # each batch's tau from the whole batch at once (a pre-pass would run it in micro-batches)
        c = collate(list(b))
        nll, si = token_nll(model, c["input_ids"], c["attention_mask"], c["labels"])
        want.append(float(L.talr_tau(L.sequence_mean_losses(nll, si, len(b)))))
    assert tok.batch_taus([8, 8]) == pytest.approx(want, rel=1e-5)
    assert len(set(want)) == 2  # two batches, two taus: a mix-up of their rows would show
    res = forecast_grid(model, w.d2_train, general_sample(w, 32), cfg, progress=False)
    c = res["compute"]
    n_tok = sum(int(collate(list(b))["attention_mask"].sum()) for b in batches)
    assert c["parts"]["gradients"] * c["training_run_units"] == pytest.approx(3 * 5 * n_tok)


def test_bf16_moments_keep_the_batch_noise_where_it_is_small_beside_the_mean():
    """The moments are stored centred (Welford), so bf16 storage keeps a batch noise that is small
    beside the mean: sigma = 0.2 |mean| here (the noise 4 % of E_b[g^2], SmolLM2's label batches on
    average). Read as bf16(sq) - bf16(mean)^2 (the storage before session 9) the noise is off by 27 %
    (median) and zero or negative at 16 % of coordinates, and SmolLM2's replay then moved 300x too far;
    Welford's error is 2^-8 |mean| / sigma, the raw form's 2^-8 mean^2 / sigma^2."""
    from sft.forecast import StreamedMoments

    torch.manual_seed(0)
    n, P = 2, 50000
    mu = torch.randn(2, P) * 1e-3
    g = mu + 0.2 * mu.abs() * torch.randn(n, 2, P)  # [batches, groups, coordinates]
    acc = StreamedMoments([torch.zeros(P)], False, torch.bfloat16)  # the noise in bf16 too (noise_dtype)
    for b in range(n):
        acc.add([[g[b, 0]], [g[b, 1]]])
    acc.cov /= n
    c = (g - g.mean(0)).double()
    exact = torch.stack([(c[:, k] * c[:, l]).mean(0) for k, l in ((0, 0), (0, 1), (1, 1))])
    got = acc.cov.double()
    for j in (0, 2):  # the variances: 1.3 % median error, none lost
        assert float(((got[j] - exact[j]).abs() / exact[j]).median()) < 0.03
        assert float((got[j] <= 0).double().mean()) == 0.0
    assert float((acc.mean.double() - g.mean(0)).abs().max() / mu.abs().max()) < 1e-2
    naive = (g * g).mean(0)[0].to(torch.bfloat16).double() - g.mean(0)[0].to(torch.bfloat16).double() ** 2
    assert float(((naive - exact[0]).abs() / exact[0]).median()) > 0.2  # the raw form: noise lost to rounding
    assert float((naive <= 0).double().mean()) > 0.1


def test_replay_records_the_decorrelation_factor_it_applied():
    """`replay_adam` (per step and in blocks) leaves on the moments the F by which it shortened the path:
    1 without a rotation; with one, the `decorrelation` of the straight path's steps (recomputed here
    from the straight path's prefixes), and the displacement is the straight one x sqrt(F)."""
    from sft.forecast import decorrelation

    g = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(5))
    lrs = cosine_lrs(0.05, 6)

    def run(lc, n=6, block=1):
        gm = _gg(g, ce_mean=torch.randn(2, 6, generator=torch.Generator().manual_seed(1)) * 0.1)
        gm.keep_norm, gm.lam_c = True, lc
        gm.path_F = -1.0  # overwritten by every replay
        delta = replay_adam(gm, "ce", lrs[:n], block=block)[0]
        return delta, gm.path_F

    assert run(1e300)[1] == 1.0 and run(float("inf"))[1] == 1.0
    straight = [torch.zeros(6)] + [run(1e300, n)[0] for n in range(1, 7)]
    steps = [float((straight[t] - straight[t - 1]).norm()) for t in range(1, 7)]
    lam = np.concatenate([[0.0], np.cumsum(lrs)[:-1]])
    d, F = run(0.07)
    assert 0.3 < F < 1.0 and F == pytest.approx(decorrelation(steps, lam, 0.07), rel=1e-6)
    assert d.tolist() == pytest.approx((straight[-1] * F**0.5).tolist(), rel=1e-5, abs=1e-8)
    assert run(0.07, block=3)[1] == pytest.approx(F, rel=0.05)


@settings(max_examples=60, deadline=None)
@given(F=st.floats(1e-4, 1.0), c=st.floats(1e-3, 1e3), e=st.floats(0.0, 1e3))
def test_additive_dl_is_version_5_in_the_quadratic_regime_and_smaller_beyond(F, c, e):
    """`additive_dl`: for a damage quadratic in the step (c s^2) it returns the straight path's value at
    any F; with a quartic part (c s^2 + e s^4) it is c + e F <= c + e, equal only at F = 1 or e = 0;
    the parts are scaled like the total."""
    from sft.forecast_run import additive_dl

    calls = []

    def at(scale):
        calls.append(scale)
        return c * scale**2 + e * scale**4, {"kl_term_bits": c * scale**2}

    dl, parts = additive_dl(at, F)
    assert dl == pytest.approx(c + e * F, rel=1e-9)
    assert parts["kl_term_bits"] == pytest.approx(c, rel=1e-9)
    assert dl <= c + e + 1e-9 * (c + e)
    assert calls == [pytest.approx(F**0.5)] if F < 1.0 else calls == [1.0]


@pytest.mark.parametrize("F", [0.0, -0.5, 1.5, float("nan")])
def test_additive_dl_refuses_a_factor_outside_0_1(F):
    from sft.forecast_run import additive_dl

    with pytest.raises(ValueError, match="path_F"):
        additive_dl(lambda s: (s, {}), F)


def test_sample_kl_is_the_coarsened_kl_of_the_coded_positions(smoke_world, pretrained):
    """`SampleKL`: 0 at theta0; with every outcome kept it is sum_u KL(q0_u || q_u) over the supervised
    positions computed here from the logits; with fewer kept (the rest lumped) it is smaller; quadratic
    in a small step (KL(s d) / s^2 constant as s -> 0)."""
    from sft.forecast import Shifted
    from sft.forecast_run import LN2, SampleKL, coded_log_probs
    from sft.world_runs import general_sample

    model, _, _ = pretrained
    w = smoke_world
    d1 = general_sample(w, 12)
    V = model.config.vocab_size
    full, top = SampleKL(model, d1, w.pad_id, top=V), SampleKL(model, d1, w.pad_id, top=3)
    assert full(model) == pytest.approx(0.0, abs=1e-9) and top(model) == pytest.approx(0.0, abs=1e-9)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    delta = torch.randn(n, generator=torch.Generator().manual_seed(3)) * 0.02
    lp0 = torch.cat(list(coded_log_probs(model, d1, w.pad_id))).double()
    with Shifted(model, delta):
        lp1 = torch.cat(list(coded_log_probs(model, d1, w.pad_id))).double()
        kl_full, kl_top = full(model), top(model)
    by_hand = float((lp0.exp() * (lp0 - lp1)).sum()) / len(d1) / LN2
    assert kl_full == pytest.approx(by_hand, rel=1e-4) and kl_full > 0  # float32 rows: the lumped rest ~1e-7
    assert 0 <= kl_top < kl_full
    small = []
    for s in (0.1, 0.05):
        with Shifted(model, delta, scale=s):
            small.append(full(model) / s**2)
    assert small[0] == pytest.approx(small[1], rel=0.05)
    with pytest.raises(ValueError, match="top"):
        SampleKL(model, d1, w.pad_id, top=0)


def test_additive_forecast_on_the_smoke_world(smoke_world, pretrained):
    """``additive`` on a D1 sample without a tree: the configurations' dL and the size probe's replays are
    the sample's KL term (`SampleKL`, never negative), the probes' measured points stay the measured code
    length change; without a rotation every F is 1; with the probe's rotation each keep_norm row records
    its F (as version 5's rows do), LoRA's is 1, and a row's KL is taken at sqrt(F) x its displacement."""
    from sft.forecast_run import forecast_grid
    from sft.world_runs import general_sample

    model, _, _ = pretrained
    w = smoke_world
    d1 = general_sample(w, 32)
    cfg = ForecastConfig(methods=("ce", "l2", "lora", "talr"), lrs=(3e-4, 3e-3), steps=20, batch=8,
                         n_batches=2, n_general=32, probe_steps=4, pad_token_id=w.pad_id)
    flat = forecast_grid(model, w.d2_train, d1, replace(cfg, coherence=False, additive=True), progress=False)
    assert [r["path_F"] for r in flat["rows"]] == [1.0] * len(flat["rows"])
    assert all(r["replay_dL_P1_bits"] >= 0 for r in flat["rows"])
    v5 = forecast_grid(model, w.d2_train, d1, cfg, progress=False)
    v7 = forecast_grid(model, w.d2_train, d1, replace(cfg, additive=True), progress=False)
    assert v7["probe"]["lambda_c"] == v5["probe"]["lambda_c"] < 1.0
    assert [p[:2] for p in v7["probe"]["size_points"]] == [p[:2] for p in v5["probe"]["size_points"]]
    assert all(p[2] >= 0 for p in v7["probe"]["size_points"])
    for r5, r7 in zip(v5["rows"], v7["rows"]):
        assert (r5["method"], r5["lr"], r5["path_F"]) == (r7["method"], r7["lr"], r7["path_F"])
        assert r7["replay_dL_P1_bits"] >= 0
        assert r7["path_F"] == 1.0 if r7["method"] == "lora" else 0.0 < r7["path_F"] < 1.0


def test_diffusion_pieces_hand_values():
    """`sum_sq_rate`, `ou_factor` (1 without a pull, the OU recursion by hand, smaller with a stronger pull),
    `diffusion_coefficient` (each probe's measured dL over its own S2, log-interpolated in peak rate, held
    outside, non-positive probes left out) and `random_walk`."""
    from sft.forecast import diffusion_coefficient, ou_factor, random_walk, sum_sq_rate

    assert sum_sq_rate([0.1, 0.2]) == pytest.approx(0.05)
    lrs = np.array([0.1, 0.1, 0.05])
    assert ou_factor(lrs, 0.0) == 1.0
    V = 0.0
    for e in lrs:
        V = V * (1 - 2.0 * e) ** 2 + e * e
    assert ou_factor(lrs, 2.0) == pytest.approx(V / 0.0225)
    assert ou_factor(lrs, 4.0) < ou_factor(lrs, 2.0) < 1.0
    steps, k = 50, 5
    s_lo, s_hi = (sum_sq_rate(cosine_lrs(p, steps)[:k]) for p in (1e-4, 1e-3))
    pts = [(1e-4, 2.0 * s_lo, 0.0), (1e-3, 8.0 * s_hi, 0.0)]  # c = 2 at 1e-4, 8 at 1e-3
    assert diffusion_coefficient(pts, 1e-4, steps, k) == pytest.approx(2.0)
    assert diffusion_coefficient(pts, 10 ** -3.5, steps, k) == pytest.approx(4.0)  # geometric middle
    assert diffusion_coefficient(pts, 1e-5, steps, k) == pytest.approx(2.0)  # held
    assert diffusion_coefficient(pts, 1e-2, steps, k) == pytest.approx(8.0)
    neg = [(1e-4, -0.5, 0.0), (1e-3, 8.0 * s_hi, 0.0)]  # a first-order gain gives no c
    assert diffusion_coefficient(neg, 1e-4, steps, k) == pytest.approx(8.0)
    assert diffusion_coefficient([(1e-4, -0.5, 0.0)], 1e-4, steps, k) == 0.0
    assert random_walk(1e-5, 3e-4) and not random_walk(1e-3, 3e-4) and not random_walk(float("inf"), 3e-4)


def test_lora_diffusion_factor_is_s2_r_over_3_fan_in_per_adapted_weight():
    """Hand value: two adapted matrices (4 x 6 and 2 x 3) of a 100-parameter model, r 2, alpha 4 (s = 2):
    (24 x 4 x 2 / 18 + 6 x 4 x 2 / 9) / 100; and it is peft's init: Var(A0) = 1 / (3 fan_in)."""
    from sft.forecast import lora_diffusion_factor

    layout = [(0, 4, 6, 0), (24, 2, 3, 1)]
    assert lora_diffusion_factor(layout, 100, 2, 4) == pytest.approx((24 * 8 / 18 + 6 * 8 / 9) / 100)
    A = torch.empty(2000, 300)
    torch.nn.init.kaiming_uniform_(A, a=5**0.5)  # peft's lora_A init
    assert float(A.var()) == pytest.approx(1 / (3 * 300), rel=0.02)


def test_diffusion_forecast_on_the_smoke_world(smoke_world, pretrained):
    """``size_model="diffusion"``: every row's dL is c(eta) S2 x its method's factor from the size probes'
    measured points (TALR's equal to CE's at a rate, L2's below by `ou_factor`, LoRA's by its layout's
    factor); the replay still gives the domain gain (equal to the replay model's) and the accuracy point's r.
    ``"auto"`` on the smoke world (a coherent probe: lam_c beyond one step) is the replay model's forecast."""
    from sft.forecast import diffusion_dl, lora_diffusion_factor, lora_layout
    from sft.forecast_run import forecast_grid
    from sft.world_runs import general_sample

    model, _, _ = pretrained
    w = smoke_world
    d1 = general_sample(w, 32)
    cfg = ForecastConfig(methods=("ce", "l2", "lora", "talr"), lrs=(3e-4, 3e-3), steps=20, batch=8,
                         n_batches=2, n_general=32, probe_steps=4, pad_token_id=w.pad_id, **VERSION7)
    v5 = forecast_grid(model, w.d2_train, d1, replace(cfg, size_model="replay"), progress=False)
    diff = forecast_grid(model, w.d2_train, d1, replace(cfg, size_model="diffusion"), progress=False)
    pts = diff["probe"]["size_points"]
    assert pts == v5["probe"]["size_points"]
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = lora_diffusion_factor(lora_layout(model), n, cfg.lora_r, cfg.lora_alpha)
    by = {(r["method"], r["lr"]): r for r in diff["rows"]}
    for (m, lr), r in by.items():
        want, _ = diffusion_dl(m, lr, pts, steps=20, probe_steps=4, n_params=n, l2_coeff=cfg.l2_coeff,
                               max_grad_norm=1.0, lora_factor=lora)
        assert r["dL_P1_bits"] == pytest.approx(want) and r["S2"] > 0
        v5_row = next(x for x in v5["rows"] if (x["method"], x["lr"]) == (m, lr))
        assert r["replay_model_dL_P1_bits"] == pytest.approx(v5_row["dL_P1_bits"])  # version 5's, kept beside
    for lr in cfg.lrs:
        assert by[("talr", lr)]["dL_P1_bits"] == pytest.approx(by[("ce", lr)]["dL_P1_bits"])
        assert by[("l2", lr)]["dL_P1_bits"] < by[("ce", lr)]["dL_P1_bits"]
        assert by[("lora", lr)]["method_factor"] == pytest.approx(lora)
    assert [r["domain_gain_bits"] for r in diff["rows"]] == [r["domain_gain_bits"] for r in v5["rows"]]
    auto = forecast_grid(model, w.d2_train, d1, replace(cfg, size_model="auto"), progress=False)
    assert v5["probe"]["lambda_c"] > v5["probe"]["lr"]  # coherent over more than one step
    assert auto["rows"] == v5["rows"]


def test_diffusion_coefficient_below_the_probes_hand_values():
    """`diffusion_coefficient`'s ``below``: "hold" keeps the lowest probe's c below it; "equilibrium" follows the
    probes' log-log slope there only where c rises as the rate falls (dL growing slower than eta^2: the walk
    equilibrates), else holds; between and above the probes both are the interpolation and the held top c."""
    from sft.forecast import cosine_lrs, diffusion_coefficient, diffusion_dl, sum_sq_rate

    def at(p, gamma):  # a probe whose dL grows as p^gamma: c ~ p^(gamma - 2)
        return (p, p ** gamma / 1e-8 * sum_sq_rate(cosine_lrs(p, 20)[:4]) / p ** 2 * 1e-8, math.nan)

    lin = [at(2e-4, 1.0), at(8e-4, 1.0)]  # gamma = 1: c halves per doubling of the rate
    c0 = diffusion_coefficient(lin, 2e-4, 20, 4)
    assert diffusion_coefficient(lin, 5e-5, 20, 4) == pytest.approx(c0)  # held
    assert diffusion_coefficient(lin, 5e-5, 20, 4, below="equilibrium") == pytest.approx(4 * c0)  # two halvings back
    assert diffusion_coefficient(lin, 4e-4, 20, 4, below="equilibrium") == pytest.approx(c0 / 2)
    assert diffusion_coefficient(lin, 3.2e-3, 20, 4, below="equilibrium") == pytest.approx(c0 / 4)  # held above
    steep = [at(2e-4, 3.0), at(8e-4, 3.0)]  # gamma = 3: c rises with the rate, held below in both
    assert diffusion_coefficient(steep, 5e-5, 20, 4, below="equilibrium") == \
        pytest.approx(diffusion_coefficient(steep, 2e-4, 20, 4))
    kw = dict(steps=20, probe_steps=4, n_params=10, l2_coeff=0.01, max_grad_norm=1.0)
    hold, _ = diffusion_dl("ce", 5e-5, lin, **kw)
    assert diffusion_dl("ce", 5e-5, lin, c_below="equilibrium", **kw)[0] == pytest.approx(4 * hold)
    with pytest.raises(ValueError, match="below"):
        diffusion_coefficient(lin, 1e-4, 20, 4, below="extrapolate")
    with pytest.raises(ValueError, match="c_below"):
        ForecastConfig(c_below="linear")
    assert ForecastConfig().c_below == "equilibrium"  # version 9
    assert replace(ForecastConfig(), **VERSION8).c_below == "hold"


def test_split_pieces_hand_values():
    """`first_order_at`: linear through 0 below the smallest probe's summed rate, linear in log summed rate
    between the probes, held above; `split_dl` = that term + `diffusion_dl` on the probes' KL terms alone."""
    from sft.forecast import cosine_lrs, diffusion_dl, first_order_at, split_dl

    pts = [(1e-4, -2.0, 5.0), (1e-3, -6.0, 80.0)]
    lam = [float(cosine_lrs(p, 20)[:4].sum()) for p, _, _ in pts]
    assert first_order_at(pts, lam[0] / 4, 20, 4) == pytest.approx(-0.5)
    assert first_order_at(pts, lam[0], 20, 4) == pytest.approx(-2.0)
    mid = math.sqrt(lam[0] * lam[1])
    assert first_order_at(pts, mid, 20, 4) == pytest.approx(-4.0)
    assert first_order_at(pts, 10 * lam[1], 20, 4) == pytest.approx(-6.0)
    assert first_order_at([], 1e-3, 20, 4) == 0.0
    assert first_order_at(pts, 0.0, 20, 4) == 0.0
    kw = dict(steps=20, probe_steps=4, n_params=1000, l2_coeff=0.01, max_grad_norm=1.0, lora_factor=0.1)
    for m, lr in (("ce", 3e-4), ("l2", 3e-4), ("lora", 1e-3), ("talr", 5e-5)):
        dl, parts = split_dl(m, lr, pts, **kw)
        kl, _ = diffusion_dl(m, lr, [(p, k, math.nan) for p, _, k in pts], **kw)
        fo = first_order_at(pts, float(cosine_lrs(lr, 20).sum()), 20, 4)
        assert dl == pytest.approx(fo + kl) and parts["kl_term_forecast"] == pytest.approx(kl)
        assert parts["first_order_forecast"] == pytest.approx(fo) and fo < 0 < kl


def test_first_order_split_forecast_on_the_smoke_world(smoke_world, pretrained):
    """``first_order=True`` on diffusion rows: each size probe's dL splits exactly into its per-prefix terms
    (first-order + KL over the full vocabulary = the probe's measured dL, Proposition 3.1), the rows are
    `split_dl` of those points, the domain gains are untouched, and under ``"auto"`` on a coherent world
    (the replay) the flag changes no row."""
    from sft.forecast import lora_diffusion_factor, lora_layout, split_dl
    from sft.forecast_run import forecast_grid
    from sft.world_runs import general_sample

    model, _, _ = pretrained
    w = smoke_world
    d1 = general_sample(w, 32)
    cfg = ForecastConfig(methods=("ce", "l2", "lora", "talr"), lrs=(3e-4, 3e-3), steps=20, batch=8,
                         n_batches=2, n_general=32, probe_steps=4, pad_token_id=w.pad_id, size_model="diffusion",
                         **VERSION7)
    diff = forecast_grid(model, w.d2_train, d1, cfg, progress=False)
    split = forecast_grid(model, w.d2_train, d1, replace(cfg, first_order=True), progress=False)
    pts, sp = split["probe"]["size_points"], split["probe"]["size_split"]
    assert pts == diff["probe"]["size_points"] and len(sp) == 2
    for (p, measured, _), (q, fo, kl) in zip(pts, sp):
        assert p == q and kl >= 0
        assert fo + kl == pytest.approx(measured, rel=1e-4, abs=1e-6)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = lora_diffusion_factor(lora_layout(model), n, cfg.lora_r, cfg.lora_alpha)
    for r in split["rows"]:
        want, parts = split_dl(r["method"], r["lr"], sp, steps=20, probe_steps=4, n_params=n, l2_coeff=cfg.l2_coeff,
                               max_grad_norm=1.0, lora_factor=lora)
        assert r["dL_P1_bits"] == pytest.approx(want)
        assert r["first_order_forecast"] == pytest.approx(parts["first_order_forecast"])
    assert [r["domain_gain_bits"] for r in split["rows"]] == [r["domain_gain_bits"] for r in diff["rows"]]
    auto = replace(cfg, size_model="auto")
    assert forecast_grid(model, w.d2_train, d1, replace(auto, first_order=True), progress=False)["rows"] == \
        forecast_grid(model, w.d2_train, d1, auto, progress=False)["rows"]


def test_walk_step_shapes_and_the_equal_displacement_rate(pretrained):
    """`walk_step`: std eps on every trainable coordinate, or LoRA's merged-update std eps s sqrt(r / (3 in)) on
    the adapted matrices only; `diffusion_dl` with ``walk_rate="equal"`` reads c at lr sqrt(factor) (CE, factor 1,
    unchanged)."""
    from sft.forecast import cosine_lrs, diffusion_coefficient, diffusion_dl, lora_layout, sum_sq_rate, walk_step

    model, _, _ = pretrained
    params = [p for p in model.parameters() if p.requires_grad]
    full = walk_step(model, 0.01, 3)
    assert full.numel() == sum(p.numel() for p in params) and float(full.std()) == pytest.approx(0.01, rel=0.02)
    layout = lora_layout(model)
    lora = walk_step(model, 0.01, 3, layout, 4, 8)
    adapted = {i: (off, out, fan_in) for off, out, fan_in, i in layout}
    off = 0
    for i, p in enumerate(params):
        part = lora[off:off + p.numel()]
        if i in adapted:
            assert adapted[i][0] == off
            want = 0.01 * 2 * math.sqrt(4 / (3 * adapted[i][2]))
            assert float(part.std()) == pytest.approx(want, rel=0.15)
        else:
            assert not part.any()
        off += p.numel()
    pts = [(1e-4, 2.0, math.nan), (1e-3, 400.0, math.nan)]  # c doubles from 1e-4 to 1e-3
    kw = dict(steps=20, probe_steps=4, n_params=10**6, l2_coeff=0.01, max_grad_norm=1.0, lora_factor=0.01)
    eq, parts = diffusion_dl("lora", 1e-3, pts, walk_rate="equal", **kw)
    assert parts["c_rate"] == pytest.approx(1e-4)
    want = diffusion_coefficient(pts, 1e-4, 20, 4) * sum_sq_rate(cosine_lrs(1e-3, 20)) * 0.01
    assert eq == pytest.approx(want) and eq < diffusion_dl("lora", 1e-3, pts, **kw)[0]
    assert diffusion_dl("ce", 3e-4, pts, walk_rate="equal", **kw)[0] == pytest.approx(diffusion_dl("ce", 3e-4, pts, **kw)[0])
    with pytest.raises(ValueError, match="walk_rate"):
        diffusion_dl("ce", 3e-4, pts, walk_rate="nominal", **kw)


def test_lora_share_by_fisher_on_the_smoke_world(smoke_world, pretrained):
    """``lora_share="fisher"``: the LoRA row's factor is the measured KL ratio of a LoRA-shaped random step to a
    full one (positive, below 1: a subset of the coordinates at a smaller std), the same at twice the step (both
    quadratic), and no other row moves."""
    from sft.forecast_run import ForecastGrid, forecast_grid
    from sft.world_runs import general_sample

    model, _, _ = pretrained
    w = smoke_world
    d1 = general_sample(w, 32)
    cfg = ForecastConfig(methods=("ce", "lora", "talr"), lrs=(3e-4, 3e-3), steps=20, batch=8, n_batches=2,
                         n_general=32, probe_steps=4, pad_token_id=w.pad_id, size_model="diffusion", **VERSION7)
    count = forecast_grid(model, w.d2_train, d1, cfg, progress=False)
    fisher = forecast_grid(model, w.d2_train, d1, replace(cfg, lora_share="fisher"), progress=False)
    share = fisher["probe"]["lora_share"]
    assert 0 < share["factor"] < 1 and share["factor"] == pytest.approx(share["kl_lora_bits"] / share["kl_full_bits"])
    for a, b in zip(count["rows"], fisher["rows"]):
        if a["method"] == "lora":
            assert b["method_factor"] == pytest.approx(share["factor"])
            assert a["method_factor"] == pytest.approx(share["count_factor"])
            assert b["dL_P1_bits"] == pytest.approx(a["dL_P1_bits"] * share["factor"] / share["count_factor"])
        else:
            assert b["dL_P1_bits"] == pytest.approx(a["dL_P1_bits"])
    grid = ForecastGrid(model, w.d2_train, d1, replace(cfg, lora_share="fisher"), None)
    grid.layout = __import__("sft.forecast", fromlist=["lora_layout"]).lora_layout(model)
    twice = grid.measure_lora_share(2 * share["eps"])["factor"]
    assert twice == pytest.approx(share["factor"], rel=0.1)
    with pytest.raises(ValueError, match="lora_share"):
        ForecastConfig(lora_share="trace")


def test_versions_9_and_8_are_version_7_where_the_switch_keeps_the_replay(smoke_world, pretrained):
    """Versions 9's and 8's settings (``method_walk``, ``lora_share="fisher"``; 9: ``c_below="equilibrium"``) move
    only diffusion rows: on the smoke world, whose calibration probe is coherent (``size_model="auto"`` keeps the
    replay, as on every tiny world stored), their rows, probe record and metered compute are version 7's, and no
    split, share or factor is measured. Under ``"diffusion"`` version 8's rows differ from version 7's exactly
    where a factor applies (LoRA, TALR), and version 9's CE rows from version 8's only below the lowest probe, and
    there only where the probes' c rises as the rate falls (then by c's slope: larger)."""
    from sft.forecast_run import forecast_grid
    from sft.world_runs import general_sample

    model, _, _ = pretrained
    w = smoke_world
    d1 = general_sample(w, 32)
    cfg = ForecastConfig(methods=("ce", "lora", "talr"), lrs=(3e-4, 3e-3), steps=20, batch=8, n_batches=2,
                         n_general=32, probe_steps=4, pad_token_id=w.pad_id)
    assert cfg.method_walk and cfg.lora_share == "fisher" and cfg.c_below == "equilibrium"
    v9 = forecast_grid(model, w.d2_train, d1, cfg, progress=False)
    v8 = forecast_grid(model, w.d2_train, d1, replace(cfg, **VERSION8), progress=False)
    v7 = forecast_grid(model, w.d2_train, d1, replace(cfg, **VERSION7), progress=False)
    assert v9["probe"]["lambda_c"] > v9["probe"]["lr"]  # coherent: the replay
    assert v9["rows"] == v8["rows"] == v7["rows"] and v9["probe"] == v8["probe"] == v7["probe"]
    assert not {"size_split", "lora_share", "method_factors"} & set(v9["probe"])
    assert v9["compute"] == v8["compute"] == v7["compute"]
    diff9 = forecast_grid(model, w.d2_train, d1, replace(cfg, size_model="diffusion"), progress=False)
    diff8 = forecast_grid(model, w.d2_train, d1, replace(cfg, size_model="diffusion", **VERSION8), progress=False)
    diff7 = forecast_grid(model, w.d2_train, d1, replace(cfg, size_model="diffusion", **VERSION7), progress=False)
    assert {"size_split", "lora_share", "method_factors"} <= set(diff8["probe"])
    for a, b in zip(diff7["rows"], diff8["rows"]):
        same = a["dL_P1_bits"] == pytest.approx(b["dL_P1_bits"])
        assert same == (a["method"] == "ce"), a["method"]
    pts = sorted((p, m / float((cosine_lrs(p, 20)[:4] ** 2).sum())) for p, m, _ in diff9["probe"]["size_points"])
    rising = len(pts) == 2 and min(c for _, c in pts) > 0 and pts[0][1] > pts[1][1]  # c rises as the rate falls
    for a, b in zip(diff8["rows"], diff9["rows"]):
        if a["method"] != "ce":
            continue
        if a["lr"] < pts[0][0] and rising:
            slope = math.log(pts[1][1] / pts[0][1]) / math.log(pts[1][0] / pts[0][0])
            assert b["dL_P1_bits"] / a["dL_P1_bits"] == pytest.approx((a["lr"] / pts[0][0]) ** slope, rel=1e-9)
            assert b["dL_P1_bits"] > a["dL_P1_bits"]
        else:
            assert b["dL_P1_bits"] == pytest.approx(a["dL_P1_bits"], rel=1e-12)


def test_adam_directions_hand_values_and_method_step_grad_is_the_trainers_loss(smoke_world, pretrained):
    """`adam_directions`: u_b = g_b / sqrt(mean_b g_b^2) per coordinate, 0 where no batch moves it (hand values);
    `method_step_grad` for CE and TALR is the gradient of the trainer's own loss (`sft.losses.sft_loss`, TALR's tau
    the batch median, over the batch's tokens), and FLOW's needs its temperature."""
    from sft import losses as L
    from sft.data import PadCollator
    from sft.forecast import adam_directions, method_step_grad

    us = adam_directions([torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([-1.0, 0.0, 0.0, 4.0])])
    want = [[1.0, 0.0, 2 / math.sqrt(2), 3 / math.sqrt(12.5)], [-1.0, 0.0, 0.0, 4 / math.sqrt(12.5)]]
    for u, w in zip(us, want):
        assert u.tolist() == pytest.approx(w)
    assert ((us[0] ** 2 + us[1] ** 2) / 2).tolist() == pytest.approx([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        adam_directions([])
    model, _, _ = pretrained
    w = smoke_world
    batch = list(w.d2_train[:4])
    b = PadCollator(w.pad_id)(batch)
    for method in ("ce", "talr"):
        g = method_step_grad(model, batch, method, pad_token_id=w.pad_id)
        model.zero_grad()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        L.sft_loss(method, logits, b["labels"]).backward()  # sum_t w_t ell_t / the batch's tokens
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
        model.zero_grad()
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-7), method
    with pytest.raises(ValueError, match="flow_tau"):
        method_step_grad(model, batch, "flow", pad_token_id=w.pad_id)


def test_method_walk_on_the_smoke_world(smoke_world, pretrained):
    """``method_walk`` (candidate 9): each own-weighting method's diffusion row is version 7's plus (factor - 1) x
    the walk's KL part (the factor: the mean KL of its Adam-normalised batch steps over CE's on the same batches;
    the KL part: the diffusion of the probes' KL terms alone, hand values too), CE's family (CE, L2,
    LoRA) does not move, the factor is the same at twice a small step (both KL terms quadratic), and a bad weight
    factor is refused."""
    from sft.forecast import diffusion_dl, method_walk_factor
    from sft.forecast_run import ForecastGrid, forecast_grid
    from sft.world_runs import general_sample

    model, _, _ = pretrained
    w = smoke_world
    d1 = general_sample(w, 32)
    cfg = ForecastConfig(methods=("ce", "l2", "talr", "dft"), lrs=(3e-4, 3e-3), steps=20, batch=8, n_batches=3,
                         n_general=32, probe_steps=4, pad_token_id=w.pad_id, size_model="diffusion", **VERSION7)
    blind = forecast_grid(model, w.d2_train, d1, cfg, progress=False)
    aware = forecast_grid(model, w.d2_train, d1, replace(cfg, method_walk=True), progress=False)
    mf = aware["probe"]["method_factors"]
    assert set(mf["factors"]) == {"talr", "dft"} and mf["n_batches"] == 4
    for m, f in mf["factors"].items():
        assert 0 < f < 10 and f == pytest.approx(method_walk_factor(mf["kl_bits"][m], mf["kl_bits"]["ce"]))
    split = aware["probe"]["size_split"]  # the probes' (rate, first-order, KL): the factor scales the KL part only
    assert len(split) == 2 and all(k > 0 for _, _, k in split)
    kw = dict(steps=20, probe_steps=4, n_params=sum(p.numel() for p in model.parameters()), l2_coeff=0.01,
              max_grad_norm=1.0)
    for a, b in zip(blind["rows"], aware["rows"]):
        f = mf["factors"].get(a["method"], 1.0)
        kl_only = diffusion_dl(a["method"], a["lr"], [(p, k, math.nan) for p, _, k in split], **kw)[0]
        assert b["dL_P1_bits"] == pytest.approx(a["dL_P1_bits"] + (f - 1) * kl_only, rel=1e-6), a["method"]
        assert b["weight_factor"] == pytest.approx(f)
    grid = ForecastGrid(model, w.d2_train, d1, replace(cfg, method_walk=True), None)
    small = grid.measure_method_factors(1e-4)["factors"]  # the quadratic regime (the tiny model's probe step is not)
    twice = grid.measure_method_factors(2e-4)["factors"]
    for m in mf["factors"]:
        assert twice[m] == pytest.approx(small[m], rel=0.05)
    assert math.isnan(method_walk_factor([1.0], [0.0]))
    pts = [(1e-4, 2.0, math.nan)]
    hand = dict(steps=20, probe_steps=4, n_params=10, l2_coeff=0.01, max_grad_norm=1.0)
    base, parts = diffusion_dl("talr", 1e-4, pts, **hand)  # c = 2 / S2(probe): dL = c S2(run)
    kl = [(1e-4, 3.0, math.nan)]  # the probe's KL term 3 (its first-order term -1): c_KL = 1.5 c
    assert diffusion_dl("talr", 1e-4, pts, weight_factor=2.0, kl_points=kl, **hand)[0] == pytest.approx(2.5 * base)
    assert diffusion_dl("talr", 1e-4, pts, weight_factor=2.0, **hand)[0] == pytest.approx(2.0 * base)
    assert diffusion_dl("talr", 1e-4, pts, weight_factor=0.5, kl_points=kl, **hand)[0] == pytest.approx(0.25 * base)
    with pytest.raises(ValueError, match="weight_factor"):
        diffusion_dl("talr", 1e-4, pts, steps=20, probe_steps=4, n_params=10, l2_coeff=0.01, max_grad_norm=1.0,
                     weight_factor=-1.0)

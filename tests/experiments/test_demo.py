"""The smoke-size demo runs end to end and its report has every section, with numbers."""
import json
import math
import re

import numpy as np
import pytest

from experiments.studies.demo import bounds_of_run, make_config, run_demo
from experiments.studies.demo_report import pareto_front


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = make_config("smoke", out=str(out), cache_dir=str(out / "cache"), progress=False)
    res = run_demo(cfg)
    return out, res


def test_report_has_every_section_with_numbers(demo):
    out, _ = demo
    text = (out / "report.md").read_text()
    for heading in ["(a) Trade-off plane", "(b) Bound vs measured", "(c) Token probabilities",
                    "(d) Claims ledger", "(e) Table (paper Tables 1-2 analogue)", "Findings, tested"]:
        assert heading in text, heading
    for variant in ("cot", "label"):
        for fig in ("tradeoff", "bound", "tokens"):
            png = out / f"{fig}_{variant}.png"
            assert png.exists() and png.stat().st_size > 5000
            assert f"({png.name})" in text
    # findings are stated with numbers, not placeholders
    f1 = re.findall(r"Finding 1 .*?equal domain gain of ([-\d.]+) bits.*?by ([-\d.]+) bits.*?vs ([-\d.]+)", text)
    assert len(f1) == 2
    assert re.search(r"Finding 2 .*?ratio large/small lr is [-\d.]+ label-only vs [-\d.]+ CoT", text)
    assert re.search(r"TALR at the large lr:\*\* retention ranking", text)
    assert re.search(r"bound tightness:\*\* Theorem E.4 bound / measured dL\(P1\) over \d+ runs", text)
    ledger = text.split("(d) Claims ledger")[1]
    for cid in ("Proposition 3.1", "Lemma E.1", "Theorem B.1 (= E.1)", "Theorem B.2 (= E.4)", "Theorem 3.2"):
        assert f"| {cid} |" in ledger, cid  # every ledger row under its one spelling
    assert "{" not in text and "None" not in text


def test_results_are_consistent_with_the_measured_curves(demo):
    out, res = demo
    saved = json.loads((out / "results.json").read_text())
    assert saved["findings"].keys() == res["findings"].keys()
    for variant, v in res["variants"].items():
        base = v["base"]
        assert 0 <= v["pretrain"]["kl_p1_bits"] < v["pretrain"]["H_p1_bits"]
        for name, r in v["runs"].items():
            last = r["points"][-1]
            assert last["step"] == 12
            assert r["dL_P1_bits"] == pytest.approx(last["kl_p1_bits"] - base["kl_p1_bits"])
            assert r["domain_gain_bits"] == pytest.approx(base["cond_code_len_p2_bits"] - last["cond_code_len_p2_bits"])
            assert len(r["lams"]) == 2  # one fitted step per evaluation interval
            assert all(np.isfinite(r["lams"]))
        # CE at the larger learning rate moves further: more domain gain
        assert v["runs"]["ce@0.01"]["domain_gain_bits"] > v["runs"]["ce@0.001"]["domain_gain_bits"]


def test_pareto_front():
    pts = [(0.0, 0.0), (1.0, 1.0), (2.0, 0.5), (0.5, 2.0), (1.0, 0.5)]
    assert pareto_front(pts) == [3, 1, 2]


HAND = dict(M_h=2.0, M_l=0.5, w_S=0.25, H_T=3.0, C1=2.0, C2=1.0, mu_T=1.0)  # A = 3 (0.5 * 2 + 0.5) = 4.5


def test_bounds_of_run_by_hand():
    """The demo's bound curve is Theorem E.3, A Lambda_t + C1 S_t with S_t the sum of SQUARED steps
    (negative fitted steps count as 0), and its E.4 point the equal-steps bound at the measured
    gain, both in bits. Hand values: replacing S_t by Lambda_t^2 anywhere on the path fails here."""
    from theory.bounds import Constants

    ln2 = math.log(2)
    b = bounds_of_run(Constants(**HAND), [0.1, -0.2, 0.3], gain_bits=1.0 / ln2)  # gain = 1 nat
    # Lambda_t = 0.1, 0.1, 0.4;  S_t = 0.01, 0.01, 0.1
    want = [4.5 * 0.1 + 2 * 0.01, 4.5 * 0.1 + 2 * 0.01, 4.5 * 0.4 + 2 * 0.1]
    assert b["e3_curve_bits"] == pytest.approx([w / ln2 for w in want], rel=1e-12)
    assert b["A"] == pytest.approx(4.5)
    # T = 3 intervals, Delta_* = 1 nat: no equal-steps schedule exists (needs T > 4 C2 Delta / mu^2 = 4)
    assert b["e4_bound_bits"] is None and "T > 4" in b["e4_error"]
    # T = 10: Lambda = T/(2 C2) (mu - sqrt(mu^2 - 4 C2 Delta/T)) = 5 (1 - sqrt(0.6))
    b = bounds_of_run(Constants(**HAND), [0.1] * 10, gain_bits=1.0 / ln2)
    lam = 5 * (1 - math.sqrt(0.6))
    assert b["e4_bound_bits"] == pytest.approx((4.5 * lam + 2 * lam**2 / 10) / ln2, rel=1e-12)


def test_demo_results_use_the_theory_bounds(demo):
    """Every run's stored curve and E.4 point are what `bounds_of_run` gives for its fitted steps,
    gain and the variant's constants (no second formula in the demo)."""
    from theory.bounds import Constants

    out, res = demo
    for v in res["variants"].values():
        c = Constants(**{k: v["constants"][k] if v["constants"][k] is not None else float("nan")
                         for k in ("M_h", "M_l", "w_S", "beta", "gamma", "H_T", "mu_T", "C1", "C2")})
        for r in v["runs"].values():
            b = bounds_of_run(c, r["lams"], r["domain_gain_bits"])
            assert r["e3_curve_bits"] == b["e3_curve_bits"] and len(r["e3_curve_bits"]) == len(r["lams"])
            assert r["e4_bound_bits"] == b["e4_bound_bits"]

import pytest

from theory.claims import format_ledger, run_ledger


@pytest.fixture(scope="module")
def ledger():
    return {c.id: c for c in run_ledger(n=1000, seed=0)}


CORRECTED = [
    "Proposition 3.1 per prefix (new)", "Lemma E.1 corrected", "Lemma E.2 corrected", "Oracle inequality corrected",
    "Theorem B.1 (= E.1) corrected", "Theorem E.2 corrected", "Theorem E.3 corrected", "Theorem 3.1 corrected",
    "Theorem 3.2 / B.3 (= E.5) corrected", "Proposition 3.1 per prefix, KL bound (new)",
    "Theorem 3.2 / B.3 (= E.5) corrected, T > 1",
]

# SNAPSHOT: the ledger's verdict strings as of this commit. This pins the ledger's own output (a
# change of wording or verdict must be made here on purpose); the tests below it check the numbers
# behind the verdicts (counterexamples, tightness >= 1), which is where the ledger could be wrong.
EXPECTED = {
    "Proposition 3.1": "holds",
    "Lemma E.1": "fails",
    "Lemma E.2": "holds (leakage step is a non sequitur)",
    "Lemma E.3": "holds",
    "Theorem B.1 (= E.1)": "fails",
    "Theorem E.2": "fails",
    "Theorem E.3": "holds (loose)",
    "Theorem B.2 (= E.4)": "holds (bound); not reflected by exact tilting",
    "Theorem B.3 (= E.5)": "holds (loose)",
    "Theorem 3.1": "fails (not implied by E.4)",
    "Theorem 3.2": "holds only asymptotically",
    "Oracle inequality (E.2-E.4)": "fails",
    **{c: "holds" for c in CORRECTED},
}


def test_verdicts_pinned(ledger):
    """Snapshot of every verdict (see EXPECTED)."""
    assert {k: v.verdict for k, v in ledger.items()} == EXPECTED


def test_counterexamples_carry_numbers(ledger):
    e1 = ledger["Lemma E.1"].counterexample
    assert e1["depth"] >= 2 and e1["gap"] > 1e-6
    e2 = ledger["Lemma E.2"].counterexample
    assert e2["realised_shift_second_moment"] > e2["effective_bound"]
    b1 = ledger["Theorem B.1 (= E.1)"].counterexample
    assert b1["slope"] < 0.6 and b1["decades"] >= 2
    t31 = ledger["Theorem 3.1"].counterexample
    assert t31["thm31_bound"] < t31["E4_bound_at_lam"]
    e4 = ledger["Theorem B.2 (= E.4)"].counterexample["equal_gain_rho_uniform"]
    assert max(r["dL_P1_nats"] for r in e4) - min(r["dL_P1_nats"] for r in e4) < 1e-9


def test_tightness_is_at_least_one_for_valid_bounds(ledger):
    for cid in ("Theorem E.2", "Theorem E.3", "Lemma E.2"):
        assert ledger[cid].tightness["min"] >= 1 - 1e-9


def test_format(ledger):
    text = format_ledger(list(ledger.values()))
    assert "Theorem 3.1" in text and "counterexample" in text


def test_every_check_uses_at_least_1000_instances_except_simulations(ledger):
    for cid, c in ledger.items():
        if cid in ("Theorem B.1 (= E.1)", "Theorem E.3"):
            assert c.n_instances >= 10  # simulation-based: trajectories / slope fits
        else:
            assert c.n_instances >= 1000, cid


def test_corrected_statements_hold_and_follow_the_paper_statement(ledger):
    ids = list(ledger)
    for cid in CORRECTED:
        c = ledger[cid]
        assert c.n_violations == 0 and c.tightness["min"] >= 1 - 1e-9, cid
        assert ids.index(cid) > ids.index(c.corrects), cid  # listed after the statement it corrects


def test_oracle_and_e2_counterexamples(ledger):
    o = ledger["Oracle inequality (E.2-E.4)"].counterexample
    assert o["depth"] >= 2 and o["gain_rate"] < o["paper_rate"]
    e2 = ledger["Theorem E.2"].counterexample
    assert e2["exact_d2"] > e2["paper_lin2"] or e2["exact_d1"] > e2["paper_lin1"]


def test_every_corrected_entry_reports_its_power(ledger):
    for cid in CORRECTED:
        pw = ledger[cid].power
        assert set(pw) == {"1%", "10%"} and all(0 <= v <= 1 for v in pw.values()), cid
        assert pw["1%"] <= pw["10%"], cid  # a stronger statement is caught at least as often
    kl = ledger["Proposition 3.1 per prefix, KL bound (new)"]
    assert kl.n_instances >= 1000 and kl.n_violations == 0
    assert kl.power["10%"] > 0.01  # the KL check catches a 10% too strong bound
    text = format_ledger([ledger["Oracle inequality corrected"], kl])
    assert "power:" in text


def test_lambda_max_at_T_above_one_needs_the_trajectory_constants(ledger):
    c = ledger["Theorem 3.2 / B.3 (= E.5) corrected, T > 1"]
    assert c.n_violations == 0
    import re
    counts = [int(x) for x in re.findall(r"(\d+) \(T = (?:2|10|100)\)", c.note)]
    assert len(counts) == 3 and counts[-1] > 0  # q_0's one-step constants fail at T = 100


# a slope fit and an asymptotic proportionality: no "1% stronger" form of the statement
NO_POWER = {"Theorem B.1 (= E.1)", "Theorem 3.2"}
# algebra in the constants (or SGD runs of the softmax world): no trees for the hard family to enter
NO_TREES = {"Theorem B.1 (= E.1)", "Theorem B.2 (= E.4)", "Theorem B.3 (= E.5)", "Theorem 3.1", "Theorem 3.2"}


def test_every_entry_reports_power_or_says_why_not(ledger):
    for cid, c in ledger.items():
        if cid in NO_POWER:
            assert c.power is None and "Power: not defined" in c.note, cid
            assert "power: not defined" in format_ledger([c])
            continue
        assert set(c.power) == {"1%", "10%"}, cid
        assert 0 < c.power["1%"] <= c.power["10%"] <= 1, cid  # every check catches a 1% too strong statement


def test_every_check_on_trees_draws_from_the_hard_family(ledger):
    for cid, c in ledger.items():
        if cid in NO_TREES:
            assert c.n_hard is None and ("does not enter" in c.note or "not applicable" in c.note), cid
        else:
            assert c.n_hard >= 0.3 * c.n_instances, cid
            assert f"hard family: {c.n_hard} of" in format_ledger([c])


def test_hard_instances_keep_the_paper_results_and_the_corrections(ledger):
    # the paper's failures are still found, now also on hard-family worlds; corrected forms still hold
    assert "of them in the hard family" in ledger["Lemma E.1"].note
    assert ledger["Lemma E.1"].n_violations > 0.5 * ledger["Lemma E.1"].n_instances
    for cid in ("Proposition 3.1", "Lemma E.3"):  # exact identities: power ~ 1
        assert ledger[cid].n_violations == 0 and ledger[cid].power["1%"] > 0.9, cid
    assert ledger["Oracle inequality corrected"].power["10%"] > 0.1  # was 0 before the hard family


def test_power_identity_hand_values():
    from theory.claim import power, power_identity

    # lhs = rhs exactly: a 1% error is seen where |0.01 rhs| > tol (rhs = 1), not where rhs = 0
    assert power_identity([1.0, 0.0], [1.0, 0.0], 1e-9) == {"1%": 0.5, "10%": 0.5}
    assert power_identity([1.0], [1.0], 0.05) == {"1%": 0.0, "10%": 1.0}
    # upper bound 1 on actual 0.95: 10% stronger (0.9) is violated, 1% stronger (0.99) is not
    assert power([0.95], [1.0]) == {"1%": 0.0, "10%": 1.0}
    assert power([1.05], [1.0], lower=True) == {"1%": 0.0, "10%": 1.0}

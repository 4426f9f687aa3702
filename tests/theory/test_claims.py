import pytest

from theory.claims import format_ledger, run_ledger


@pytest.fixture(scope="module")
def ledger():
    return {c.id: c for c in run_ledger(n=24, seed=0)}


# SNAPSHOT: the ledger's verdict strings as of this commit. This pins the ledger's own output (a
# change of wording or verdict must be made here on purpose); the tests below it check the numbers
# behind the verdicts (counterexamples, tightness >= 1), which is where the ledger could be wrong.
EXPECTED = {
    "Proposition 3.1": "holds",
    "Lemma E.1": "fails",
    "Lemma E.2": "holds (leakage step is a non sequitur)",
    "Lemma E.3": "holds",
    "Theorem B.1 (= E.1)": "fails",
    "Theorem E.2": "holds (loose)",
    "Theorem E.3": "holds (loose)",
    "Theorem B.2 (= E.4)": "holds (bound); not reflected by exact tilting",
    "Theorem B.3 (= E.5)": "holds (loose)",
    "Theorem 3.1": "fails (not implied by E.4)",
    "Theorem 3.2": "holds only asymptotically",
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

import ast
import math
from collections import Counter

import pytest

from sft.eval.medcalc import ASSISTANT_PREFIX, COLUMNS, is_correct, load_medcalc, sft_target
from sft.eval.synth_medcalc import CALCULATORS, generate, write_synthetic_csv

N = 140


@pytest.fixture(scope="module")
def rows():
    return generate(N, seed=11)


def _kg(v):
    value, unit = v
    return value * 0.453592 if unit == "lb" else value


def _cm(v):
    value, unit = v
    return value * 2.54 if unit == "in" else value


def _ibw(sex, cm):
    return (50.0 if sex == "Male" else 45.5) + 2.3 * (cm / 2.54 - 60)


def recompute(cid: int, e: dict) -> float:
    """Each calculator from its textbook formula, independently of the generator."""
    if cid == 6:
        return _kg(e["weight"]) / (_cm(e["height"]) / 100) ** 2
    if cid == 5:
        return (2 * e["Diastolic Blood Pressure"][0] + e["Systolic Blood Pressure"][0]) / 3
    if cid == 39:
        return e["Sodium"][0] - e["Chloride"][0] - e["Bicarbonate"][0]
    if cid == 10:
        return _ibw(e["sex"], _cm(e["height"]))
    if cid == 11:
        return e["QT interval"][0] * math.sqrt(e["Heart Rate or Pulse"][0] / 60)
    if cid == 2:
        kg, cm = _kg(e["weight"]), _cm(e["height"])
        scr = e["creatinine"][0] / (88.4 if e["creatinine"][1] == "µmol/L" else 1.0)
        bmi = kg / (cm / 100) ** 2
        ibw = _ibw(e["sex"], cm)
        w = kg if bmi < 18.5 else (min(ibw, kg) if bmi < 25 else ibw + 0.4 * (kg - ibw))
        return (140 - e["age"][0]) * w * (0.85 if e["sex"] == "Female" else 1.0) / (72 * scr)
    if cid == 4:
        age = e["age"][0]
        return ((age >= 65) + (age >= 75) + (e["sex"] == "Female") + e["congestive heart failure"]
                + e["hypertension"] + 2 * e["a prior stroke"] + e["peripheral arterial disease"]
                + e["type 2 diabetes mellitus"])
    raise AssertionError(cid)


def test_covers_every_calculator_in_official_columns(rows):
    assert len(CALCULATORS) >= 5
    assert Counter(int(r["Calculator ID"]) for r in rows) == {c: N // len(CALCULATORS) for c in CALCULATORS}
    assert all(tuple(r) == COLUMNS and all(isinstance(v, str) for v in r.values()) for r in rows)
    assert len({r["Note ID"] for r in rows}) == N


def test_deterministic_in_the_seed():
    assert generate(20, seed=3) == generate(20, seed=3)
    assert generate(20, seed=3) != generate(20, seed=4)
    assert [r["Calculator ID"] for r in generate(4, seed=0, calculators=[6, 39])] == ["6", "39", "6", "39"]
    with pytest.raises(ValueError, match="unknown calculator"):
        generate(3, calculators=[999])


def test_answers_recomputed_independently(rows):
    for r in rows:
        cid = int(r["Calculator ID"])
        want = recompute(cid, ast.literal_eval(r["Relevant Entities"]))
        truth = float(r["Ground Truth Answer"])
        if r["Output Type"] == "integer":
            assert truth == want, r
        else:
            assert truth == pytest.approx(want, abs=5e-4), r
            lo, hi = float(r["Lower Limit"]), float(r["Upper Limit"])
            assert lo == pytest.approx(0.95 * truth, abs=1e-6) and hi == pytest.approx(1.05 * truth, abs=1e-6)


def test_every_row_passes_its_own_judge(rows):
    for r in rows:
        assert is_correct(r["Ground Truth Answer"], r)
        assert is_correct(ASSISTANT_PREFIX + sft_target(r), r)
        if r["Output Type"] == "decimal":
            assert not is_correct(str(float(r["Ground Truth Answer"]) * 1.1 + 0.01), r)
        else:
            assert not is_correct(str(int(r["Ground Truth Answer"]) + 1), r)


def test_explanations_carry_hard_tokens(rows):
    text = "\n".join(r["Ground Truth Explanation"] for r in rows)
    for token in ("0.453592", "2.54 cm", "88.4", "2.3 kg * (height in inches - 60)", "prior stroke/TIA/thromboembolism 2"):
        assert token in text
    for r in rows:  # the rationale ends on the answer it supports
        if r["Output Type"] == "decimal":
            assert r["Ground Truth Answer"].rstrip("0").rstrip(".") in r["Ground Truth Explanation"].split("=")[-1]


def test_csv_round_trip(tmp_path, rows):
    p = tmp_path / "synth.csv"
    written = write_synthetic_csv(p, N, seed=11)
    assert written == rows
    assert load_medcalc(p) == rows


def test_one_generator_per_calculator():
    """The per-calculator table covers exactly the calculators listed, and an unknown id says which exist."""
    import numpy as np
    import pytest

    from sft.eval.synth_medcalc import CASES, CALCULATORS, case

    assert set(CASES) == set(CALCULATORS)
    with pytest.raises(ValueError, match=r"calculator id 3; choose from \[2, 4, 5, 6, 10, 11, 39\]"):
        case(3, np.random.default_rng(0))

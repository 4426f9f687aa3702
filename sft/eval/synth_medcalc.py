"""Synthetic MedCalc-like data: patient notes, step-by-step rationales and exact answers for seven
real MedCalc-Bench calculators, in the official CSV format, so real-LLM SFT runs end to end offline.

Calculators (official ids, names and categories of MedCalc-Bench v1.0):

====  ===============================================  ========  =========
id    name                                             category  type
====  ===============================================  ========  =========
2     Creatinine Clearance (Cockcroft-Gault Equation)  lab       decimal
4     CHA2DS2-VASc Score for Atrial Fibrillation ...   risk      integer
5     Mean Arterial Pressure (MAP)                     physical  decimal
6     Body Mass Index (BMI)                            physical  decimal
10    Ideal Body Weight                                physical  decimal
11    QTc Bazett Calculator                            physical  decimal
39    Anion Gap                                        lab       decimal
====  ===============================================  ========  =========

Decimal answers are rounded to 3 places; Lower/Upper Limit are the answer times 0.95 and 1.05 as
in the real set. Rationales carry the clinically specific "hard tokens" of Section 4.3: unit
conversion factors (1 lb = 0.453592 kg, 1 in = 2.54 cm, creatinine 88.4 umol/L per mg/dL), the
Devine ideal-body-weight constants (50 / 45.5 kg + 2.3 kg per inch over 60) and score weights.
Notes also mention values the calculator does not use. Output is a function of the seed only
(numpy's PCG64 generator).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from .medcalc import COLUMNS, write_medcalc_csv

CALCULATORS = {
    2: ("Creatinine Clearance (Cockcroft-Gault Equation)", "lab", "decimal"),
    4: ("CHA2DS2-VASc Score for Atrial Fibrillation Stroke Risk", "risk", "integer"),
    5: ("Mean Arterial Pressure (MAP)", "physical", "decimal"),
    6: ("Body Mass Index (BMI)", "physical", "decimal"),
    10: ("Ideal Body Weight", "physical", "decimal"),
    11: ("QTc Bazett Calculator", "physical", "decimal"),
    39: ("Anion Gap", "lab", "decimal"),
}
LB_TO_KG = 0.453592
IN_TO_CM = 2.54
CREAT_UMOL_PER_MGDL = 88.4

_QUESTIONS = {
    2: ("Using the Cockcroft-Gault equation, what is the patient's creatinine clearance in mL/min? "
        "Use the adjusted body weight if the patient is overweight or obese by BMI, the smaller of "
        "ideal and actual body weight if BMI is normal, and the actual body weight if underweight."),
    4: "What is the patient's CHA2DS2-VASc score?",
    5: "What is the patient's mean arterial pressure in mm Hg?",
    6: "What is the patient's body mass index (BMI) in kg/m²?",
    10: "Using the ideal body weight formula, what is the patient's ideal body weight in kg?",
    11: "Using the Bazett formula, what is the patient's corrected QT interval in msec?",
    39: "What is the patient's anion gap in mEq/L?",
}
_COMPLAINTS = ("fatigue", "shortness of breath", "palpitations", "a productive cough", "dizziness",
               "lower back pain", "swelling of both ankles", "intermittent chest discomfort")
_HISTORY = ("congestive heart failure", "hypertension", "a prior stroke", "peripheral arterial disease",
            "type 2 diabetes mellitus")


def _fmt(x: float, nd: int = 3) -> str:
    """Round to nd places and drop trailing zeros (25.2380 -> 25.238, 4.000 -> 4.0)."""
    s = f"{round(x, nd):.{nd}f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _sex_age(rng) -> tuple[str, int]:
    return ("male" if rng.random() < 0.5 else "female"), int(rng.integers(18, 95))


def _weight(rng, cm: float) -> tuple[float, str, float, str]:
    """(kg, unit shown, value shown, conversion sentence) for a BMI drawn from 16..42 kg/m^2."""
    kg = round(float(rng.uniform(16.0, 42.0)) * (cm / 100) ** 2, 1)
    if rng.random() < 0.4:
        lb = round(kg / LB_TO_KG, 1)
        kg = lb * LB_TO_KG
        return kg, "lb", lb, (f"The patient's weight is {lb} lb. Since 1 lb = {LB_TO_KG} kg, this is "
                               f"{lb} lb * {LB_TO_KG} kg/lb = {_fmt(kg)} kg.")
    return kg, "kg", kg, f"The patient's weight is {kg} kg."


def _height(rng) -> tuple[float, str, float, str]:
    """(cm, unit shown, value shown, conversion sentence)."""
    cm = round(float(rng.uniform(150.0, 195.0)), 1)
    if rng.random() < 0.4:
        inch = round(cm / IN_TO_CM, 1)
        cm = inch * IN_TO_CM
        return cm, "in", inch, (f"The patient's height is {inch} in. Since 1 in = {IN_TO_CM} cm, this is "
                                 f"{inch} in * {IN_TO_CM} cm/in = {_fmt(cm)} cm.")
    return cm, "cm", cm, f"The patient's height is {cm} cm."


def _ibw(sex: str, cm: float) -> tuple[float, str]:
    base = 50.0 if sex == "male" else 45.5
    inches = cm / IN_TO_CM
    ibw = base + 2.3 * (inches - 60)
    text = (f"The ideal body weight formula is {base} kg (for a {sex} patient) + 2.3 kg * (height in inches - 60). "
            f"The height is {_fmt(cm)} cm / {IN_TO_CM} cm/in = {_fmt(inches)} in, so the ideal body weight is "
            f"{base} + 2.3 * ({_fmt(inches)} - 60) = {_fmt(ibw)} kg.")
    return ibw, text


def _intro(rng, sex, age) -> str:
    who = "man" if sex == "male" else "woman"
    article = "An" if str(age).startswith("8") or age in (11, 18) else "A"
    return f"{article} {age}-year-old {who} presents with {_COMPLAINTS[int(rng.integers(len(_COMPLAINTS)))]}."


def _vitals(rng) -> str:
    return (f"Temperature {round(float(rng.uniform(36.2, 38.4)), 1)} °C, respiratory rate "
            f"{int(rng.integers(12, 24))} breaths/min, oxygen saturation {int(rng.integers(91, 100))}% on room air.")


# One function per calculator: ``(rng, sex, age, intro) -> (note, entities, exact answer, explanation)``.
# Each draws from ``rng`` in a fixed order, so the rows are a function of the seed only.
def _bmi(rng, sex: str, age: int, intro: str):
    cm, hu, hv, htext = _height(rng)
    kg, wu, wv, wtext = _weight(rng, cm)
    bmi = kg / (cm / 100) ** 2
    pronoun = "He" if sex == "male" else "She"
    note = f"{intro} {pronoun} weighs {wv} {wu} and is {hv} {hu} tall. {_vitals(rng)}"
    ent = {"weight": [wv, wu], "height": [hv, hu]}
    expl = (f"The formula for BMI is weight / (height * height), with weight in kg and height in m. {wtext} "
            f"{htext} That is {_fmt(cm)} cm / 100 = {_fmt(cm / 100)} m. The BMI is {_fmt(kg)} kg / "
            f"({_fmt(cm / 100)} m * {_fmt(cm / 100)} m) = {_fmt(bmi)} kg/m^2.")
    return note, ent, bmi, expl


def _map(rng, sex: str, age: int, intro: str):
    sbp = int(rng.integers(90, 190))
    dbp = int(rng.integers(50, min(sbp - 20, 120)))
    m = 2 / 3 * dbp + 1 / 3 * sbp
    note = (f"{intro} Blood pressure is {sbp}/{dbp} mm Hg and heart rate {int(rng.integers(55, 120))} "
            f"beats/min. {_vitals(rng)}")
    ent = {"Systolic Blood Pressure": [sbp, "mm hg"], "Diastolic Blood Pressure": [dbp, "mm hg"]}
    expl = (f"The mean arterial pressure is 2/3 * diastolic + 1/3 * systolic blood pressure. The systolic "
            f"pressure is {sbp} mm Hg and the diastolic pressure is {dbp} mm Hg, so MAP = 2/3 * {dbp} + "
            f"1/3 * {sbp} = {_fmt(m)} mm Hg.")
    return note, ent, m, expl


def _anion_gap(rng, sex: str, age: int, intro: str):
    while True:  # keep sodium in 125..155 and the gap in 3..30 mEq/L
        cl, hco3, gap = int(rng.integers(88, 112)), int(rng.integers(8, 30)), int(rng.integers(3, 31))
        na = cl + hco3 + gap
        if 125 <= na <= 155:
            break
    k = round(float(rng.uniform(3.1, 5.6)), 1)
    note = (f"{intro} Laboratory results: sodium {na} mEq/L, potassium {k} mEq/L, chloride {cl} mEq/L, "
            f"bicarbonate {hco3} mEq/L, glucose {int(rng.integers(80, 260))} mg/dL.")
    ent = {"Sodium": [na, "mEq/L"], "Chloride": [cl, "mEq/L"], "Bicarbonate": [hco3, "mEq/L"]}
    expl = (f"The anion gap is sodium - (chloride + bicarbonate); potassium is not used. Sodium is {na} mEq/L, "
            f"chloride is {cl} mEq/L and bicarbonate is {hco3} mEq/L, so the anion gap is {na} - ({cl} + "
            f"{hco3}) = {gap} mEq/L.")
    return note, ent, float(gap), expl


def _ideal_weight(rng, sex: str, age: int, intro: str):
    cm, hu, hv, htext = _height(rng)
    ibw, itext = _ibw(sex, cm)
    note = f"{intro} Height {hv} {hu}. {_vitals(rng)}"
    ent = {"sex": sex.capitalize(), "height": [hv, hu]}
    return note, ent, ibw, f"{htext} {itext}"


def _qtc_bazett(rng, sex: str, age: int, intro: str):
    hr = int(rng.integers(45, 160))
    qt = int(rng.integers(300, 480))
    rr = 60 / hr
    qtc = qt / math.sqrt(rr)
    note = f"{intro} ECG: sinus rhythm at {hr} beats/min, QT interval {qt} msec, QRS {int(rng.integers(80, 120))} msec."
    ent = {"Heart Rate or Pulse": [hr, "beats per minute"], "QT interval": [qt, "msec"]}
    expl = (f"The Bazett formula is QTc = QT / sqrt(RR), with RR = 60 / heart rate in seconds. The heart rate "
            f"is {hr} beats/min, so RR = 60 / {hr} = {_fmt(rr)} s. The QT interval is {qt} msec, so QTc = "
            f"{qt} / sqrt({_fmt(rr)}) = {_fmt(qtc)} msec.")
    return note, ent, qtc, expl


def _creatinine(rng) -> tuple[float, float | int, str, str]:
    """(serum creatinine in mg/dL, value shown, unit shown, conversion sentence); 40 % in umol/L."""
    if rng.random() < 0.4:
        umol = int(rng.integers(50, 400))
        scr = umol / CREAT_UMOL_PER_MGDL
        return scr, umol, "µmol/L", (f"The serum creatinine is {umol} µmol/L. Since 1 mg/dL = {CREAT_UMOL_PER_MGDL} "
                                     f"µmol/L, this is {umol} / {CREAT_UMOL_PER_MGDL} = {_fmt(scr)} mg/dL.")
    scr = round(float(rng.uniform(0.5, 4.5)), 1)
    return scr, scr, "mg/dL", f"The serum creatinine is {scr} mg/dL."


def _cockcroft_gault_weight(bmi: float, kg: float, ibw: float) -> tuple[float, str]:
    """The weight the question prescribes by BMI class, and the sentence that says so."""
    if bmi < 18.5:
        return kg, f"The BMI is {_fmt(bmi)} kg/m^2, so the patient is underweight and the actual weight, {_fmt(kg)} kg, is used."
    if bmi < 25:
        adj = min(ibw, kg)
        return adj, (f"The BMI is {_fmt(bmi)} kg/m^2, which is normal, so the smaller of the ideal body weight and "
                     f"the actual weight is used: min({_fmt(ibw)}, {_fmt(kg)}) = {_fmt(adj)} kg.")
    adj = ibw + 0.4 * (kg - ibw)
    return adj, (f"The BMI is {_fmt(bmi)} kg/m^2, so the patient is overweight or obese and the adjusted body weight "
                 f"is used: IBW + 0.4 * (weight - IBW) = {_fmt(ibw)} + 0.4 * ({_fmt(kg)} - {_fmt(ibw)}) = {_fmt(adj)} kg.")


def _creatinine_clearance(rng, sex: str, age: int, intro: str):
    cm, hu, hv, htext = _height(rng)
    kg, wu, wv, wtext = _weight(rng, cm)
    scr, cshow, cunit, ctext = _creatinine(rng)
    ibw, itext = _ibw(sex, cm)
    adj, wrule = _cockcroft_gault_weight(kg / (cm / 100) ** 2, kg, ibw)
    coef = 1.0 if sex == "male" else 0.85
    crcl = (140 - age) * adj * coef / (72 * scr)
    note = (f"{intro} Weight {wv} {wu}, height {hv} {hu}. Serum creatinine {cshow} {cunit}, blood urea "
            f"nitrogen {int(rng.integers(8, 60))} mg/dL. {_vitals(rng)}")
    ent = {"sex": sex.capitalize(), "age": [age, "years"], "weight": [wv, wu], "height": [hv, hu],
           "creatinine": [cshow, cunit]}
    expl = (f"The Cockcroft-Gault equation is CrCl = (140 - age) * adjusted weight * sex coefficient / "
            f"(72 * serum creatinine), with a coefficient of 1 for men and 0.85 for women. The patient is a "
            f"{age}-year-old {sex}, so the coefficient is {coef:g}. {ctext} {wtext} {htext} {itext} {wrule} "
            f"CrCl = (140 - {age}) * {_fmt(adj)} * {coef:g} / (72 * {_fmt(scr)}) = {_fmt(crcl)} mL/min.")
    return note, ent, crcl, expl


_CHA2DS2_VASC_WEIGHTS = {"congestive heart failure": 1, "hypertension": 1, "a prior stroke": 2,
                         "peripheral arterial disease": 1, "type 2 diabetes mellitus": 1}


def _cha2ds2_vasc(rng, sex: str, age: int, intro: str):
    has = {h: bool(rng.random() < 0.35) for h in _HISTORY}
    score_age = 0 if age < 65 else (1 if age < 75 else 2)
    parts = [(f"age {age}", score_age), (f"{sex} sex", 1 if sex == "female" else 0)]
    parts += [(h, _CHA2DS2_VASC_WEIGHTS[h] if has[h] else 0) for h in _HISTORY]
    score = sum(p for _, p in parts)
    present = [h for h in _HISTORY if has[h]]
    absent = [h for h in _HISTORY if not has[h]]
    hx = ("Her" if sex == "female" else "His") + " history includes " + (", ".join(present) if present else "no chronic illness") + "."
    deny = (" There is no history of " + ", ".join(absent) + ".") if absent and present else ""
    note = f"{intro} ECG shows atrial fibrillation. {hx}{deny} {_vitals(rng)}"
    ent = {"age": [age, "years"], "sex": sex.capitalize(), **{h: has[h] for h in _HISTORY}}
    steps = " ".join(f"{name}: +{pts}." for name, pts in parts)
    expl = (f"The CHA2DS2-VASc score adds: congestive heart failure 1, hypertension 1, age >= 75 years 2 "
            f"(65-74 years 1), diabetes 1, prior stroke/TIA/thromboembolism 2, vascular disease 1, female sex 1. "
            f"{steps} The total score is {' + '.join(str(p) for _, p in parts)} = {score}.")
    return note, ent, float(score), expl


CASES = {2: _creatinine_clearance, 4: _cha2ds2_vasc, 5: _map, 6: _bmi, 10: _ideal_weight, 11: _qtc_bazett,
          39: _anion_gap}  # one generator per key of CALCULATORS


def case(cid: int, rng) -> tuple[str, dict, float, str]:
    """(note, entities, exact answer, explanation) for one calculator."""
    if cid not in CASES:
        raise ValueError(f"no synthetic generator for calculator id {cid}; choose from {sorted(CALCULATORS)}")
    sex, age = _sex_age(rng)
    return CASES[cid](rng, sex, age, _intro(rng, sex, age))


def generate(n: int, seed: int = 0, calculators: Sequence[int] | None = None) -> list[dict]:
    """`n` rows in the official MedCalc-Bench columns (string values), calculators in round robin."""
    cids = list(calculators) if calculators is not None else sorted(CALCULATORS)
    unknown = [c for c in cids if c not in CALCULATORS]
    if unknown or not cids:
        raise ValueError(f"unknown calculator id(s) {unknown}; choose from {sorted(CALCULATORS)}")
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cid = cids[i % len(cids)]
        name, category, otype = CALCULATORS[cid]
        note, ent, exact, expl = case(cid, rng)
        if otype == "integer":
            truth = str(int(round(exact)))
            lo = hi = truth
        else:
            g = round(exact, 3)
            truth = _fmt(g)
            a, b = g * 0.95, g * 1.05
            lo, hi = _fmt(min(a, b), 6), _fmt(max(a, b), 6)
        rows.append({
            "Row Number": str(i + 1), "Calculator ID": str(cid), "Calculator Name": name,
            "Category": category, "Output Type": otype, "Note ID": f"synth-{seed}-{i + 1}",
            "Note Type": "Synthetic", "Patient Note": note, "Question": _QUESTIONS[cid],
            "Relevant Entities": repr(ent), "Ground Truth Answer": truth, "Lower Limit": lo,
            "Upper Limit": hi, "Ground Truth Explanation": expl,
        })
    assert all(tuple(r) == COLUMNS for r in rows)
    return rows


def write_synthetic_csv(path: str | os.PathLike, n: int, seed: int = 0,
                        calculators: Sequence[int] | None = None) -> list[dict]:
    """Generate rows and write them as an official-format CSV (atomic); return the rows."""
    rows = generate(n, seed, calculators)
    write_medcalc_csv(rows, path)
    return rows

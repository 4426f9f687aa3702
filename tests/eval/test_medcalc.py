import json
import zipfile
from collections import Counter
from datetime import date, timedelta

import pytest

from sft.eval import medcalc as mc
from sft.eval.medcalc import (ASSISTANT_PREFIX, MedCalcFormatError, accuracy, is_correct, load_medcalc,
                              parse_answer, split_by_note, write_medcalc_csv, write_sft_jsonl)

from evalhelpers import FIXTURES, MEDCALC_TEST

CSV = FIXTURES / "medcalc_small.csv"


@pytest.fixture(scope="module")
def rows():
    return {r["Row Number"]: r for r in load_medcalc(CSV)}


@pytest.fixture(scope="module")
def real_rows():
    return load_medcalc(MEDCALC_TEST)


def tagged(value: str) -> str:
    return f"Let me solve this step by step.\n<think>\nwork\n</think>\n<answer>\n{json.dumps({'answer': value})}\n</answer>"


# --------------------------------------------------------------------------- reading


def test_csv_and_zip_read_the_same_rows(rows):
    assert len(rows) == 7
    assert load_medcalc(FIXTURES / "medcalc_small.zip") == list(rows.values())
    r1 = rows["1"]
    assert r1["Patient Note"] == 'A 40-year-old "marathon" runner, 70 kg,\n175 cm tall.'
    assert r1["Lower Limit"] == "23.275" and r1["Output Type"] == "decimal"
    assert tuple(r1) == mc.COLUMNS


def _bad_copy(tmp_path, old, new, name="bad.csv"):
    text = CSV.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


@pytest.mark.parametrize("old,new,where", [
    # row 3 starts on line 6: row 1 spans lines 2-4 (two quoted line breaks)
    ("3,4,CHA2DS2-VASc Score for Atrial Fibrillation Stroke Risk,risk,integer",
     "3,4,CHA2DS2-VASc Score for Atrial Fibrillation Stroke Risk,risk,float", "line 6, field 'Output Type'"),
    ("-2.0,-2.1,-1.9", "-2.0,minus two,-1.9", "line 5, field 'Lower Limit'"),
    ("-2.0,-2.1,-1.9", "-2.0,-1.9,-2.1", "line 5, field 'Lower Limit'"),
    ("09/23/2014,09/23/2014,09/23/2014", "2014-09-23,09/23/2014,09/23/2014", "line 7, field 'Ground Truth Answer'"),
    ("\"('8 weeks', '0 days')\",", "eight weeks,", "line 9, field 'Ground Truth Answer'"),
    ("3,4,CHA2DS2", "three,4,CHA2DS2", "line 6, field 'Row Number'"),
    (",fx-2,", ",,", "line 5, field 'Note ID'"),
    ("\",3,3,3,", "\",x,3,3,", "line 6, field 'Ground Truth Answer'"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, old, new, where):
    path = _bad_copy(tmp_path, old, new)
    with pytest.raises(MedCalcFormatError) as e:
        load_medcalc(path)
    assert str(e.value).startswith(f"{path}: {where}")


def test_wrong_field_count_and_missing_column(tmp_path):
    path = _bad_copy(tmp_path, "Elderly (> 65): +1. Total 2.", "Elderly (> 65): +1. Total 2.,extra")
    with pytest.raises(MedCalcFormatError, match=r"bad\.csv: line 10: expected 14 fields, found 15"):
        load_medcalc(path)
    path = _bad_copy(tmp_path, ",Upper Limit,", ",Upper,", "nocol.csv")
    with pytest.raises(MedCalcFormatError, match=r"nocol\.csv: line 1: missing column\(s\) \['Upper Limit'\]"):
        load_medcalc(path)


def test_zip_without_csv_is_an_error(tmp_path):
    path = tmp_path / "train.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "nothing")
    with pytest.raises(MedCalcFormatError, match="holds no .csv"):
        load_medcalc(path)


def test_error_in_zip_names_the_member(tmp_path):
    bad = _bad_copy(tmp_path, "-2.0,-2.1,-1.9", "-2.0,?,-1.9")
    path = tmp_path / "train.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(bad, "train_data.csv")
    with pytest.raises(MedCalcFormatError, match=r"train\.zip!train_data\.csv: line 5, field 'Lower Limit'"):
        load_medcalc(path)


# --------------------------------------------------------------------------- judging rules


@pytest.mark.parametrize("answer,ok", [
    ("24.5", True), ("23.275", True), ("25.725", True),        # limits are inclusive
    ("23.27", False), ("25.73", False),
    ("24.6 kg/m²", True), ("The BMI is 22.857, so 24.0", True),  # last number
    ("2450%", True), ("24.5%", False),                          # official: x% -> x/100
    ("str(24 + 0.5)", True), ("str(70 / (1.75 ** 2))", False),  # arithmetic without eval
    ("str(round(24.5, 1)", True),                               # official: add a missing ')'
    ("str(__import__('os').getcwd())", False),
])
def test_decimal_rule(rows, answer, ok):
    assert is_correct(answer, rows["1"]) is ok
    assert is_correct(tagged(answer), rows["1"]) is ok


@pytest.mark.parametrize("answer,ok", [("-2.0", True), ("-2.1", True), ("-1.9", True), ("-2.2", False),
                                       ("2.0", False), ("-1.85", False)])
def test_decimal_rule_negative_truth(rows, answer, ok):
    assert is_correct(answer, rows["2"]) is ok


@pytest.mark.parametrize("answer,ok", [
    ("3", True), ("3.4", True), ("2.51", True), ("3.0", True),
    ("2.5", False),   # Python round: half to even -> 2
    ("3.5", False),   # -> 4
    ("3 out of 9", True), ("2 out of 3", False),
    ("1, 2, 3", True),  # official: a comma list counts its items
    ("The score is 3.", True), ("4", False), ("-3", False),
])
def test_integer_rule(rows, answer, ok):
    assert is_correct(answer, rows["3"]) is ok
    assert is_correct(tagged(answer), rows["3"]) is ok


@pytest.mark.parametrize("answer,ok", [
    ("09/23/2014", True), ("9/23/2014", True), ("09/23/2014 (Tuesday)", True),
    ("09/24/2014", False), ("2014-09-23", False), ("23/09/2014", False), ("Due: 09/23/2014", False),
])
def test_date_rule(rows, answer, ok):
    assert is_correct(answer, rows["4"]) is ok


def test_date_rule_calculator_68_and_impossible_dates(rows):
    assert is_correct("1/5/2020", rows["5"])
    assert not is_correct("01/06/2020", rows["5"])
    row = dict(rows["5"], **{"Ground Truth Answer": "02/28/2020"})
    assert not is_correct("02/30/2020", row)  # not a calendar date: unparsable
    assert parse_answer("02/30/2020", row) is None


@pytest.mark.parametrize("answer,ok", [
    ("(8, 0)", True), ("[8, 0]", True), ("('8 weeks', '0 days')", True), ("8 weeks, 0 days", True),
    ("8 weeks and 0 days", True), ("(0, 8)", False), ("(8, 1)", False),
    ("80", False),       # the official pattern would read (8, 0)
    ("8 weeks", False),  # no days: unparsable
])
def test_weeks_days_rule(rows, answer, ok):
    assert is_correct(answer, rows["6"]) is ok
    assert is_correct(tagged(answer), rows["6"]) is ok


@pytest.mark.parametrize("text", [
    "", "   ", "<answer></answer>", tagged("str(short_and_direct_answer_of_the_question)"),
    '{"answer": "X.XX"}', "I think\nthe score is high\nbut cannot tell", "<answer>\nno number\n</answer>",
])
def test_unparsable_is_incorrect(rows, text):
    for r in rows.values():
        assert parse_answer(text, r) is None
        assert not is_correct(text, r)


def test_answer_extraction_forms(rows):
    r = rows["3"]
    assert parse_answer('{"step_by_step_thinking": "1 + 1 + 1", "answer": "3"}', r) == 3
    assert parse_answer("{'answer': '3'}", r) == 3
    assert parse_answer('{"answer": 3}', r) == 3
    assert parse_answer("<think>score 1</think>\n<answer>{\"answer\": \"2\"}</answer>\n<answer>{\"answer\": \"3\"}</answer>", r) == 3
    assert parse_answer("<think>total 5</think>\n<answer>\n{\"answer\": \"3\"}", r) == 3  # unclosed tag
    assert parse_answer("<think>1 point</think><answer>3</answer>", r) == 3  # no JSON inside the tags
    assert parse_answer('blah {"answer": "4"} more\n<answer>{"answer": "3"}</answer>', r) == 3  # tags win


def test_accuracy_per_category_hand_counted(rows):
    ordered = list(rows.values())
    preds = ["24.0", "-3", "3", "09/23/2014", "garbage\nmore", "(8, 0)", "1"]
    #          ok     no    ok      ok          unparsed        ok       no
    res = accuracy(preds, ordered)
    assert res["n"] == 7 and res["n_correct"] == 4 and res["n_unparsed"] == 1
    assert res["accuracy"] == pytest.approx(4 / 7)
    assert res["per_category"] == {  # calculator 69 (row 6) is in Category "date"
        "date": {"accuracy": 2 / 3, "n": 3, "n_correct": 2},
        "lab": {"accuracy": 0.0, "n": 1, "n_correct": 0},
        "physical": {"accuracy": 1.0, "n": 1, "n_correct": 1},
        "risk": {"accuracy": 1 / 2, "n": 2, "n_correct": 1},
    }
    with pytest.raises(ValueError, match="6 predictions for 7 rows"):
        accuracy(preds[:6], ordered)


# --------------------------------------------------------------------------- the real v1.0 test file


def test_real_test_file_judged_against_itself(real_rows):
    assert len(real_rows) == 1047
    res = accuracy([r["Ground Truth Answer"] for r in real_rows], real_rows)
    assert res["accuracy"] == 1.0 and res["n_unparsed"] == 0
    assert {c: v["n"] for c, v in res["per_category"].items()} == {
        "date": 60, "diagnosis": 60, "dosage": 40, "lab": 327, "physical": 240, "risk": 240, "severity": 80}
    tagged_res = accuracy([tagged(r["Ground Truth Answer"]) for r in real_rows], real_rows)
    assert tagged_res["accuracy"] == 1.0
    rules = Counter(mc.rule_for(r) for r in real_rows)
    assert rules == {"decimal": 627, "integer": 360, "date": 40, "weeks_days": 20}


def _perturb(row, inside: bool) -> str:
    truth, kind = row["Ground Truth Answer"], mc.rule_for(row)
    if kind == "decimal":
        g = float(truth)
        return repr(g + 0.04 * abs(g)) if inside else repr(g + 0.06 * abs(g) + 0.001)
    if kind == "integer":
        return truth if inside else str(int(truth) + 1)
    if kind == "date":
        d = parse_answer(truth, row)
        return (d + timedelta(days=0 if inside else 1)).strftime("%m/%d/%Y")
    w, d = parse_answer(truth, row)
    return f"({w}, {d if inside else d + 1})"


def test_real_test_file_perturbed_answers(real_rows):
    assert accuracy([_perturb(r, True) for r in real_rows], real_rows)["accuracy"] == 1.0
    res = accuracy([_perturb(r, False) for r in real_rows], real_rows)
    assert res["accuracy"] == 0.0 and res["n_unparsed"] == 0


def test_real_file_truth_forms_parse(real_rows):
    by_rule = {}
    for r in real_rows:
        by_rule.setdefault(mc.rule_for(r), parse_answer(r["Ground Truth Answer"], r))
    assert isinstance(by_rule["date"], date)
    assert isinstance(by_rule["weeks_days"], tuple) and len(by_rule["weeks_days"]) == 2
    r69 = next(r for r in real_rows if r["Calculator ID"] == "69")
    assert r69["Ground Truth Answer"].startswith("('") and "weeks" in r69["Ground Truth Answer"]


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_and_disjoint_by_note(real_rows):
    tr1, ho1 = split_by_note(real_rows, 0.2, seed=7)
    tr2, ho2 = split_by_note(real_rows, 0.2, seed=7)
    assert tr1 == tr2 and ho1 == ho2
    assert len(tr1) + len(ho1) == len(real_rows) and ho1
    assert not {r["Note ID"] for r in tr1} & {r["Note ID"] for r in ho1}
    assert not {r["Patient Note"] for r in tr1} & {r["Patient Note"] for r in ho1}
    _, ho3 = split_by_note(real_rows, 0.2, seed=8)
    assert ho3 != ho1
    # without merging identical notes, the templated QTc notes can cross the split
    crossings = 0
    for seed in range(5):
        tr, ho = split_by_note(real_rows, 0.5, seed=seed, merge_identical_notes=False)
        crossings += len({r["Patient Note"] for r in tr} & {r["Patient Note"] for r in ho})
    assert crossings > 0


def test_split_fixture_keeps_note_together(rows):
    ordered = list(rows.values())
    assert split_by_note(ordered, 0.0) == (ordered, [])
    assert split_by_note(ordered, 1.0) == ([], ordered)
    held_counts = set()
    for seed in range(10):
        tr, ho = split_by_note(ordered, 0.5, seed=seed)
        sides = {("tr" if r in tr else "ho") for r in ordered if r["Note ID"] == "fx-3"}
        assert len(sides) == 1  # rows 3 and 7 share Note ID fx-3
        # 6 groups, ceil(0.5 * 6) = 3 held out: 3 rows, or 4 when the fx-3 pair is among them
        assert len(ho) == (4 if sides == {"ho"} else 3)
        held_counts.add(len(ho))
        assert [r for r in ordered if r in tr] == tr and [r for r in ordered if r in ho] == ho  # order kept
    assert held_counts == {3, 4}


# --------------------------------------------------------------------------- prompts and SFT files


def test_messages_follow_table_4(rows):
    msgs = mc.build_messages(rows["3"])
    assert msgs[0] == {"role": "system", "content": "You are a helpful assistant. You first think about the reasoning "
                       "process in the mind and then provide the user with the answer."}
    user = msgs[1]["content"]
    assert user.startswith("You are a helpful assistant for calculating a score for a given patient note. Please "
                           "think step-by-step to solve the question and then generate the required score.\n"
                           "Here is the patient note:\nA 70-year-old woman with hypertension, and atrial "
                           "fibrillation.\nHere is the task:\nWhat is the patient's CHA2DS2-VASc score?\n")
    assert user.endswith('<answer>\n{"answer": str(short_and_direct_answer_of_the_question)}\n</answer>')
    assert ASSISTANT_PREFIX == "Let me solve this step by step.\n<think>"


def test_sft_target_is_judged_correct(rows):
    for r in rows.values():
        target = mc.sft_target(r)
        assert target.startswith("\n" + r["Ground Truth Explanation"].strip() + "\n</think>\n<answer>\n")
        assert is_correct(ASSISTANT_PREFIX + target, r)
    assert mc.sft_target(rows["3"]).endswith('</think>\n<answer>\n{"answer": "3"}\n</answer>')


class _FakeChatTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|assistant|>"


def test_write_sft_jsonl_forms(tmp_path, rows):
    ordered = list(rows.values())
    p = tmp_path / "m.jsonl"
    assert write_sft_jsonl(ordered, p) == 7
    recs = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
    assert [m["role"] for m in recs[2]["messages"]] == ["system", "user", "assistant"]
    assert recs[2]["messages"][2]["content"] == ASSISTANT_PREFIX + mc.sft_target(ordered[2])
    p2 = tmp_path / "pc.jsonl"
    write_sft_jsonl(ordered, p2, form="prompt_completion", tokenizer=_FakeChatTokenizer(), include_meta=True)
    rec = json.loads(p2.read_text(encoding="utf-8").splitlines()[0])
    assert rec["prompt"].endswith("<|assistant|>" + ASSISTANT_PREFIX)
    assert rec["completion"] == mc.sft_target(ordered[0])
    assert (rec["row_number"], rec["calculator_id"], rec["note_id"]) == ("1", "6", "fx-1")


def test_write_sft_jsonl_leaves_nothing_half_written(tmp_path, rows):
    ordered = list(rows.values())
    bad = ordered + [{k: v for k, v in ordered[0].items() if k != "Ground Truth Explanation"}]
    p = tmp_path / "out.jsonl"
    p.write_text("old\n")
    with pytest.raises(MedCalcFormatError, match=r"row 7 \(Row Number 1\): missing field\(s\) \['Ground Truth Explanation'\]"):
        write_sft_jsonl(bad, p)
    assert p.read_text() == "old\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.jsonl"]


def test_write_medcalc_csv_round_trip_and_validation(tmp_path, rows):
    ordered = list(rows.values())
    p = tmp_path / "copy.csv"
    write_medcalc_csv(ordered, p)
    assert load_medcalc(p) == ordered
    bad = [dict(ordered[0]), dict(ordered[1], **{"Upper Limit": "n/a"})]
    with pytest.raises(MedCalcFormatError, match=r"row 1, field 'Upper Limit'"):
        write_medcalc_csv(bad, tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evalhelpers import FIXTURES
from sft.eval import esci
from sft.eval.esci import ESCIFormatError, balanced_accuracy, load_esci, parse_label

EX = FIXTURES / "esci_examples.parquet"
PR = FIXTURES / "esci_products.parquet"
JL = FIXTURES / "esci_export.jsonl"


def test_parquet_pair_joins_on_locale_and_id():
    recs = load_esci(EX, PR)
    assert [r["example_id"] for r in recs] == [0, 1, 2, 3, 4, 5]
    assert [r["label"] for r in recs] == [0, 1, 2, 3, 0, 3]
    # B0001 exists in two locales: the Spanish example gets the Spanish product
    assert recs[0]["product_title"] == "Trail Runner Shoe" and recs[3]["product_title"] == "Zapatilla de trail"
    assert recs[3]["product_description"] is None
    assert load_esci(JL) == recs


def test_filters_and_limit():
    got = load_esci(EX, PR, split="test", small_version=True, locale="us")
    assert [r["example_id"] for r in got] == [4, 5]
    assert [r["example_id"] for r in load_esci(EX, PR, split="train", small_version=False)] == [2]
    assert [r["example_id"] for r in load_esci(JL, split="train", limit=2)] == [0, 1]
    assert [r["example_id"] for r in load_esci(EX, PR, split="train", limit=2)] == [0, 1]
    assert load_esci(EX, PR, split="validation") == []


def _write_pair(tmp_path, change_example=None, drop_product=None):
    import pyarrow.parquet as pq

    ex = pq.read_table(EX).to_pylist()
    pr = pq.read_table(PR).to_pylist()
    if change_example:
        ex[change_example[0]][change_example[1]] = change_example[2]
    if drop_product:
        pr = [p for p in pr if (p["product_locale"], p["product_id"]) != drop_product]
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(ex), tmp_path / "ex.parquet")
    pq.write_table(pa.Table.from_pylist(pr, schema=pq.read_schema(PR)), tmp_path / "pr.parquet")
    return tmp_path / "ex.parquet", tmp_path / "pr.parquet"


def test_missing_product_names_file_row_and_field(tmp_path):
    ex, pr = _write_pair(tmp_path, drop_product=("us", "B0004"))
    with pytest.raises(ESCIFormatError) as e:
        load_esci(ex, pr)
    assert str(e.value).startswith(f"{ex}: row 4, field 'product_id': no product ('us', 'B0004') in {pr}")


def test_bad_label_names_file_row_and_field(tmp_path):
    ex, pr = _write_pair(tmp_path, change_example=(2, "esci_label", "X"))
    with pytest.raises(ESCIFormatError, match=r"ex\.parquet: row 2, field 'esci_label': expected E, S, C, I"):
        load_esci(ex, pr)


def test_missing_column_and_non_parquet(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(EX).drop(["esci_label"]), tmp_path / "ex.parquet")
    with pytest.raises(ESCIFormatError, match=r"ex\.parquet: missing column\(s\) \['esci_label'\]"):
        load_esci(tmp_path / "ex.parquet", PR)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ESCIFormatError, match="junk.parquet: not a readable parquet file"):
        load_esci(tmp_path / "junk.parquet", PR)


def test_jsonl_errors_name_line_and_field(tmp_path):
    lines = JL.read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[2])
    rec["query"] = ""
    p = tmp_path / "e.jsonl"
    p.write_text("\n".join(lines[:2] + [json.dumps(rec)] + lines[3:]) + "\n", encoding="utf-8")
    with pytest.raises(ESCIFormatError, match=r"e\.jsonl: line 3, field 'query': missing or empty"):
        load_esci(p)
    p.write_text(lines[0] + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ESCIFormatError, match=r"e\.jsonl:2: field '<row>': invalid JSON"):
        load_esci(p)


def test_jsonl_export_round_trip(tmp_path):
    recs = load_esci(EX, PR)
    esci.write_jsonl_export(recs, tmp_path / "x.jsonl")
    assert load_esci(tmp_path / "x.jsonl") == recs


# --------------------------------------------------------------------------- prompts


def test_prompts_follow_tables_5_and_6():
    rec = load_esci(JL)[3]
    info = "Title: Zapatilla de trail\nBrand: Stride\nColor: Rojo\nBullet points: Malla transpirable"
    assert esci.product_info(rec) == info
    no_cot = esci.build_messages(rec, cot=False)
    assert no_cot[0]["content"] == "You are a helpful assistant. You provide the user with the answer."
    assert no_cot[1]["content"] == (
        "Your task is to classify each product as being an Exact, Substitute, Complement, or Irrelevant match "
        "for the query.\nHere is the user\u2019s query:\nzapatillas rojas\nHere is the product information:\n"
        f"{info}\n--------------\nYour final response must be within <answer> </answer> tags.\n"
        "Label the relation type as a number: 0 = Exact, 1 = Substitute, 2 = Complement and 3 = Irrelevant. "
        "For example,\n<answer>one_of_[0, 1, 2, 3]</answer>.")
    cot = esci.build_messages(rec, cot=True)
    assert cot[0]["content"].startswith("You are a helpful assistant. You first think")
    assert "Please show your entire reasoning process in **a single** <think> </think> block" in cot[1]["content"]
    assert cot[1]["content"].endswith("</think>\n<answer>one_of_[0, 1, 2, 3]</answer>")
    assert esci.assistant_prefix(False) == "<answer>" and esci.assistant_prefix(True) == ""
    assert esci.sft_target(rec, cot=False) == "3</answer>"
    assert esci.sft_target(rec, cot=True, rationale="Different language, different shoe.") == \
        "<think>\nDifferent language, different shoe.\n</think>\n<answer>3</answer>"
    with pytest.raises(ValueError, match="needs a rationale"):
        esci.sft_target(rec, cot=True)
    assert esci.product_info(rec, max_chars=10) == info[:10]


@pytest.mark.parametrize("text,label", [
    ("<answer>2</answer>", 2), ("2</answer>", 2), ("<think>maybe 1</think>\n<answer> 3 </answer>", 3),
    ("<answer>1</answer> then <answer>0</answer>", 0), ("<answer>Exact</answer>", 0), ("<answer>S</answer>", 1),
    ("<answer>2", 2), ("<answer>4</answer>", None), ("<answer>one_of_[0, 1, 2, 3]</answer>", None),
    ("The answer is 2", None), ("", None), (None, None),
])
def test_parse_label(text, label):
    assert parse_label(text) == label


# --------------------------------------------------------------------------- metric


def test_balanced_accuracy_hand_value():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, None, 1, -1, 3]
    # recalls: class 0 2/3, class 1 1/2, class 2 0/1; class 3 is absent from the truth
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert balanced_accuracy([1, 1], [1, 1]) == 1.0
    with pytest.raises(ValueError):
        balanced_accuracy([0], [0, 1])
    with pytest.raises(ValueError):
        balanced_accuracy([], [])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.one_of(st.none(), st.integers(-1, 3))), min_size=1, max_size=60))
def test_balanced_accuracy_equals_sklearn(pairs):
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    y_true = [t for t, _ in pairs]
    y_pred = [p for _, p in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about predicted classes absent from the truth
        expected = balanced_accuracy_score(np.array(y_true), np.array([-1 if p is None else p for p in y_pred]))
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(expected, abs=1e-12)


def test_evaluate_reports_bacc_and_unparsed():
    recs = load_esci(JL)  # labels 0 1 2 3 0 3
    preds = ["<answer>0</answer>", "<answer>0</answer>", "2</answer>", "no idea", "<answer>0</answer>", "3</answer>"]
    res = esci.evaluate(preds, recs)
    assert res["n"] == 6 and res["n_unparsed"] == 1
    assert res["per_class_recall"] == {"Exact": 1.0, "Substitute": 0.0, "Complement": 1.0, "Irrelevant": 0.5}
    assert res["balanced_accuracy"] == pytest.approx(2.5 / 4)
    assert res["accuracy"] == pytest.approx(4 / 6)

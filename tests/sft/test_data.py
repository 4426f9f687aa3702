"""JSONL rows, the paper's templates, completion-only labels, collation, and bad-row errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.data import IGNORE_INDEX, TEMPLATES, DataError, PadCollator, load_sft_dataset, parse_row, split_text, tokenize_row

FIX = Path(__file__).parent / "fixtures"


def _supervised(tok, ex):
    return tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX])


def test_prompt_completion_labels_cover_exactly_the_completion(tok):
    ex = tokenize_row(tok, parse_row({"prompt": "What is 2+2?", "completion": "4"}))
    assert _supervised(tok, ex) == "4<|im_end|>\n"  # the turn end is supervised, the prompt is not
    n_prompt = sum(1 for l in ex["labels"] if l == IGNORE_INDEX)
    assert tok.decode(ex["input_ids"][:n_prompt]).endswith("<|im_start|>assistant\n")
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]


def test_plain_text_without_chat_template_appends_eos(tok):
    ex = tokenize_row(tok, parse_row({"prompt": "2+2=", "completion": "4"}), chat_template=False)
    assert tok.decode(ex["input_ids"]) == "2+2=4</s>"
    assert _supervised(tok, ex) == "4</s>"


def test_messages_form_equals_conversational_prompt_completion(tok):
    a = tokenize_row(tok, parse_row({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                                  {"role": "assistant", "content": "A"}]}))
    b = tokenize_row(tok, parse_row({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                     "completion": [{"role": "assistant", "content": "A"}]}))
    assert a == b and _supervised(tok, a) == "A<|im_end|>\n"


def test_medcalc_template_table4_and_assistant_prefix_is_prompt(tok):
    ds = load_sft_dataset(FIX / "medcalc_rows.jsonl", tok, template="medcalc")
    assert len(ds) == 2
    ex = ds[0]
    text = tok.decode(ex["input_ids"])
    assert "<|im_start|>system\nYou are a helpful assistant. You first think about the reasoning process" in text
    assert "Here is the patient note:\nA 50-year-old man, 80 kg, 1.80 m.\nHere is the task:\nWhat is the patient's BMI?" in text
    assert '{"answer": str(short_and_direct_answer_of_the_question)}' in text
    assert "<|im_start|>assistant\nLet me solve this step by step.\n<think>BMI = 80" in text
    assert _supervised(tok, ex).startswith("BMI = 80")  # the assistant prefix is not supervised


@pytest.mark.parametrize("name,prefix", [("esci", "<answer>"), ("esci_cot", "")])
def test_esci_templates_tables_5_and_6(tok, name, prefix):
    row = parse_row({"query": "red shoes", "product_info": "Nike red running shoe", "completion": "0</answer>"},
                    template=name)
    prompt, completion, _ = split_text(tok, row)
    assert "Here is the user\u2019s query:\nred shoes\nHere is the product information:\nNike red running shoe" in prompt
    assert "0 = Exact, 1 = Substitute, 2 = Complement and 3 = Irrelevant" in prompt
    assert prompt.endswith("<|im_start|>assistant\n" + prefix)
    assert ("**a single**" in prompt) == (name == "esci_cot")
    assert completion == "0</answer><|im_end|>\n"
    assert TEMPLATES[name].fields == ("query", "product_info")


@pytest.mark.parametrize("line,field", [
    ('{"prompt": "a"}', "completion"),
    ('{"completion": "a"}', "prompt"),
    ('{"prompt": 3, "completion": "a"}', "prompt"),
    ('{"prompt": "a", "completion": ""}', "completion"),
    ('[1, 2]', "<row>"),
    ('{"prompt": "a", "completion": "b"', "<row>"),
    ('{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]}', "messages[1].role"),
    ('{"messages": [{"role": "user", "content": "u"}, {"role": "assistant"}]}', "messages[1]"),
])
def test_bad_row_names_file_line_and_field(tok, tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "completion": "fine"}\n\n' + line + "\n")
    with pytest.raises(DataError) as exc:
        load_sft_dataset(path, tok)
    msg = str(exc.value)
    assert f"{path}:3:" in msg and repr(field) in msg


def test_template_missing_field_is_named(tok, tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"note": "n", "completion": "c"}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl:1: field 'question'"):
        load_sft_dataset(path, tok, template="medcalc")


def test_truncation_drops_rows_without_completion_tokens(tok):
    rows = [parse_row({"prompt": "x" * 50, "completion": "y"}), parse_row({"prompt": "x", "completion": "yy"})]
    from sft.data import tokenize_rows

    ds = tokenize_rows(tok, rows, max_length=30)
    assert len(ds) == 1 and ds.dropped == 1 and len(ds[0]["input_ids"]) <= 30


def test_collator_pads_right_and_masks_labels(tok):
    exs = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "flow_weight": 0.5},
           {"input_ids": [4], "labels": [4], "flow_weight": 2.0}]
    b = PadCollator(pad_token_id=9, pad_to_multiple_of=4)(exs)
    assert b["input_ids"].tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]]
    assert b["labels"].tolist() == [[-100, 2, 3, -100], [4, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert b["flow_weight"].tolist() == [0.5, 2.0]

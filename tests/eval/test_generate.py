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


# ------------------------------------------------------------- static KV cache (Llama) against HF's cache
def _gqa_llama(vocab: int, heads: int, kv_heads: int, attn: str = "sdpa"):
    from sft.models import load_model

    model = load_model(f"tiny:vocab={vocab},hidden=32,intermediate=64,layers=2,heads={heads},kv_heads={kv_heads}",
                       seed=heads * 10 + kv_heads)
    with torch.no_grad():  # larger logits than the default init: argmax ties are unlikely
        model.lm_head.weight.normal_(0.0, 1.0)
    model.config._attn_implementation = attn
    return model.eval()


MIXED = ["Question: Natalia sold clips to 48 of her friends", "Question: Natalia sold", "Question: Nat",
         "Question: Natalia sold clips to 48 of her friends. How many clips", "def add(a, b):"]


def _two_steppers(model, tok, prompts, room):
    from sft.eval import generate as G

    rows = [G._ids(tok, p) for p in prompts]
    with torch.inference_mode():
        a = G._prefill(model, rows, tok.pad_token_id)
        fast, logits = G._StaticLlama.start(model, rows, tok.pad_token_id, room)
        assert (a.logits - logits).abs().max().item() < 1e-5  # the static prefill's (bucketed) logits
        return G._HFSteps(model, a, tok.pad_token_id), a.logits, fast, logits


@pytest.mark.parametrize("bucket_cost", [0, 10**6])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_static_cache_steps_equal_hf_cache_steps(tiny_tokenizer, heads, kv_heads, n, bucket_cost, monkeypatch):
    """Step by step, the static cache (its prefill one bucket per row length, or one bucket) gives
    HF's logits, also after rows leave (a row from the tail moves into a hole: a wrong cache row or
    column would change its logits)."""
    from sft.eval import generate as G

    monkeypatch.setattr(G._StaticLlama, "BUCKET_COST", bucket_cost)
    model = _gqa_llama(len(tiny_tokenizer), heads, kv_heads)
    hf, la, fast, lb = _two_steppers(model, tiny_tokenizer, MIXED[:n], room=12)
    leave = {3: lambda k: [i for i in range(k) if i != 0], 6: lambda k: list(range(k))[1::2]}
    with torch.inference_mode():
        for step in range(10):
            assert (la - lb).abs().max().item() < 1e-5, step
            nxt = la.argmax(-1).tolist()
            assert nxt == lb.argmax(-1).tolist()
            if step in leave and len(nxt) > 1:
                order = fast.select(leave[step](len(nxt)))
                assert sorted(order) == sorted(leave[step](len(nxt)))
                assert hf.select(order) == order
                nxt = [nxt[k] for k in order]
            la, lb = hf.step(nxt), fast.step(nxt)


def test_static_select_moves_tail_rows_into_holes(tiny_model, tiny_tokenizer):
    hf, la, fast, lb = _two_steppers(tiny_model, tiny_tokenizer, MIXED[:4], room=4)
    with torch.inference_mode():
        nxt = la.argmax(-1).tolist()
        la, lb = hf.step(nxt), fast.step(nxt)
        assert fast.select([1, 3]) == [3, 1]  # rows 0 and 2 leave, row 3 takes row 0's place; row 1 stays
        hf.select([3, 1])
        nxt = la.argmax(-1).tolist()
        nxt = [nxt[3], nxt[1]]
        assert torch.equal(fast.pos[:2], hf.next_pos)
        assert (hf.step(nxt) - fast.step(nxt)).abs().max().item() < 1e-5
        assert fast.select([1]) == [1] and fast.n == 1 and fast.select([0]) == [0]


@pytest.mark.parametrize("chunk,head_tokens", [(64, 512), (3, 4), (1, 1)])
def test_static_scoring_equals_hf_scoring_then_decodes_the_same(tiny_tokenizer, chunk, head_tokens, monkeypatch):
    """Completions of different lengths (one empty), fed in chunks on the rows that reach them:
    bits equal HF's full-width pass; decoding after it overwrites the scratch columns."""
    from sft.eval import generate as G

    monkeypatch.setattr(G._StaticLlama, "CHUNK", chunk)
    monkeypatch.setattr(G._StaticLlama, "HEAD_TOKENS", head_tokens)
    model = _gqa_llama(len(tiny_tokenizer), 4, 2)
    comps = [G._ids(tiny_tokenizer, c) for c in (" 48 clips", "", " and then some more words here", " x", " ok?")]
    hf, la, fast, lb = _two_steppers(model, tiny_tokenizer, MIXED, room=40)
    with torch.inference_mode():
        want, got = hf.score(la, comps), fast.score(lb, comps)
        assert got[1] == 0.0 and want[1] == 0.0
        assert got == pytest.approx(want, rel=1e-5)
        assert (got[[0, 2, 3, 4]] > 1.0).all()
        for _ in range(8):
            assert (la - lb).abs().max().item() < 1e-5
            nxt = la.argmax(-1).tolist()
            la, lb = hf.step(nxt), fast.step(nxt)


@pytest.mark.parametrize("bucket_cost", [0, 10**6])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_of_different_lengths_stop_strings_equal_one_at_a_time(tiny_tokenizer, attn, bucket_cost, monkeypatch):
    """The whole generator (static path for sdpa, its prefill bucketed or not; HF's cache for
    eager) on a GQA Llama."""
    from sft.eval import generate as G
    from transformers import DynamicCache

    monkeypatch.setattr(G._StaticLlama, "BUCKET_COST", bucket_cost)

    model = _gqa_llama(len(tiny_tokenizer), 4, 2, attn)
    st = G._prefill(model, [[5, 6], [5, 7, 8]], tiny_tokenizer.pad_token_id)
    assert isinstance(st.cache, DynamicCache)
    assert (G._StaticLlama.start(model, [[5, 6], [5, 7, 8]], 0, 4) is None) == (attn == "eager")
    full = [reference(model, tiny_tokenizer, p, 14) for p in MIXED]
    stop = full[2][4:7]
    assert stop
    for batch_size in (2, 5):
        got = greedy_generate(model, tiny_tokenizer, MIXED, stop=[stop], keep_stop=True, max_new_tokens=14,
                              batch_size=batch_size, progress=False)
        assert got == [f[:f.index(stop) + len(stop)] if stop in f else f for f in full]


# ------------------------------------------ fused projections: q/k/v and gate/up as one matmul each
class _Doubled(torch.nn.Module):
    """A layer that is not a plain ``nn.Linear`` (as a LoRA or quantised layer): never fused."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return 2.0 * self.lin(x)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("bias", [(False, False, False), (True, False, True)])
def test_fused_projection_equals_each_linear(onednn, bias, monkeypatch):
    """One matmul over the concatenated (and, with oneDNN, prepacked) weights, split: each part
    equals its own linear up to float rounding, biases (some absent) included, for any row count."""
    from sft.eval import generate as G

    if not onednn:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    torch.manual_seed(0)
    lins = [torch.nn.Linear(24, n, bias=b) for n, b in zip((24, 8, 8), bias)]
    proj = G._Proj(lins, rows=3)
    assert (proj.packed is not None) == (onednn and torch.backends.mkldnn.is_available())
    assert (proj.weight is None) == (proj.packed is not None)
    with torch.inference_mode():
        for shape in [(3, 1, 24), (1, 1, 24), (2, 5, 24), (7, 24)]:
            x = torch.randn(shape)
            got = proj(x)
            assert len(got) == 3
            for g, lin in zip(got, lins):
                want = lin(x)
                assert g.shape == want.shape
                torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)


def test_projection_with_a_non_plain_layer_calls_each_as_it_is():
    from sft.eval import generate as G

    torch.manual_seed(1)
    lins = [_Doubled(torch.nn.Linear(16, 16)), torch.nn.Linear(16, 4)]
    proj = G._Proj(lins, rows=2)
    assert proj.weight is None and proj.packed is None
    x = torch.randn(2, 1, 16)
    with torch.inference_mode():
        got = proj(x)
        assert all(torch.equal(g, lin(x)) for g, lin in zip(got, lins))


def test_static_steps_without_onednn_equal_hf_steps(tiny_tokenizer, monkeypatch):
    """The fallback (concatenated weights, ``weight @ x^T``) where oneDNN is absent."""
    from sft.eval import generate as G

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = _gqa_llama(len(tiny_tokenizer), 4, 2)
    hf, la, fast, lb = _two_steppers(model, tiny_tokenizer, MIXED, room=8)
    assert fast.fused.head.packed is None and fast.fused.layers[0][0].weight is not None
    with torch.inference_mode():
        for _ in range(6):
            assert (la - lb).abs().max().item() < 1e-5
            nxt = la.argmax(-1).tolist()
            assert nxt == lb.argmax(-1).tolist()
            la, lb = hf.step(nxt), fast.step(nxt)


def test_fused_weights_follow_a_changed_model(tiny_tokenizer):
    """The fused copies live for one call: after the model's weights change in place, the next
    call generates what the changed model generates (no stale fused weights)."""
    model = _gqa_llama(len(tiny_tokenizer), 4, 2)
    before = greedy_generate(model, tiny_tokenizer, MIXED, max_new_tokens=8, batch_size=2, progress=False)
    assert before == [reference(model, tiny_tokenizer, p, 8) for p in MIXED]
    with torch.no_grad():
        for la in model.model.layers:
            la.mlp.up_proj.weight.mul_(-3.0)
            la.self_attn.k_proj.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 1.0)
    after = greedy_generate(model, tiny_tokenizer, MIXED, max_new_tokens=8, batch_size=2, progress=False)
    assert after == [reference(model, tiny_tokenizer, p, 8) for p in MIXED]
    assert after != before


@pytest.mark.parametrize("lens,cost,want", [
    ([10, 10, 3], 2, [(0, 2), (2, 3)]),  # 20 + 2 + 3 + 2 = 27 < one bucket 30 + 2
    ([10, 10, 3], 8, [(0, 3)]),  # 30 + 8 = 38 < 20 + 8 + 3 + 8 = 39
    ([7], 100, [(0, 1)]),
    ([5, 4, 3], 0, [(0, 1), (1, 2), (2, 3)]),
    ([9, 9, 9, 9], 0, [(0, 4)]),  # equal lengths: a cut saves nothing, the first (widest) bucket kept
])
def test_prefill_buckets_minimise_padded_tokens(lens, cost, want):
    from sft.eval.generate import length_buckets

    assert length_buckets(lens, cost) == want


@pytest.mark.parametrize("seed", range(20))
def test_prefill_buckets_against_brute_force(seed):
    """Every split of the sorted rows into consecutive buckets tried: the dynamic programme's cost is the least."""
    import itertools
    import random

    from sft.eval.generate import length_buckets

    rng = random.Random(seed)
    lens = sorted((rng.randint(1, 30) for _ in range(rng.randint(1, 7))), reverse=True)
    cost = rng.randint(0, 40)

    def total(cuts):
        bounds = [0, *cuts, len(lens)]
        return sum((b - a) * lens[a] + cost for a, b in zip(bounds, bounds[1:]))

    got = length_buckets(lens, cost)
    assert got[0][0] == 0 and got[-1][1] == len(lens) and all(a[1] == b[0] for a, b in zip(got, got[1:]))
    brute = min(total(c) for k in range(len(lens)) for c in itertools.combinations(range(1, len(lens)), k))
    assert total([b for _, b in got[:-1]]) == brute

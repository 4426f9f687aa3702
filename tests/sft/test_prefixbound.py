"""The full-vocabulary bridge: node terms in batches equal one pass, and Delta L is the code-length change."""
import numpy as np
import pytest
import torch

from sft.models import load_model
from sft.prefixbound import full_vocab_decomposition, full_vocab_terms


def _examples(rng, vocab, n=5):
    out = []
    for _ in range(n):
        L = int(rng.integers(3, 12))
        ids = rng.integers(0, vocab, L).tolist()
        k = int(rng.integers(1, L - 1))  # a prompt of k tokens, the rest coded
        out.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
    return out


def _nll_bits(model, examples):
    tot, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            lp = torch.log_softmax(model(input_ids=torch.tensor([e["input_ids"]])).logits[0].double(), -1)
            for i in range(1, len(e["labels"])):
                if e["labels"][i] != -100:
                    tot -= float(lp[i - 1, e["labels"][i]])
                    n += 1
    return tot / np.log(2), n


def test_delta_is_the_code_length_change_and_batches_do_not_matter():
    rng = np.random.default_rng(0)
    m0, m1 = load_model("tiny:vocab=64,hidden=16,layers=1", seed=0), load_model("tiny:vocab=64,hidden=16,layers=1", seed=1)
    ex = _examples(rng, 64)
    d, timing = full_vocab_decomposition(m0, m1, ex, batch_size=2, rows=3)
    b0, n = _nll_bits(m0, ex)
    b1, _ = _nll_bits(m1, ex)
    assert d.weight.size == n and timing["vocab"] == 64
    assert d.delta == pytest.approx((b1 - b0) / n, abs=1e-6)  # float32 forwards, batched vs one by one
    assert d.delta <= d.floor + 1e-12 <= d.bound_kl + 2e-12 <= d.bound_kl_global + 3e-12
    assert d.delta <= d.bound_nodewise + 1e-12
    one, _ = full_vocab_terms(m0, m1, ex, batch_size=16, rows=10**6)
    many, _ = full_vocab_terms(m0, m1, ex, batch_size=1, rows=2)
    # the same nodes (order: longest example first in both), the same terms
    np.testing.assert_allclose(np.sort(one.first_u), np.sort(many.first_u), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.sort(one.dv_u), np.sort(many.dv_u), rtol=1e-5, atol=1e-7)


def test_no_coded_position_raises():
    m0 = load_model("tiny:vocab=64,hidden=16,layers=1", seed=0)
    with pytest.raises(ValueError, match="no coded position"):
        full_vocab_terms(m0, m0, [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}])


def test_cached_base_conditionals_give_the_same_terms_and_reject_another_set():
    from sft.prefixbound import coded_conditionals

    rng = np.random.default_rng(1)
    m0, m1 = load_model("tiny:vocab=64,hidden=16,layers=1", seed=0), load_model("tiny:vocab=64,hidden=16,layers=1", seed=1)
    ex = _examples(rng, 64, n=6)
    live, _ = full_vocab_terms(m0, m1, ex, batch_size=2, rows=4)
    cache = coded_conditionals(m0, ex, batch_size=2)
    cached, _ = full_vocab_terms(cache, m1, ex, batch_size=2, rows=4)
    np.testing.assert_array_equal(live.first_u, cached.first_u)
    np.testing.assert_array_equal(live.dv_u, cached.dv_u)
    with pytest.raises(ValueError, match="other examples"):
        full_vocab_terms(cache, m1, ex[:-1], batch_size=2)
    with pytest.raises(ValueError, match="other examples"):
        full_vocab_terms(cache, m1, ex, batch_size=3)

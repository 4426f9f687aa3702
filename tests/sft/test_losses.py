"""Hand-computed values of the token-weighted losses and chunked == unchunked."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sft import losses as L
from sft.models import token_nll

from tinyworld import make_model


def _half_prob_logits(B, T, V, labels):
    """Logits where every target has p = 1/2: target logit log(V - 1), others 0."""
    logits = torch.zeros(B, T, V, dtype=torch.float64)
    tgt = labels[:, 1:].clamp_min(0)
    logits[:, :-1].scatter_(2, tgt[..., None], math.log(V - 1))
    return logits


def test_dft_is_half_ce_when_every_target_has_p_half():
    B, T, V = 2, 6, 5
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    labels[0, :2] = -100
    logits = _half_prob_logits(B, T, V, labels)
    ce, dft = L.ce_loss(logits, labels), L.dft_loss(logits, labels)
    assert float(ce) == pytest.approx(math.log(2), abs=1e-12)
    assert float(dft) == pytest.approx(math.log(2) / 2, abs=1e-12)
    assert float(dft) == pytest.approx(float(ce) / 2, abs=1e-12)


def test_talr_uniform_losses_give_tau_ell_and_weight_inv_e():
    B, T, V = 3, 5, 7
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    labels[1, :3] = -100  # different lengths, same per-sequence mean
    logits = torch.zeros(B, T, V, dtype=torch.float64)  # every token: ell = log V
    loss, stats = L.talr_loss(logits, labels, return_stats=True)
    ell = math.log(V)
    assert stats["tau"] == pytest.approx(ell, abs=1e-12)
    for q in ("w_q0", "w_q50", "w_q100"):
        assert stats[q] == pytest.approx(math.exp(-1), abs=1e-12)
    assert float(loss) == pytest.approx(math.exp(-1) * ell, abs=1e-12)
    # the floor wins when it is above e^-1
    _, stats = L.talr_loss(logits, labels, w_min=0.5, return_stats=True)
    assert stats["w_q0"] == pytest.approx(0.5) and stats["frac_floor"] == 1.0


def test_talr_tau_is_median_of_sequence_means_with_midpoint_for_even_count():
    # four sequences with mean losses 1, 2, 4, 20 -> tau = (2 + 4) / 2 = 3
    nll = torch.tensor([1.0, 1.0, 2.0, 4.0, 4.0, 4.0, 20.0], dtype=torch.float64)
    seq = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    means = L.sequence_mean_losses(nll, seq, 4)
    assert means.tolist() == [1.0, 2.0, 4.0, 20.0]
    assert float(L.talr_tau(means)) == 3.0
    w, tau = L.token_weights("talr", nll, seq, 4)
    assert float(tau) == 3.0
    expected = torch.clamp(torch.exp(-nll / 3.0), min=0.01)
    assert torch.allclose(w, expected, atol=0, rtol=0)
    assert float(w[-1]) == 0.01  # exp(-20/3) = 0.0013 is floored to w_min
    assert float(w[0]) == pytest.approx(math.exp(-1 / 3))


def test_weights_carry_no_gradient():
    """dL/dlogits = w * (softmax - onehot) / N with w held constant, for every method."""
    torch.manual_seed(0)
    B, T, V = 2, 5, 6
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, 1] = -100
    for method in L.METHOD_NAMES:
        loss = L.sft_loss(method, logits, labels, threshold=0.1)
        (g,) = torch.autograd.grad(loss, logits)
        nll, seq = L.token_nll_from_logits(logits.detach(), labels)
        w, _ = L.token_weights(method, nll, seq, B, threshold=0.1)
        mask, tgt, _ = L.shift_and_select(labels)
        sm = torch.softmax(logits.detach()[:, :-1][mask], -1)
        sm[torch.arange(len(tgt)), tgt] -= 1
        expected = torch.zeros_like(logits)
        expected[:, :-1][mask] = w[:, None] * sm / len(tgt)
        assert torch.allclose(g, expected, atol=1e-12), method
    # and differentiating *through* DFT's weight would give a different gradient
    p_lse = torch.log_softmax(logits[:, :-1], -1)
    mask, tgt, _ = L.shift_and_select(labels)
    ell = -p_lse[mask].gather(1, tgt[:, None]).squeeze(1)
    (g_through,) = torch.autograd.grad((torch.exp(-ell) * ell).mean(), logits)
    (g_dft,) = torch.autograd.grad(L.dft_loss(logits, labels), logits)
    assert not torch.allclose(g_through, g_dft, atol=1e-6)


def test_clip_keeps_only_tokens_above_threshold():
    labels = torch.tensor([[0, 1, 2, 0]])
    logits = torch.zeros(1, 4, 4, dtype=torch.float64)
    logits[0, 0, 1] = 5.0  # p(1) high
    logits[0, 1, 2] = -5.0  # p(2) low
    logits[0, 2, 0] = 1.0  # p(0) = e/(e+3) = 0.475
    nll, _ = L.token_nll_from_logits(logits, labels)
    keep = torch.exp(-nll) > 0.2
    assert keep.tolist() == [True, False, True]
    assert float(L.clipped_loss(logits, labels)) == pytest.approx(float(nll[keep].sum() / 3))


def test_reduction_is_sum_over_num_items_in_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 4))
    nll, _ = L.token_nll_from_logits(logits, labels)
    assert float(L.ce_loss(logits, labels, num_items_in_batch=10)) == pytest.approx(float(nll.sum() / 10))
    assert float(L.ce_loss(logits, labels)) == pytest.approx(float(nll.mean()))
    sw = torch.tensor([2.0, 0.5], dtype=torch.float64)
    _, seq = L.token_nll_from_logits(logits, labels)
    expected = float((sw[seq] * nll).sum() / nll.numel())
    assert float(L.ce_loss(logits, labels, sequence_weights=sw)) == pytest.approx(expected)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(2, 9), V=st.integers(2, 13), H=st.integers(1, 6),
       chunk=st.integers(1, 7), method=st.sampled_from(L.METHOD_NAMES), seed=st.integers(0, 10_000),
       bias=st.booleans())
def test_chunked_equals_full_logits_property(B, T, V, H, chunk, method, seed, bias):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[0, 1] = 0  # at least one supervised token
    full = L.sft_loss(method, h @ W.t() + (b if bias else 0), labels)
    chunked = L.chunked_loss(method, h, W, labels, lm_head_bias=b, chunk_size=chunk)
    ins = [h, W] + ([b] if bias else [])
    g1 = torch.autograd.grad(full, ins)
    g2 = torch.autograd.grad(chunked, ins)
    assert abs(float((full - chunked).detach())) < 1e-10
    for a, c in zip(g1, g2):
        assert float((a - c).abs().max()) < 1e-10


@pytest.mark.parametrize("method", ["ce", "talr", "dft", "clip", "flow"])
def test_chunked_equals_unchunked_on_a_tiny_llama_all_parameter_grads(method, dataset):
    """Loss and every parameter gradient of a float64 tiny Llama agree within 1e-6."""
    from sft.data import PadCollator

    batch = PadCollator(256)([dataset[i] for i in range(6)])
    sw = torch.linspace(0.2, 1.5, 6, dtype=torch.float64) if method == "flow" else None
    loss_method = "ce" if method == "flow" else method
    results = []
    for chunked in (False, True):
        model = make_model(torch.float64)
        nll, seq = token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunked=chunked,
                             chunk_size=7)
        # clip at p > 1/V so that a random model keeps about half of the tokens
        w, _ = L.token_weights(loss_method, nll, seq, 6, threshold=1 / 260)
        loss = L.reduce(L.weighted_sum(nll, w, seq, sequence_weights=sw), nll.numel(), None)
        loss.backward()
        results.append((float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) < 1e-6
    assert set(g0) == set(g1) and len(g0) > 10
    for k in g0:
        assert float((g0[k] - g1[k]).abs().max()) < 1e-6, k
    assert any(float(g.abs().max()) > 0 for g in g0.values())


def test_chunked_never_builds_full_logits():
    """The largest float tensor created in forward+backward is one chunk, not tokens x V."""
    torch.manual_seed(0)
    N, H, V, chunk = 64, 8, 1000, 8
    h = torch.randn(1, N + 1, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (1, N + 1))
    biggest = 0

    def pack(t):
        nonlocal biggest
        biggest = max(biggest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = L.chunked_loss("talr", h, W, labels, chunk_size=chunk)
    loss.backward()
    assert biggest < N * V / 4  # saved tensors: hidden, weight, targets, lse -- never logits
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        L.talr_loss(h @ W.t(), labels)
    assert biggest >= N * V  # the full form does save tokens x V logits


def test_half_precision_hidden_states_upcast_logits():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8).to(torch.bfloat16)
    W = torch.randn(11, 8).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5))
    a = L.chunked_loss("ce", h, W, labels, chunk_size=3)
    b = L.ce_loss((h @ W.t()), labels)
    assert a.dtype == torch.float32 and abs(float(a - b)) < 1e-5


def test_token_stats_median_p_and_fractions_by_hand():
    from sft.losses import token_stats

    p = torch.tensor([0.1, 0.5, 0.9, 0.15], dtype=torch.float64)
    s = token_stats(-torch.log(p), torch.ones(4))
    assert s["median_p"] == pytest.approx(0.325)  # mean of the middle pair 0.15, 0.5
    assert s["frac_p_gt_0.2"] == pytest.approx(0.5)
    assert s["frac_hard"] == pytest.approx(float((p < L.HARD_P).double().mean()))


def test_final_hidden_is_the_last_hidden_state_without_keeping_the_others(dataset):
    """`final_hidden` takes the final norm's output by a hook: equal bit for bit to HF's last hidden
    state, and the forward it runs returns no per-layer hidden states; a model without
    ``.model.norm`` falls back to HF's ``hidden_states[-1]``."""
    from sft.data import PadCollator
    from sft.models import final_hidden

    batch = PadCollator(256)([dataset[i] for i in range(3)])
    model = make_model(torch.float32)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                use_cache=False).hidden_states
    got = final_hidden(model, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(got, ref[-1]) and not torch.equal(got, ref[-2])
    assert not model.model.norm._forward_hooks  # the hook is removed

    class NoNorm(torch.nn.Module):  # a wrapper whose decoder is not at .model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    assert torch.equal(final_hidden(NoNorm(model), batch["input_ids"], batch["attention_mask"]), ref[-1])

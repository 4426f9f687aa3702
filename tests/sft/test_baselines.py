"""L2 to init, k3 KL, FLOW weights, WiSE-FT, per-token log-probabilities."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sft.data import PadCollator
from sft.merge import interpolate_state_dicts, wise_ft
from sft.models import token_nll
from sft.regularizers import KLToReference, L2ToInit, k3_kl
from sft.weighting import attach_flow_weights, flow_weights, token_logprobs

from tinyworld import make_model


def test_l2_to_init_value_and_gradient():
    m = torch.nn.Linear(3, 2).double()
    reg = L2ToInit(m, coeff=0.5)
    assert float(reg(m).detach()) == 0.0
    with torch.no_grad():
        m.weight += 1.0
        m.bias -= 2.0
    val = reg(m)
    assert float(val) == pytest.approx(0.5 * (6 * 1.0 + 2 * 4.0))
    val.backward()
    assert torch.allclose(m.weight.grad, torch.full((2, 3), 1.0, dtype=torch.float64))  # 2 * 0.5 * 1
    assert torch.allclose(m.bias.grad, torch.full((2,), -2.0, dtype=torch.float64))


def test_k3_hand_values():
    logp = torch.tensor([math.log(0.5), math.log(0.25)], dtype=torch.float64)
    ref = torch.tensor([math.log(0.5), math.log(0.5)], dtype=torch.float64)
    k3 = k3_kl(logp, ref)
    # r = log(ref/p): 0 and log 2 -> k3 = 0 and 2 - log 2 - 1
    assert k3.tolist() == pytest.approx([0.0, 1 - math.log(2)])
    assert torch.all(k3_kl(torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)) >= 0)


def test_kl_penalty_is_zero_at_the_reference_and_positive_after_a_change(dataset):
    model = make_model()
    kl = KLToReference(make_model(), coeff=0.001)
    b = PadCollator(256)([dataset[i] for i in range(4)])
    nll, _ = token_nll(model, b["input_ids"], b["attention_mask"], b["labels"])
    ref, _ = token_nll(kl.ref_model, b["input_ids"], b["attention_mask"], b["labels"])
    assert float(kl.penalty(nll, ref, None)) == pytest.approx(0.0, abs=1e-15)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    nll, _ = token_nll(model, b["input_ids"], b["attention_mask"], b["labels"])
    pen = kl.penalty(nll, ref, None)
    expected = 0.001 * float(k3_kl(-nll, -ref).mean())
    assert float(pen) == pytest.approx(expected) and float(pen) > 0
    assert all(not p.requires_grad for p in kl.ref_model.parameters())


def test_flow_weights_hand_values():
    w, tau = flow_weights(np.array([1.0, 2.0, 3.0]))
    assert tau == 2.0
    assert w.tolist() == pytest.approx([math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)])


def test_token_logprobs_are_batch_and_padding_invariant(dataset):
    model = make_model()
    batched = token_logprobs(model, dataset, batch_size=5, pad_token_id=256, progress=False)
    for i in (0, 7, 15):
        b = PadCollator(256)([dataset[i]])
        nll, _ = token_nll(model, b["input_ids"], b["attention_mask"], b["labels"])
        assert np.allclose(batched[i], -nll.detach().numpy(), atol=1e-10)
        assert len(batched[i]) == sum(l != -100 for l in dataset[i]["labels"][1:])


def test_attach_flow_weights_stores_weights_with_the_dataset(dataset, tmp_path):
    model = make_model()
    ds, tau = attach_flow_weights(model, dataset, batch_size=4, pad_token_id=256, progress=False,
                                  save_to=tmp_path / "flow.json")
    lp = token_logprobs(model, dataset, pad_token_id=256, progress=False)
    ell0 = np.array([-x.mean() for x in lp])
    assert tau == pytest.approx(float(np.median(ell0)))
    assert [ex["flow_weight"] for ex in ds] == pytest.approx(np.exp(-ell0 / tau).tolist())
    assert (tmp_path / "flow.json").exists() and not (tmp_path / "flow.json.tmp").exists()


def test_wise_ft_interpolates():
    m0, m1 = make_model(seed=0), make_model(seed=1)
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    models = dict(wise_ft(m0, m1, [0.0, 0.25, 1.0]))
    for k in sd0:
        assert torch.equal(models[0.0].state_dict()[k], sd0[k])
        assert torch.equal(models[1.0].state_dict()[k], sd1[k])
        assert torch.allclose(models[0.25].state_dict()[k], 0.75 * sd0[k] + 0.25 * sd1[k], atol=1e-12)
    assert not torch.equal(sd0["lm_head.weight"], sd1["lm_head.weight"])
    with pytest.raises(KeyError):
        interpolate_state_dicts({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)
    ints = interpolate_state_dicts({"n": torch.tensor([1])}, {"n": torch.tensor([5])}, 0.5)
    assert ints["n"].tolist() == [5]

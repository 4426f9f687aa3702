"""sft.trajectory.codelength_probe against a brute-force code length, one sequence at a time."""
import math

import pytest
import torch
from tinyworld import make_model

from sft.trajectory import codelength_probe, run_probe


def brute_bits(model, tok, prompt, text):
    """(bits, coded tokens) of ``text`` after ``prompt`` (None: the text alone, first token not coded:
    the byte tokenizer has no BOS)."""
    p = [] if prompt is None else tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    start = max(len(p), 1)
    bits = -sum(float(logp[i - 1, ids[0, i]]) for i in range(start, ids.shape[1])) / math.log(2)
    return bits, ids.shape[1] - start


def test_codelength_probe_pools_general_and_averages_domain(tok):
    model = make_model(seed=3).eval()
    domain = (["Q: 2+2?", "Q: say hi"], ["A: 4", "A: hello there"])
    texts = ["def f(x):\n    return x", "plain English text, a little longer than the rest."]
    pairs = (["prompt one", "p2"], ["completion", "another completion"])
    vals = run_probe(codelength_probe(tok, domain, [texts, pairs], batch_size=2), model)
    dom = [brute_bits(model, tok, p, c) for p, c in zip(*domain)]
    gen = [brute_bits(model, tok, None, t) for t in texts] + [brute_bits(model, tok, p, c) for p, c in zip(*pairs)]
    assert vals["domain_bits"] == pytest.approx(sum(b for b, _ in dom) / 2, rel=1e-6)
    assert vals["general_bits_per_token"] == pytest.approx(sum(b for b, _ in gen) / sum(n for _, n in gen), rel=1e-6)
    assert vals["general_bits_per_token_0"] == pytest.approx(sum(b for b, _ in gen[:2]) / sum(n for _, n in gen[:2]),
                                                             rel=1e-6)
    assert not model.training


def test_codelength_probe_refuses_bad_sets(tok):
    with pytest.raises(ValueError, match="1 prompts and 2 completions"):
        codelength_probe(tok, (["a"], ["b", "c"]), [["x"]])
    with pytest.raises(ValueError, match="general: no corpus"):
        codelength_probe(tok, (["a"], ["b"]), [])

"""Token-level analysis (Figure 3): hand-checkable probabilities, batching, figures, CLI."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from sft import analysis as A


class Bigram(nn.Module):
    """A causal LM whose next-token distribution depends only on the current token:
    ``q(b | a) = P[a, b]``; so every target probability can be read off the table."""

    def __init__(self, P):
        super().__init__()
        self.logp = nn.Parameter(torch.log(torch.as_tensor(P, dtype=torch.float64)))

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=self.logp[input_ids])


P = np.array([[0.5, 0.25, 0.125, 0.125],
              [0.1, 0.6, 0.2, 0.1],
              [0.05, 0.05, 0.8, 0.1],
              [0.25, 0.25, 0.25, 0.25]])
DATA = [
    {"input_ids": [0, 1, 2, 3], "labels": [-100, -100, 2, 3]},       # targets 2|1, 3|2
    {"input_ids": [3, 0], "labels": [-100, 0]},                     # target 0|3
    {"input_ids": [0, 0, 1, 1, 2, 0], "labels": [-100, 0, 1, 1, 2, 0]},
    {"input_ids": [2, 2, 2], "labels": [-100, -100, 2]},
]


def _hand(ex):
    ids, lab = ex["input_ids"], ex["labels"]
    return np.array([P[ids[t - 1], lab[t]] for t in range(1, len(ids)) if lab[t] != -100])


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_token_probs_match_hand_values(batch_size):
    model = Bigram(P)
    probs = A.token_probs(model, None, DATA, batch_size=batch_size, pad_token_id=3, progress=False)
    assert len(probs) == len(DATA)
    for ex, p in zip(DATA, probs):
        np.testing.assert_allclose(p, _hand(ex), rtol=1e-12)
    np.testing.assert_allclose(probs[0], [0.2, 0.1])  # read off the table by hand
    assert A.target_tokens(DATA[0]) == [2, 3]


def test_fractions_and_summary_by_hand():
    probs = [np.array([0.05, 0.5]), np.array([0.2]), np.array([0.9, 0.01, 0.3])]
    assert A.hard_token_fraction(probs, 0.1) == pytest.approx(2 / 6)
    assert A.frac_above(probs, 0.2) == pytest.approx(3 / 6)  # strictly above: 0.2 itself is not
    s = A.summary(probs, 0.1)
    assert s["n_tokens"] == 6 and s["n_examples"] == 3
    assert s["median_p"] == pytest.approx(0.25)
    assert s["mean_code_length_bits"] == pytest.approx(
        np.mean([-np.log2(0.05 * 0.5), -np.log2(0.2), -np.log2(0.9 * 0.01 * 0.3)]))


def test_batched_equals_per_example_on_a_llama():
    from sft.models import load_model

    model = load_model("tiny:vocab=40,hidden=32,intermediate=64,heads=4,layers=2,max_pos=64", dtype=torch.float64)
    rng = np.random.default_rng(0)
    data = []
    for n in [5, 12, 3, 9, 7, 12]:
        ids = rng.integers(1, 40, n).tolist()
        k = int(rng.integers(1, n - 1))
        data.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
    batched = A.token_probs(model, None, data, batch_size=4, progress=False)
    single = [A.token_probs(model, None, [ex], batch_size=1, progress=False)[0] for ex in data]
    for b, s, ex in zip(batched, single, data):
        assert b.size == len(A.target_tokens(ex))
        np.testing.assert_allclose(b, s, rtol=1e-10)


def _is_png(path):
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures(tmp_path):
    probs = {"base": [np.array([0.9, 0.05, 0.6])], "sft": [np.array([0.95, 0.4, 0.8])]}
    assert _is_png(A.heatmap_png(["a", "b", "\n"], probs["base"][0], tmp_path / "h.png"))
    assert _is_png(A.boxplot_png(probs, tmp_path / "b.png"))
    assert _is_png(A.curriculum_png([0.6, 0.8, 0.9], tmp_path / "c.png"))
    assert _is_png(A.curriculum_png({"ce": [0.6, 0.8], "talr": [0.5, 0.7]}, tmp_path / "c2.png"))
    with pytest.raises(ValueError, match="3 tokens but 2"):
        A.heatmap_png(["a", "b", "c"], [0.1, 0.2], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_cli_analyze(tmp_path):
    from experiments.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: 2+{i}?", "completion": f"A: {2 + i}"}) + "\n"
                            for i in range(5)))
    out = tmp_path / "run"
    rc = main(["analyze", "--model", "a=tiny:hidden=32,intermediate=64,heads=4", "--model", "b=tiny:hidden=32,intermediate=64,heads=4",
               "--data", str(data), "--out", str(out), "--batch-size", "2", "--no-progress", "--seed", "1"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["models"]) == {"a", "b"} and stats["n_examples"] == 5
    s = stats["models"]["a"]
    assert 0 < s["median_p"] < 1 and s["n_tokens"] > 5
    lines = (out / "token_probs.jsonl").read_text().splitlines()
    assert len(lines) == 10
    assert all(_is_png(out / f) for f in ("boxplot.png", "heatmap_a.png", "heatmap_b.png"))
    assert main(["analyze", "--model", "tiny", "--data", str(tmp_path / "missing.jsonl"), "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2


def test_length_batches_bound_padding_and_cover_everything():
    from sft.analysis import length_batches

    lengths = np.array([100, 98, 50, 97, 10, 11, 49, 100])
    batches = length_batches(lengths, batch_size=3, max_pad=0.1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))
    for b in batches:
        assert len(b) <= 3
        padded = len(b) * lengths[b].max()
        assert padded <= 1.1 * lengths[b].sum() or len(b) == 1
    assert [sorted(lengths[b].tolist(), reverse=True) for b in batches][0] == [100, 100, 98]

"""`talr compare`: end to end on a tiny Llama trained by `talr train`, plus the pure pieces."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch = pytest.importorskip("torch")
torch.set_num_threads(min(2, torch.get_num_threads()))

from experiments.cli import main  # noqa: E402
from experiments.compare import (CompareError, EvalSet, build_trees, checkpoints, load_eval_set,  # noqa: E402
                                 pooled_logq, sequence_rows, tree_logqs)
from sft.models import byte_tokenizer, load_model  # noqa: E402

TINY = "tiny:hidden=32,layers=1,heads=2,intermediate=64"
DOMAIN = [("What is 2+3?", "2+3=5. #### 5"), ("What is 4+1?", "4+1=5. #### 5"),
          ("What is 6+2?", "6+2=8. #### 8"), ("What is 3+3?", "3+3=6. #### 6")]
GENERAL = ["def add(a, b):\n    return a + b\n", "The cat sat on the mat.", "def sub(a, b):\n    return a - b\n"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny Llama fine-tuned for 4 steps by `talr train`, checkpoints at steps 2 and 4."""
    d = tmp_path_factory.mktemp("cmp")
    domain = _write(d / "domain.jsonl", [{"prompt": p, "completion": c} for p, c in DOMAIN])
    general = _write(d / "general.jsonl", [{"text": t} for t in GENERAL])
    run = d / "run"
    rc = main(["train", "--model", TINY, "--data", domain, "--out", str(run), "--lr", "3e-3", "--max-steps", "4",
               "--batch-size", "4", "--save-steps", "2", "--save-total-limit", "10", "--no-progress",
               "--logging-steps", "1", "--domain-eval", domain])
    assert rc == 0
    return d, run, domain, general


def test_compare_end_to_end(trained_run, capsys):
    d, run, domain, general = trained_run
    assert [s for s, _ in checkpoints(run)] == [2, 4]
    assert json.loads((run / "config.json").read_text())["domain_eval"] == domain  # recorded by `talr train`
    rc = main(["compare", str(run), "--general", general, "--depth", "12", "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    res = json.loads((run / "compare.json").read_text())
    assert (run / "compare.png").stat().st_size > 1000
    md = (run / "compare.md").read_text()
    assert "Thm E.3" in md and "compare.png" in md
    pts = res["points"]
    assert [p["step"] for p in pts] == [0, 2, 4]
    assert pts[0]["dL_P1_bits"] == 0 and pts[0]["domain_gain_tree_bits"] == 0
    # training on the domain set itself: its code length drops and the fitted tilt points toward p^2
    assert pts[-1]["domain_gain_bits"] > 0 and pts[-1]["domain_gain_tree_bits"] > 0
    assert all(p["lam"] > 0 for p in pts[1:])
    c = res["constants"]
    assert c["H_T"] is not None and c["mu_T"] > 0 and 0 <= c["w_S"] <= 1
    assert all(p["e3_bound_bits"] is not None and p["e3_bound_bits"] > 0 for p in pts[1:])
    # the E.3 bound grows with the accumulated steps
    assert pts[2]["e3_bound_bits"] >= pts[1]["e3_bound_bits"]


def test_initial_model_is_rebuilt_exactly(trained_run):
    """compare's step-0 code length is the one of the model `talr train` started from."""
    from sft.eval.codelength import code_length_bits

    d, run, domain, general = trained_run
    res = json.loads((run / "compare.json").read_text())
    tok = byte_tokenizer()
    model = load_model(TINY, seed=0)
    cl = code_length_bits(model, tok, GENERAL, progress=False)
    assert res["points"][0]["general"]["total_bits"] == pytest.approx(cl.total_bits, rel=1e-9)


def test_missing_eval_sets_are_named(trained_run, capsys):
    d, run, domain, general = trained_run
    rc = main(["compare", str(run), "--domain", domain, "--no-progress"])
    assert rc == 2
    assert "general_eval" in capsys.readouterr().out


def test_pooled_conditionals_are_distributions_and_average():
    """Rows of the tree conditionals sum to 1 over (used tokens, other, EOS); a node shared by two
    sequences holds the average of their conditionals; a lone sequence's rows are kept exactly."""
    tok = byte_tokenizer()
    model = load_model(TINY, seed=1)
    general = EvalSet("g", [None, None], ["xab", "xac"])  # no BOS: "x" is the context
    domain = EvalSet("d", ["x", "y"], ["ab", "b"])
    ts = build_trees(tok, general, domain, depth=4, model_vocab=model.config.vocab_size)
    assert ts.has_other and ts.V == 3 + 1  # used {a, b, c} + other
    rows = sequence_rows(model, ts)
    for r, s in zip(rows, ts.seqs):
        assert r.shape == (len(s) + 1, ts.V + 1)
        np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-9)
    lq = tree_logqs(ts, rows)
    # D2: the root is shared by both domain sequences (prompts x and y): the average
    np.testing.assert_allclose(np.exp(lq["p2"][0]), (rows[2][0] + rows[3][0]) / 2, atol=1e-12)
    # D1: node "a" is shared by "xab" and "xac" (one context): equal rows
    assert ts.seqs[0] == [ord("a"), ord("b")] or tok.decode(ts.seqs[0]) == "ab"
    a = ts.p1.find([0])
    assert a > 0
    np.testing.assert_allclose(np.exp(lq["p1"][a]), rows[0][1], atol=1e-12)
    np.testing.assert_allclose(rows[0][1], rows[1][1], atol=1e-12)
    # hand check of the compression: the 'a' column is q(a | BOS-context) of the full softmax
    ids = torch.tensor([ts.contexts[0] + ts.seqs[0]])
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[0].double(), -1)
    assert rows[0][0, 0] == pytest.approx(float(p[len(ts.contexts[0]) - 1, ts.vocab_ids[0]]), rel=1e-5)
    assert rows[0][0, -1] == pytest.approx(float(p[len(ts.contexts[0]) - 1, tok.eos_token_id]), rel=1e-5)


def test_pooled_logq_weights():
    paths = [np.array([0, 1]), np.array([0, 2])]
    rows = [np.array([[0.5, 0.5], [0.9, 0.1]]), np.array([[0.1, 0.9], [0.2, 0.8]])]
    lq = np.exp(pooled_logq(4, paths, rows, np.array([3.0, 1.0]), 2))
    np.testing.assert_allclose(lq[0], [0.4, 0.6])
    np.testing.assert_allclose(lq[1], [0.9, 0.1])
    np.testing.assert_allclose(lq[3], [0.5, 0.5])  # never visited: uniform


def test_eval_set_forms(tmp_path):
    tok = byte_tokenizer()
    es = load_eval_set(_write(tmp_path / "t.jsonl", [{"text": "hi"}]), tok)
    assert not es.conditional and es.texts == ["hi"]
    es = load_eval_set(_write(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}]), tok)
    assert es.conditional and es.prompts[0].endswith("assistant\n") and es.texts[0].startswith("c")
    with pytest.raises(CompareError, match="mixes"):
        load_eval_set(_write(tmp_path / "m.jsonl", [{"text": "a"}, {"prompt": "p", "completion": "c"}]), tok)
    with pytest.raises(CompareError, match=r"b\.jsonl:1"):
        load_eval_set(_write(tmp_path / "b.jsonl", [{"prompt": "p"}]), tok)
    with pytest.raises(CompareError, match="no such file"):
        load_eval_set(str(tmp_path / "absent.jsonl"), tok)

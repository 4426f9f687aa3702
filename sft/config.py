"""`TrainConfig`: the resolved options of one training run, range-checked where they are parsed.

Torch-free (``talr --help`` and ``talr train --help`` build their flags from it without loading
torch); `sft.trainer` re-exports it. Defaults of the paper live here and are re-exported by the
modules that use them (`sft.losses`, `sft.regularizers`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from theory.checks import check_range

W_MIN = 0.01  # Appendix D.2: "we set this cutoff to 0.01"
CLIP_THRESHOLD = 0.2  # Figure 3(c)
HARD_P = 0.1  # default probability threshold of the hard-token set S in reported statistics
METHOD_NAMES = ("ce", "talr", "dft", "clip")  # losses of `sft.losses`; the rest add a regulariser
KL_COEFF = 0.001  # Appendix C.4: "we add a KL penalty term with coefficient 0.001"
L2_COEFF = 0.01
METHODS = ("ce", "talr", "dft", "clip", "flow", "l2", "kl", "lora")
INF = math.inf

# (field, lo, hi, options of `check_range`): the allowed range of every numeric field
RANGES = [
    ("lr", 0, INF, dict(lo_open=True)), ("epochs", 0, INF, dict(lo_open=True)),
    ("max_steps", -1, INF, dict(integer=True)), ("batch_size", 1, INF, dict(integer=True)),
    ("grad_accum", 1, INF, dict(integer=True)), ("warmup", 0, INF, {}), ("weight_decay", 0, INF, {}),
    ("max_grad_norm", 0, INF, {}), ("seed", 0, 2**32 - 1, dict(integer=True)),
    ("tau", 0, INF, dict(lo_open=True, allow_none=True)), ("w_min", 0, 1, {}),
    ("clip_threshold", 0, 1, dict(hi_open=True)), ("hard_p", 0, 1, dict(lo_open=True)),
    ("l2_coeff", 0, INF, {}), ("kl_coeff", 0, INF, {}), ("lora_r", 1, INF, dict(integer=True)),
    ("lora_alpha", 0, INF, dict(lo_open=True)), ("lora_dropout", 0, 1, dict(hi_open=True)),
    ("chunk_size", 1, INF, dict(integer=True, allow_none=True)), ("save_steps", 0, INF, dict(integer=True)),
    ("save_total_limit", 1, INF, dict(integer=True, allow_none=True)), ("logging_steps", 1, INF, dict(integer=True)),
    ("dataloader_num_workers", 0, INF, dict(integer=True)),
]


@dataclass
class TrainConfig:
    """Resolved training configuration (HfArgumentParser-compatible; every field has help)."""

    method: str = field(default="ce", metadata={"help": "ce|talr|dft|clip|flow|l2|kl|lora"})
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
    tau: float | None = field(default=None, metadata={"help": "TALR temperature; None = median per-sequence loss"})
    tau_scope: str = field(default="micro", metadata={"help": "median over: micro (micro-batch) | step (all "
                                                              "micro-batches and processes of a step)"})
    w_min: float = field(default=W_MIN, metadata={"help": "TALR weight floor (Appendix D.2: 0.01)"})
    clip_threshold: float = field(default=CLIP_THRESHOLD, metadata={"help": "clip: keep tokens with p > this"})
    hard_p: float = field(default=HARD_P, metadata={"help": "statistics: a token is hard when p < hard_p"})
    # regularisers, LoRA
    l2_coeff: float = field(default=L2_COEFF, metadata={"help": "l2: coefficient of ||theta - theta0||^2"})
    kl_coeff: float = field(default=KL_COEFF, metadata={"help": "kl: coefficient of the k3 KL (C.4: 0.001)"})
    lora_r: int = field(default=8, metadata={"help": "lora: rank"})
    lora_alpha: int = field(default=16, metadata={"help": "lora: alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "lora: dropout"})
    lora_targets: str = field(default="all-linear", metadata={"help": "lora: target modules (comma list or "
                                                                      "all-linear)"})
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
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {METHODS}")
        if self.tau_scope not in ("micro", "step"):
            raise ValueError(f"tau_scope {self.tau_scope!r}: expected 'micro' or 'step'")
        for name, lo, hi, opt in RANGES:
            check_range(name, getattr(self, name), lo, hi, **opt)
        if self.max_steps == 0:
            raise ValueError("max_steps: 0 is outside {-1} U [1, inf)")

    @property
    def loss_method(self) -> str:
        return self.method if self.method in METHOD_NAMES else "ce"

"""SFT on the ``transformers.Trainer`` with token-weighted losses, regularisers, LoRA and stats.

One entry: ``train(config, model, train_dataset) -> TrainResult``. ``config.method`` picks

=======  ==========================================================================
ce       standard SFT (cross entropy)
talr     TALR, Algorithm 1 (tau: fixed, or median per-sequence loss; scope micro|step)
dft      DFT, w = sg(p)
clip     only tokens with p > clip_threshold (Figure 3c)
flow     CE with FLOW's static sequence weights (`sft.weighting`), computed before training
l2       CE + l2_coeff * ||theta - theta0||^2
kl       CE + kl_coeff * k3-KL to the frozen initial model (Appendix C.4)
lora     CE on a LoRA adapter (peft)
=======  ==========================================================================

Optimiser AdamW (beta = 0.9, 0.999) with a cosine schedule (Appendix C.2). Loss reduction is
``sum / N`` with N the supervised-token count of the whole step over all micro-batches and all
processes (counted in `get_batch_samples`), so accumulation and several processes equal one
large batch. With ``tau_scope="step"`` TALR's tau comes from a no-grad pre-pass over all
micro-batches of the step (gathered over processes): one extra forward per step, exact
equivalence; ``"micro"`` (default) uses each micro-batch's own median at no cost.

Run folder ``out/``: ``config.json`` (resolved), ``token_stats.jsonl`` (one line per optimizer
step: tau, weight quantiles, fraction p > 0.2, hard-token fraction, ...), ``metrics.jsonl``
(Trainer logs), ``checkpoint-*`` (model, optimizer, scheduler, RNG: exact resume), ``final/``,
``result.json``. A non-finite loss raises before its backward, stops the run, writes
``result.json`` with status ``non_finite_loss``, keeps the last checkpoint (the last good one:
no checkpoint is written after the bad step) and restores the in-memory model from it.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import losses as L
from .data import PadCollator
from .models import lm_head_of, token_nll  # also sets HF_HUB_OFFLINE before transformers loads
from .regularizers import KL_COEFF, L2_COEFF, KLToReference, L2ToInit
from .weighting import attach_flow_weights, write_json_atomic

METHODS = ("ce", "talr", "dft", "clip", "flow", "l2", "kl", "lora")


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
    w_min: float = field(default=L.W_MIN, metadata={"help": "TALR weight floor (Appendix D.2: 0.01)"})
    clip_threshold: float = field(default=L.CLIP_THRESHOLD, metadata={"help": "clip: keep tokens with p > this"})
    hard_p: float = field(default=L.HARD_P, metadata={"help": "statistics: a token is hard when p < hard_p"})
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

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {METHODS}")
        if self.tau_scope not in ("micro", "step"):
            raise ValueError(f"tau_scope {self.tau_scope!r}: expected 'micro' or 'step'")

    @property
    def loss_method(self) -> str:
        return self.method if self.method in L.METHOD_NAMES else "ce"


@dataclass
class TrainResult:
    model: nn.Module
    run_dir: Path
    status: str  # "completed" | "non_finite_loss"
    global_step: int
    train_loss: float
    last_checkpoint: Path | None
    log_history: list[dict[str, Any]]
    message: str = ""

    @property
    def token_stats_path(self) -> Path:
        return self.run_dir / "token_stats.jsonl"


class NonFiniteLoss(RuntimeError):
    """Raised inside a step whose loss is NaN or inf (before its backward)."""


# ----------------------------------------------------------------------------------------------
# distributed helpers (no-ops in one process)
# ----------------------------------------------------------------------------------------------
def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length over processes."""
    if _world() == 1:
        return t
    import torch.distributed as dist

    parts: list[Any] = [None] * _world()
    dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat(parts).to(t.device)


# ----------------------------------------------------------------------------------------------
# the Trainer
# ----------------------------------------------------------------------------------------------
class StepStats:
    """Per-token (nll, weight) and tau of the micro-batches of the current step (detached)."""

    def __init__(self):
        self.nll: list[torch.Tensor] = []
        self.w: list[torch.Tensor] = []
        self.tau: list[float] = []

    def add(self, nll, w, tau):
        self.nll.append(nll.detach())
        self.w.append(w.detach())
        if tau is not None:
            self.tau.append(float(tau))

    def flush(self, hard_p: float, w_min: float | None) -> dict[str, float]:
        nll = _gather_cat(torch.cat(self.nll)) if self.nll else torch.zeros(0)
        w = _gather_cat(torch.cat(self.w)) if self.w else torch.zeros(0)
        tau = sum(self.tau) / len(self.tau) if self.tau else None
        self.__init__()
        return L.token_stats(nll, w, tau, hard_p=hard_p, w_min=w_min)


class TokenWeightedTrainer(Trainer):
    """``Trainer`` whose loss is one of `sft.losses` plus an optional regulariser."""

    def __init__(self, *args, sft_config: TrainConfig, l2: L2ToInit | None = None,
                 kl: KLToReference | None = None, step_stats: StepStats | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sft_config = sft_config
        self.l2, self.kl, self.step_stats = l2, kl, step_stats
        self.loss_is_scaled_for_ga = True  # our loss divides by the step's global token count
        self._step_tau: torch.Tensor | None = None
        self._micro_in_step = 1

    # -- one optimizer step's micro-batches: global token count and (step scope) tau --------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        self._micro_in_step = max(len(batches), 1)
        if not batches:
            return batches, None
        n = sum(int((b["labels"][:, 1:] != L.IGNORE_INDEX).sum()) for b in batches)
        n = torch.tensor(n, device=device)
        if self.accelerator.num_processes > 1:
            n = self.accelerator.gather(n.reshape(1)).sum()
        cfg = self.sft_config
        self._step_tau = None
        if cfg.loss_method == "talr" and cfg.tau is None and cfg.tau_scope == "step":
            self._step_tau = self._prepass_tau(batches)
        return batches, n

    @torch.no_grad()
    def _prepass_tau(self, batches) -> torch.Tensor:
        model = self.model
        was = model.training
        model.train()
        means = []
        for b in batches:
            b = self._prepare_inputs(dict(b))
            with self.compute_loss_context_manager():
                nll, si = token_nll(model, b["input_ids"], b.get("attention_mask"), b["labels"],
                                    chunked=self.sft_config.chunked, chunk_size=self.sft_config.chunk_size)
            means.append(L.sequence_mean_losses(nll.float() if nll.dtype == torch.bfloat16 else nll, si,
                                                b["labels"].shape[0]))
        model.train(was)
        return L.talr_tau(_gather_cat(torch.cat(means)))

    # -- the loss -----------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.sft_config
        labels = inputs["labels"]
        seq_w = inputs.get("flow_weight")
        nll, seq_index = token_nll(model, inputs["input_ids"], inputs.get("attention_mask"), labels,
                                   chunked=cfg.chunked, chunk_size=cfg.chunk_size)
        tau = cfg.tau if cfg.tau is not None else self._step_tau
        w, tau_used = L.token_weights(cfg.loss_method, nll, seq_index, labels.shape[0], tau=tau,
                                      w_min=cfg.w_min, threshold=cfg.clip_threshold)
        loss = L.reduce(L.weighted_sum(nll, w, seq_index, sequence_weights=seq_w), nll.numel(),
                        num_items_in_batch)
        if self.kl is not None:
            with torch.no_grad():
                ref_nll, _ = token_nll(self.kl.ref_model, inputs["input_ids"], inputs.get("attention_mask"),
                                       labels, chunked=cfg.chunked, chunk_size=cfg.chunk_size)
            loss = loss + self.kl.penalty(nll, ref_nll, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if self.l2 is not None:
            loss = loss + self.l2(unwrap_trainable(model)) / self._micro_in_step
        self._check_finite(loss)
        if self.step_stats is not None:
            self.step_stats.add(nll, w, tau_used)
        return (loss, None) if return_outputs else loss

    def _check_finite(self, loss):
        ok = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1:
            raise NonFiniteLoss(f"non-finite loss at step {self.state.global_step + 1}")


def unwrap_trainable(model: nn.Module) -> nn.Module:
    """The module whose named_parameters match the L2 snapshot (DDP unwrapped, peft kept)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _callbacks(run_dir: Path, cfg: TrainConfig, step_stats: StepStats | None):
    class TokenStatsCallback(TrainerCallback):
        """Writes one JSON line of token statistics per optimizer step to token_stats.jsonl."""

        def __init__(self):
            self.path = run_dir / "token_stats.jsonl"

        def on_step_end(self, args, state, control, **kw):
            stats = step_stats.flush(cfg.hard_p, cfg.w_min if cfg.loss_method == "talr" else None)
            if state.is_world_process_zero:
                line = {"step": state.global_step, "epoch": state.epoch, "method": cfg.method,
                        "tau_scope": cfg.tau_scope if cfg.loss_method == "talr" else None, **stats}
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(_finite_or_none(line)) + "\n")

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(_finite_or_none({"step": state.global_step, **logs})) + "\n")

    cbs = [MetricsCallback()]
    if step_stats is not None:
        cbs.append(TokenStatsCallback())
    return cbs


def _finite_or_none(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop lines with step > max_step (a killed run may have logged past its last checkpoint)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint-N folder with the largest N under ``run_dir``, or None."""
    ck = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(ck, key=lambda p: int(p.name.split("-")[-1])) if ck else None


def _training_args(cfg: TrainConfig, run_dir: Path):
    kw = dict(
        output_dir=str(run_dir), per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=max(cfg.save_steps, 1), save_total_limit=cfg.save_total_limit, report_to="none",
        disable_tqdm=not cfg.progress, remove_unused_columns=False, bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing, dataloader_pin_memory=torch.cuda.is_available(), dataloader_num_workers=cfg.dataloader_num_workers,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        average_tokens_across_devices=True, save_only_model=False,
    )
    if not torch.cuda.is_available():  # CPU: accelerate's MULTI_CPU (gloo) under torchrun
        kw["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kw["ddp_backend"] = "gloo"
    return TrainingArguments(**kw)


def _apply_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    torch.manual_seed(cfg.seed)
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                    task_type="CAUSAL_LM")
    return get_peft_model(model, lc)


def train(config: TrainConfig, model: nn.Module, train_dataset: Sequence[dict], *, tokenizer=None,
          ref_model: nn.Module | None = None, pad_token_id: int | None = None, callbacks: Sequence = (),
          extra_config: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune ``model`` in place on ``train_dataset`` and return a `TrainResult`.

    ``train_dataset``: examples ``{"input_ids": [...], "labels": [...]}`` (an `sft.data.SFTDataset`
    or any sequence of such dicts; ``flow_weight`` is added for ``method="flow"`` when absent).
    ``ref_model``: the frozen reference for ``kl`` (default: a copy of ``model`` at the start).
    ``extra_config``: more fields to record in ``config.json`` (model / data paths, ...).
    """
    cfg = config
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False

    resume = cfg.resume_from_checkpoint
    if resume == "last":
        resume = last_checkpoint(run_dir)
        if resume is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint-* to resume from")
    if resume is not None:
        resume = str(resume)
        step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
        _truncate_jsonl(run_dir / "token_stats.jsonl", step)
        _truncate_jsonl(run_dir / "metrics.jsonl", step)
    else:
        for name in ("token_stats.jsonl", "metrics.jsonl"):
            if (run_dir / name).exists() and int(os.environ.get("RANK", "0")) == 0:
                (run_dir / name).unlink()

    if cfg.method == "flow" and "flow_weight" not in train_dataset[0]:
        train_dataset, _ = attach_flow_weights(model, train_dataset, batch_size=cfg.batch_size,
                                               pad_token_id=pad_token_id, progress=cfg.progress,
                                               save_to=run_dir / "flow_weights.json")
    kl = None
    if cfg.method == "kl":
        kl = KLToReference(ref_model if ref_model is not None else copy.deepcopy(model), cfg.kl_coeff)
    if cfg.method == "lora":
        model = _apply_lora(model, cfg)
    l2 = L2ToInit(model, cfg.l2_coeff) if cfg.method == "l2" else None

    if int(os.environ.get("RANK", "0")) == 0:
        write_json_atomic(run_dir / "config.json", {**(extra_config or {}), **asdict(cfg),
                                                    "chunked_lm_head": lm_head_of(model) is not None})
    step_stats = StepStats() if cfg.token_stats else None
    args = _training_args(cfg, run_dir)
    trainer = TokenWeightedTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=PadCollator(pad_token_id),
                  processing_class=tokenizer, callbacks=[*_callbacks(run_dir, cfg, step_stats), *callbacks],
                  sft_config=cfg, l2=l2, kl=kl, step_stats=step_stats, compute_loss_func=_loss_func(cfg))
    if not cfg.progress:  # quiet programmatic runs: no per-log printing either
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    status, message, train_loss = "completed", "", math.nan
    try:
        out = trainer.train(resume_from_checkpoint=resume)
        train_loss = out.training_loss
    except NonFiniteLoss as exc:
        status, message = "non_finite_loss", str(exc)
        good = last_checkpoint(run_dir)
        if good is not None:
            _restore_weights(trainer, good)
        for cb in trainer.callback_handler.callbacks:  # close progress bars
            bar = getattr(cb, "training_bar", None)
            if bar is not None:
                bar.close()
                cb.training_bar = None
    if status == "completed" and cfg.save_final:
        trainer.save_model(str(run_dir / "final"))
    result = TrainResult(model=trainer.model, run_dir=run_dir, status=status, global_step=trainer.state.global_step,
                         train_loss=train_loss, last_checkpoint=last_checkpoint(run_dir),
                         log_history=list(trainer.state.log_history), message=message)
    if trainer.is_world_process_zero():
        write_json_atomic(run_dir / "result.json", {
            "status": status, "message": message, "global_step": result.global_step, "train_loss": train_loss
            if math.isfinite(train_loss) else None, "last_checkpoint": str(result.last_checkpoint or "") or None})
    return result


def _restore_weights(trainer, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("*.safetensors"))
    model = unwrap_trainable(trainer.model)
    if hasattr(model, "load_adapter") and (checkpoint / "adapter_config.json").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
        return
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    model.load_state_dict(state, strict=False)


def _loss_func(cfg: TrainConfig):
    """The data loss as a Trainer ``compute_loss_func(outputs, labels, num_items_in_batch)`` on
    full logits (what the Trainer would call with an unmodified compute_loss; our compute_loss
    uses the chunked form of the same function)."""

    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        return L.sft_loss(cfg.loss_method, outputs.logits, labels, num_items_in_batch=num_items_in_batch,
                          tau=cfg.tau, w_min=cfg.w_min, threshold=cfg.clip_threshold)

    return compute_loss_func


def config_fields() -> list:
    """Fields of `TrainConfig` (for CLIs)."""
    return list(fields(TrainConfig))

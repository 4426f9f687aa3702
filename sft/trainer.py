"""SFT on the ``transformers.Trainer`` with token-weighted losses, regularisers, LoRA and stats.

Entries: ``train(config, model, train_dataset) -> TrainResult`` (prepare the run folder, build,
run, write the result) and ``build_trainer(config, model, train_dataset)`` (the configured
`TokenWeightedTrainer` alone, for benches and studies that drive it themselves).
``config.method`` picks a record of `sft.methods` (``talr --help`` lists them): its token weight
(`sft.losses`), FLOW's sequence weights (`sft.weighting`), a regulariser (`sft.regularizers`:
L2 to theta0, k3-KL to the frozen initial model) or a LoRA adapter (peft).

Optimiser AdamW (beta = 0.9, 0.999) with a cosine schedule (Appendix C.2). Loss reduction is
``sum / N`` with N the supervised-token count of the whole step over all micro-batches and all
processes (counted in `get_batch_samples`), so accumulation and several processes equal one
large batch. With ``tau_scope="step"`` TALR's tau comes from a no-grad pre-pass over all
micro-batches of the step (gathered over processes): one extra forward per step, exact
equivalence; ``"micro"`` (default) uses each micro-batch's own median at no cost.

Run folder ``out/``: ``config.json`` (resolved), ``token_stats.jsonl`` (one line per optimizer
step: tau, weight quantiles, fraction p > 0.2, hard-token fraction, ...), ``metrics.jsonl``
(Trainer logs), ``checkpoint-*`` (model, optimizer, scheduler, RNG: exact resume), ``final/``,
``result.json``. The folder must be empty unless the run resumes (``resume_from_checkpoint``) or
``overwrite`` replaces it: two runs never mix (`sft.runs.prepare_run_dir`).

Checkpoints are atomic: written under ``.partial/`` and renamed into place when complete
(`sft.runs`), so ``resume_from_checkpoint="last"`` after a ``kill -9`` during a save resumes
from the last complete one.

Non-finite guard: a non-finite loss raises before its backward; non-finite gradients raise
before the optimizer step; non-finite parameters raise after it; and before a checkpoint is
written the last micro-batch is re-scored under the new weights (eval mode, no gradient): a
non-finite loss there (weights blown up to ~1e30 give inf activations) refuses the checkpoint.
Each stops the run with status ``non_finite_loss`` in ``result.json``, keeps the last written
checkpoint (finite, from before the divergence) and restores the in-memory model from it.
A loss that rises above `DIVERGENCE_RATIO` times its first value completes with a warning
(``TrainResult.warnings``, ``result.json``). A run whose model ends worse than it started does
not complete: the first micro-batch is re-scored under the final weights, and a mean token loss
above its value at the start, or every token at probability 1/V (collapse to uniform), gives
status ``diverged`` with a warning (`TokenWeightedTrainer.end_problem`; the loss rise is only a
warning for TALR, DFT and clipping, which do not minimise the mean token loss).

The run folder is locked for the life of the run (`sft.runs.open_run_dir`); resuming checks
that the configuration and the data's sha256 match the run's ``config.json``
(`sft.runs.config_mismatch`). Ctrl-C writes ``result.json`` with status ``interrupted`` and
raises `TrainingInterrupted` (a ``KeyboardInterrupt``); a full disk removes the half-written
``.partial/`` checkpoint, writes status ``disk_full`` when it can, and raises `DiskFull`.
"""
from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import losses as L
from .config import METHODS, TrainConfig  # noqa: F401  (re-exported: sft.trainer.TrainConfig)
from .data import PadCollator, as_sft_dataset
from .io import atomic_write_json, atomic_write_text, publish_dir, remove_dir, to_jsonable
from .models import lm_head_of, token_nll  # also sets HF_HUB_OFFLINE before transformers loads
from .regularizers import KLToReference, L2ToInit
from .runs import PARTIAL, RunDirError, complete_checkpoints, config_mismatch, last_checkpoint, open_run_dir
from .weighting import attach_flow_weights

DIVERGENCE_RATIO = 100.0  # final / first loss above this: "diverged" warning


@dataclass
class TrainResult:
    model: nn.Module
    run_dir: Path
    status: str  # "completed" | "non_finite_loss" | "diverged" | "interrupted" | "disk_full"
    global_step: int
    train_loss: float
    last_checkpoint: Path | None
    log_history: list[dict[str, Any]]
    message: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def token_stats_path(self) -> Path:
        return self.run_dir / "token_stats.jsonl"


class NonFiniteLoss(RuntimeError):
    """Raised inside a step whose loss is NaN or inf (before its backward)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `train`: ``result.json`` says ``interrupted``; ``.result`` is the `TrainResult`."""

    def __init__(self, result: "TrainResult"):
        super().__init__(result.message)
        self.result = result


class DiskFull(OSError):
    """The disk filled up while the run wrote into its folder (the half-written checkpoint is removed)."""


_DISK_FULL_TEXT = ("no space left", "unexpected pos", "file write failed", "storagefull", "disk quota")


def _is_disk_full(exc: BaseException) -> bool:
    """True for the errors a full disk gives: ENOSPC/EDQUOT, torch's "unexpected pos" / "file write
    failed" (`torch.save`), safetensors' StorageFull."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(t in str(exc).lower() for t in _DISK_FULL_TEXT)


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
        self._last_inputs: dict | None = None  # re-scored before a checkpoint is written
        self.loss_first: float | None = None  # first and largest finite micro-batch losses
        self.loss_max: float | None = None
        self._first_inputs: dict | None = None  # re-scored at the end (`end_problem`)
        self._first_nll: float | None = None

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
        if cfg.method_record.tau and cfg.tau is None and cfg.tau_scope == "step":
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
        w, tau_used = L.token_weights(cfg.method, nll, seq_index, labels.shape[0], tau=tau, **cfg.weight_options())
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
        self._last_inputs = inputs
        if self._first_inputs is None:
            self._first_inputs, self._first_nll = inputs, float(nll.detach().float().mean())
        if self.step_stats is not None:
            self.step_stats.add(nll, w, tau_used)
        return (loss, None) if return_outputs else loss

    def all_finite(self, value: torch.Tensor) -> bool:
        """True when ``value`` is finite on every process (one all-reduce under DDP)."""
        ok = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return ok.item() == 1

    def _check_finite(self, loss):
        value = float(loss.detach())
        if not self.all_finite(loss):
            raise NonFiniteLoss(f"non-finite loss at step {self.state.global_step + 1}")
        if self.loss_first is None:
            self.loss_first = value
        self.loss_max = max(value, self.loss_max or value)

    # -- atomic checkpoints, written only when the weights are finite ------------------------
    def check_weights_finite(self, what: str) -> None:
        """Raise `NonFiniteLoss` unless every parameter is finite and the last micro-batch's
        loss under the current weights is finite (eval mode: no dropout, no RNG consumed)."""
        model = unwrap_trainable(self.model)
        params = [p.detach() for p in model.parameters()]
        if not self.all_finite(torch.nn.utils.get_total_norm(params, error_if_nonfinite=False)):
            raise NonFiniteLoss(f"non-finite parameters after step {self.state.global_step}; {what}")
        b = self._last_inputs
        if b is None:
            return
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), self.compute_loss_context_manager():
                nll, _ = token_nll(model, b["input_ids"], b.get("attention_mask"), b["labels"],
                                   chunked=self.sft_config.chunked, chunk_size=self.sft_config.chunk_size)
        finally:
            model.train(was)
        if not self.all_finite(nll.sum()):
            raise NonFiniteLoss(f"non-finite loss under the weights of step {self.state.global_step} "
                                f"(diverged); {what}")

    @torch.no_grad()
    def end_problem(self) -> tuple[bool, str] | None:
        """``(fatal, why)`` when the final model is worse than the initial one, else None: the
        first micro-batch, re-scored under the final weights (eval mode), has every token at
        probability 1/V (collapse to uniform: loss = ln V; always fatal) or a mean token loss above
        its value at the start (fatal for the CE objectives; TALR, DFT and clipping do not minimise
        the plain mean, so for them it is a warning)."""
        b = self._first_inputs
        if b is None:
            return None
        model = unwrap_trainable(self.model)
        was = model.training
        model.eval()
        try:
            with self.compute_loss_context_manager():
                nll, _ = token_nll(model, b["input_ids"], b.get("attention_mask"), b["labels"],
                                   chunked=self.sft_config.chunked, chunk_size=self.sft_config.chunk_size)
        finally:
            model.train(was)
        nll = nll.float()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = int(head.weight.shape[0]) if getattr(head, "weight", None) is not None else 0
        final, first = float(nll.mean()), self._first_nll
        code = 0
        if vocab > 1 and nll.numel() and float((nll - math.log(vocab)).abs().max()) < 1e-3:
            code = 2
        elif final > first + 1e-4 * abs(first):
            code = 1
        if self.accelerator.num_processes > 1:  # one verdict for all processes
            import torch.distributed as dist

            t = torch.tensor([code], dtype=torch.float32, device=nll.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        lr = f"lower the learning rate (lr={self.sft_config.lr:g})"
        if code == 2:
            return True, (f"training collapsed: every token has probability 1/{vocab} under the final weights "
                          f"(loss = ln {vocab} = {math.log(vocab):.4f} nats/token, the uniform distribution); {lr}")
        if code == 1:
            return self.sft_config.loss_method == "ce", (
                f"training diverged: the mean token loss of the first batch rose from {first:.4g} to {final:.4g} "
                f"nats/token under the final weights; {lr}")
        return None

    def _save_checkpoint(self, model, trial):
        """Save into ``.partial/checkpoint-N`` and rename it into place when complete."""
        step = self.state.global_step
        self.check_weights_finite(f"checkpoint-{step} not written")
        run_dir = Path(self.args.output_dir)
        staging = run_dir / PARTIAL
        if self.args.should_save:
            remove_dir(staging / f"checkpoint-{step}")
        self.accelerator.wait_for_everyone()
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(run_dir)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_dir(staging / f"checkpoint-{step}", run_dir / f"checkpoint-{step}", overwrite=True)
            limit = self.sft_config.save_total_limit
            done = complete_checkpoints(run_dir, warn=False)
            for _, old in done[:max(len(done) - limit, 0)] if limit else []:
                remove_dir(old)
        self.accelerator.wait_for_everyone()


def unwrap_trainable(model: nn.Module) -> nn.Module:
    """The module whose named_parameters match the L2 snapshot (DDP unwrapped, peft kept)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class FiniteGuard(TrainerCallback):
    """Stops the run on non-finite gradients (before the optimizer step) or parameters (after)."""

    def __init__(self, trainer: TokenWeightedTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kw):
        model = unwrap_trainable(self.trainer.model)
        grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
        if grads and not self.trainer.all_finite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)):
            raise NonFiniteLoss(f"non-finite gradients at step {state.global_step + 1}")

    def on_optimizer_step(self, args, state, control, **kw):
        model = unwrap_trainable(self.trainer.model)
        params = [p.detach() for p in model.parameters()]
        if not self.trainer.all_finite(torch.nn.utils.get_total_norm(params, error_if_nonfinite=False)):
            raise NonFiniteLoss(f"non-finite parameters after the optimizer step of step {state.global_step + 1}")


def run_callbacks(run_dir: Path, cfg: TrainConfig, step_stats: StepStats | None) -> list[TrainerCallback]:
    """The run-folder writers: ``metrics.jsonl`` and (with ``step_stats``) ``token_stats.jsonl``."""
    class TokenStatsCallback(TrainerCallback):
        """Writes one JSON line of token statistics per optimizer step to token_stats.jsonl."""

        def __init__(self):
            self.path = run_dir / "token_stats.jsonl"

        def on_step_end(self, args, state, control, **kw):
            stats = step_stats.flush(cfg.hard_p, cfg.w_min if L.has_floor(cfg.method) else None)
            if state.is_world_process_zero:
                line = {"step": state.global_step, "epoch": state.epoch, "method": cfg.method,
                        "tau_scope": cfg.tau_scope if cfg.method_record.tau else None, **stats}
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(to_jsonable(line), allow_nan=False) + "\n")

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(to_jsonable({"step": state.global_step, **logs}), allow_nan=False) + "\n")

    cbs = [MetricsCallback()]
    if step_stats is not None:
        cbs.append(TokenStatsCallback())
    return cbs


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop lines with step > max_step (a killed run may have logged past its last checkpoint)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def training_args(cfg: TrainConfig, run_dir: Path) -> TrainingArguments:
    """The `TrainingArguments` of ``cfg`` (AdamW 0.9/0.999, cosine; checkpoint rotation is ours)."""
    kw = dict(
        output_dir=str(run_dir), per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=max(cfg.save_steps, 1), save_total_limit=None, report_to="none",
        disable_tqdm=not cfg.progress, remove_unused_columns=False, bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing, dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=cfg.dataloader_num_workers,
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
    try:
        return get_peft_model(model, lc)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora_targets {cfg.lora_targets!r}: no module of the model matches ({exc}); "
                         f"its linear layers are {', '.join(names)} (or use all-linear)") from None


def build_trainer(config: TrainConfig, model: nn.Module, train_dataset, *, tokenizer=None,
                  ref_model: nn.Module | None = None, pad_token_id: int | None = None,
                  callbacks: Sequence = ()) -> TokenWeightedTrainer:
    """The `TokenWeightedTrainer` of ``config``: loss, regulariser, LoRA, FLOW weights, padding
    collator, run-folder writers and the non-finite guard. Writes nothing but FLOW's weights
    (``out/flow_weights.json``); call ``.train()`` on it, or use `train` for the whole run.

    ``train_dataset``: tokenized examples ``{"input_ids", "labels"}`` (an `sft.data.SFTDataset`,
    a list of dicts or a ``datasets.Dataset``), or untokenized rows (prompt/completion, messages)
    when ``tokenizer`` is given; see `sft.data.as_sft_dataset`.
    ``ref_model``: the frozen reference for ``kl`` (default: a copy of ``model`` at the start).
    """
    cfg = config
    run_dir = Path(cfg.out)
    train_dataset = as_sft_dataset(train_dataset, tokenizer)
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    method = cfg.method_record
    if method.sequence_weights == "flow" and "flow_weight" not in train_dataset[0]:
        train_dataset, _ = attach_flow_weights(model, train_dataset, batch_size=cfg.batch_size,
                                               pad_token_id=pad_token_id, progress=cfg.progress,
                                               save_to=run_dir / "flow_weights.json")
    kl = None
    if method.regularizer == "kl":
        kl = KLToReference(ref_model if ref_model is not None else copy.deepcopy(model), cfg.kl_coeff)
    if method.lora:
        model = _apply_lora(model, cfg)
    l2 = L2ToInit(model, cfg.l2_coeff) if method.regularizer == "l2" else None
    step_stats = StepStats() if cfg.token_stats else None
    trainer = TokenWeightedTrainer(model=model, args=training_args(cfg, run_dir), train_dataset=train_dataset,
                                   data_collator=PadCollator(pad_token_id), processing_class=tokenizer,
                                   callbacks=[*run_callbacks(run_dir, cfg, step_stats), *callbacks],
                                   sft_config=cfg, l2=l2, kl=kl, step_stats=step_stats)
    trainer.add_callback(FiniteGuard(trainer))
    if not cfg.progress:  # quiet programmatic runs: no per-log printing either
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _resolve_resume(cfg: TrainConfig, run_dir: Path) -> str | None:
    resume = cfg.resume_from_checkpoint
    if resume == "last":
        resume = last_checkpoint(run_dir)
        if resume is None:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint-* to resume from")
    if resume is None:
        return None
    step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
    _truncate_jsonl(run_dir / "token_stats.jsonl", step)
    _truncate_jsonl(run_dir / "metrics.jsonl", step)
    return str(resume)


def train(config: TrainConfig, model: nn.Module, train_dataset, *, tokenizer=None,
          ref_model: nn.Module | None = None, pad_token_id: int | None = None, callbacks: Sequence = (),
          extra_config: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune ``model`` in place on ``train_dataset`` and return a `TrainResult`.

    Prepares the run folder (refuses a non-empty one unless resuming or ``overwrite``), builds
    the trainer (`build_trainer`, which documents the arguments), writes ``config.json``, trains,
    and writes ``result.json``. ``extra_config``: more fields for ``config.json`` (model / data
    paths, ...).
    """
    cfg = config
    run_dir = Path(cfg.out)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if cfg.resume_from_checkpoint == "last" and not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint-* to resume from (no such folder)")
    lock = open_run_dir(run_dir, resume=cfg.resume_from_checkpoint is not None, overwrite=cfg.overwrite) \
        if rank0 else None  # held until the run ends: a second process is refused at once
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not cfg.progress:  # also transformers' own bars (weights loading, shard writing), restored below
        hf_logging.disable_progress_bar()
    try:
        if cfg.resume_from_checkpoint is not None:
            _check_resume_config(cfg, run_dir, extra_config)
        resume = _resolve_resume(cfg, run_dir)
        return _run(cfg, run_dir, resume, rank0, model, train_dataset, tokenizer, ref_model, pad_token_id, callbacks,
                    extra_config)
    finally:
        if lock is not None:
            lock.discard_if_unused()  # a run that failed before writing anything leaves no empty folder
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _check_resume_config(cfg: TrainConfig, run_dir: Path, extra_config: dict | None) -> None:
    """Refuse to resume a run whose ``config.json`` differs from this one (method, lr, data ...)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: unreadable ({exc.__class__.__name__}); cannot check the run to resume") from None
    diff = config_mismatch(old, {**(extra_config or {}), **asdict(cfg)})
    if diff:
        raise RunDirError(f"{run_dir}: --resume-from-checkpoint refused: this run was started with another "
                          f"configuration ({'; '.join(diff)}); resume with the same options and data, or start "
                          f"a new run (another --out, or --overwrite)")


def _run(cfg, run_dir, resume, rank0, model, train_dataset, tokenizer, ref_model, pad_token_id, callbacks,
         extra_config) -> TrainResult:
    trainer = build_trainer(cfg, model, train_dataset, tokenizer=tokenizer, ref_model=ref_model,
                            pad_token_id=pad_token_id, callbacks=callbacks)
    if rank0:
        atomic_write_json(run_dir / "config.json", {**(extra_config or {}), **asdict(cfg),
                                                    "chunked_lm_head": lm_head_of(trainer.model) is not None})
    status, message, train_loss, notes = "completed", "", math.nan, []
    try:
        out = trainer.train(resume_from_checkpoint=resume)
        train_loss = out.training_loss
    except KeyboardInterrupt:
        _stopped(trainer, run_dir, rank0, "interrupted",
                 f"interrupted at step {trainer.state.global_step}", TrainingInterrupted)
    except NonFiniteLoss as exc:
        status, message = "non_finite_loss", _after_non_finite(trainer, run_dir, str(exc))
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        _stopped(trainer, run_dir, rank0, "disk_full",
                 f"disk full at step {trainer.state.global_step} ({str(exc).strip().splitlines()[-1][:200]})", DiskFull)
    if status == "completed":
        status, message, notes = _end_checks(trainer, cfg)
    if status == "completed" and cfg.save_final:  # atomic, like the checkpoints
        _save_final(trainer, run_dir, rank0)
    if rank0 and (run_dir / PARTIAL).is_dir() and not any((run_dir / PARTIAL).iterdir()):
        (run_dir / PARTIAL).rmdir()
    result = TrainResult(model=trainer.model, run_dir=run_dir, status=status, global_step=trainer.state.global_step,
                         train_loss=train_loss, last_checkpoint=last_checkpoint(run_dir, warn=False),
                         log_history=list(trainer.state.log_history), message=message, warnings=notes)
    if trainer.is_world_process_zero():
        atomic_write_json(run_dir / "result.json", {
            "status": status, "message": message, "global_step": result.global_step, "train_loss": train_loss,
            "last_checkpoint": str(result.last_checkpoint or "") or None, "warnings": notes})
    return result


def _after_non_finite(trainer, run_dir: Path, message: str) -> str:
    """Restore the last (finite) checkpoint after a non-finite stop; the message for result.json."""
    good = last_checkpoint(run_dir, warn=False)
    if good is not None:
        _restore_weights(trainer, good)
        message += f"; model restored from {good.name}"
    else:
        message += "; no checkpoint from before the divergence: the returned model is not usable"
    _close_bars(trainer)
    return message


def _end_checks(trainer, cfg: TrainConfig) -> tuple[str, str, list[str]]:
    """(status, message, warnings) of a run that went through: ``diverged`` when the final model is
    worse than the initial one (`TokenWeightedTrainer.end_problem`; a warning only where the method
    does not minimise the mean token loss); a hundredfold loss rise on the way is a warning."""
    status, message, notes = "completed", "", []
    problem = trainer.end_problem()
    if problem:
        fatal, why = problem
        if fatal:
            status, message = "diverged", why
        notes.append(why)
        warnings.warn(why, stacklevel=3)
    first, top = trainer.loss_first, trainer.loss_max
    if first and top is not None and top > DIVERGENCE_RATIO * first:
        notes.append(f"training diverged: the loss rose from {first:.4g} to {top:.4g} nats/token "
                     f"(x{top / first:.3g}); lower the learning rate (lr={cfg.lr:g})")
        warnings.warn(notes[-1], stacklevel=3)
    return status, message, notes


def _save_final(trainer, run_dir: Path, rank0: bool) -> None:
    """``final/``, written under ``.partial/`` and renamed into place (atomic, like the checkpoints)."""
    try:
        trainer.save_model(str(run_dir / PARTIAL / "final"))
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        _stopped(trainer, run_dir, rank0, "disk_full", f"disk full while saving final/ ({exc})", DiskFull)
    trainer.accelerator.wait_for_everyone()
    if rank0:
        publish_dir(run_dir / PARTIAL / "final", run_dir / "final", overwrite=True)


def _close_bars(trainer) -> None:
    for cb in trainer.callback_handler.callbacks:
        bar = getattr(cb, "training_bar", None)
        if bar is not None:
            bar.close()
            cb.training_bar = None


def _stopped(trainer, run_dir: Path, rank0: bool, status: str, message: str, error: type) -> None:
    """End a run stopped by Ctrl-C or a full disk: drop the half-written ``.partial/`` checkpoint,
    record ``status`` in ``result.json`` (when the disk lets us) and raise ``error``."""
    _close_bars(trainer)
    if rank0:
        shutil.rmtree(run_dir / PARTIAL, ignore_errors=True)
    last = last_checkpoint(run_dir, warn=False)
    message += f"; last complete checkpoint: {last.name}" if last else "; no checkpoint was written"
    result = TrainResult(model=trainer.model, run_dir=run_dir, status=status, global_step=trainer.state.global_step,
                         train_loss=math.nan, last_checkpoint=last, log_history=list(trainer.state.log_history),
                         message=message)
    if rank0:
        try:
            atomic_write_json(run_dir / "result.json", {
                "status": status, "message": message, "global_step": result.global_step, "train_loss": None,
                "last_checkpoint": str(last) if last else None, "warnings": []})
        except OSError:
            pass  # the disk is still full: the message below says what happened
    if error is TrainingInterrupted:
        raise TrainingInterrupted(result)
    raise error(errno.ENOSPC, message)


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


def config_fields() -> list:
    """Fields of `TrainConfig` (for CLIs)."""
    return list(fields(TrainConfig))

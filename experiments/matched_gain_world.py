"""Matched-gain comparison in the tiny world, where every quantity is exact.

Trains each method at each learning rate on the world's D2 with `sft.trajectory.TrajectoryCallback`
(the exact `sft.trajectory.world_probe` every ``every`` steps), then compares the methods'
frontiers (`theory.frontier.matched_gain`: least Delta L(P1) reached at domain gain >= g, no
interpolation) next to the equal-step comparison, and applies the plateau criterion
(`sft.plateau.Plateau`) to CE's domain code length.

A script, not a study: nothing imports it but its test. Run it as

    PYTHONPATH=$PWD nice -n 10 python -m experiments.matched_gain_world --out runs/matched_gain_world

(``--smoke`` for a seconds-size check). It writes ``results.json`` in ``--out`` and prints the
verdicts. Units: domain gain in bits per completion; degradation ``general_delta_bits_pooled``
in bits per coded P1 token, and per response (x E_P1[coded tokens], the same ranking).
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sft.plateau import Plateau


@dataclass
class MatchedGainConfig:
    methods: tuple = ("ce", "talr")
    lrs: tuple = (1e-3, 3e-3)
    variants: tuple = ("cot", "label")
    steps: int = 300
    batch: int = 16
    every: int = 10
    seed: int = 0
    fractions: tuple = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
    tol_bits_per_token: float = 0.0  # the frontier comparison's tolerance (exact world: no noise)
    plateau: Plateau = field(default_factory=lambda: Plateau(patience=3, rel_tol=0.01, abs_tol=0.01))
    smoke: bool = False
    world_seed: int = 0
    cache_dir: str | None = None  # None: the user cache (sft.runs.user_cache_dir("worlds"))
    out: str = "runs/matched_gain_world"


def train_run(world, model0, method: str, lr: float, cfg: MatchedGainConfig, run_dir: Path, base: dict) -> list[dict]:
    """Fine-tune a copy of ``model0``; return its trajectory (read back from the run folder)."""
    from sft.data import SFTDataset
    from sft.trainer import TrainConfig, train
    from sft.trajectory import TrajectoryCallback, read_trajectory, world_probe

    cb = TrajectoryCallback(world_probe(world), cfg.every, base=base)
    tc = TrainConfig(method=method, lr=lr, max_steps=cfg.steps, batch_size=cfg.batch, seed=cfg.seed, out=str(run_dir),
                     progress=False, save_final=False, token_stats=False, warmup=0.0, overwrite=True,
                     logging_steps=max(1, cfg.steps // 5))
    res = train(tc, copy.deepcopy(model0), SFTDataset(world.d2_train), pad_token_id=world.pad_id, callbacks=[cb])
    if res.status != "completed":
        raise RuntimeError(f"{method} lr={lr:g}: {res.status} {res.message}")
    return read_trajectory(run_dir)


def compare_variant(runs: dict, cfg: MatchedGainConfig, n_coded: float) -> dict:
    """Matched-gain frontier, equal-step table and CE's plateau steps of one variant's runs
    (``runs``: (method, lr) -> trajectory)."""
    from sft.trajectory import pool_trajectories
    from theory.frontier import matched_gain

    points, labels = pool_trajectories(runs)
    mg = matched_gain(points, fractions=cfg.fractions, tol=cfg.tol_bits_per_token, labels=labels)
    mg["least_degradation_bits_per_response"] = {
        m: [None if x is None else x * n_coded for x in v] for m, v in mg["least_degradation"].items()}
    equal = [{"method": m, "lr": lr, "step": t[-1]["step"], "domain_gain_bits": t[-1]["domain_gain_bits"],
              "general_delta_bits_pooled": t[-1]["general_delta_bits_pooled"],
              "dL_P1_bits_per_response": t[-1]["general_delta_bits_pooled"] * n_coded} for (m, lr), t in runs.items()]
    plateau = {str(lr): cfg.plateau.met_at([p["step"] for p in t], [p["domain_bits"] for p in t])
               for (m, lr), t in runs.items() if m == "ce"}
    cost = [p["eval_seconds"] / p["step_seconds"] for t in runs.values() for p in t if p.get("step_seconds")]
    return {"matched_gain": mg, "equal_step": equal, "ce_plateau_step": plateau,
            "eval_cost_in_steps_median": sorted(cost)[len(cost) // 2] if cost else None,
            "trajectories": {f"{m}@{lr:g}": t for (m, lr), t in runs.items()}}


def run(cfg: MatchedGainConfig, log=print) -> dict:
    """Every variant: pretrain (cached), train the grid with trajectories, compare."""
    import torch

    from sft.trajectory import run_probe, world_probe
    from sft.worlds import WorldConfig, build_world, pretrain

    torch.set_num_threads(1)  # tiny model: per-op overhead dominates (sft.worlds.pretrain)
    out = Path(cfg.out)
    results = {"config": {**asdict(cfg), "plateau": asdict(cfg.plateau)},
               "plateau_criterion": cfg.plateau.describe("CE's domain code length"), "variants": {}}
    for v in cfg.variants:
        wc = (WorldConfig.smoke(pretrain_steps=150, variant=v, seed=cfg.world_seed) if cfg.smoke
              else WorldConfig.default(variant=v, seed=cfg.world_seed))
        world = build_world(wc)
        model0, info = pretrain(world, cfg.cache_dir)
        base = run_probe(world_probe(world), model0)
        n_coded = base["general_bits"] / base["general_bits_per_token"]  # E_P1[coded tokens] (world_probe)
        runs = {}
        for m in cfg.methods:
            for lr in cfg.lrs:
                runs[(m, lr)] = train_run(world, model0, m, lr, cfg, out / v / f"{m}_lr{lr:g}", base)
                last = runs[(m, lr)][-1]
                log(f"{v} {m} lr={lr:g}: gain {last['domain_gain_bits']:.3f} bits, "
                    f"dL(P1) {last['general_delta_bits_pooled']:+.5f} bits/token")
        results["variants"][v] = {"world_key": wc.key(), "pretrain_cached": info["cached"],
                                  "p1_coded_tokens_per_response": n_coded, "base": base,
                                  **compare_variant(runs, cfg, n_coded)}
    from sft.io import atomic_write_json

    atomic_write_json(out / "results.json", results)
    return results


def report(results: dict) -> str:
    """The verdicts in words, with the numbers."""
    lines = [f"Plateau criterion: {results['plateau_criterion']}."]
    for v, r in results["variants"].items():
        mg = r["matched_gain"]
        lines.append(f"\n[{v}] best gain {mg['best_gain']:.3f} bits/completion; "
                     f"CE plateau step per lr: {r['ce_plateau_step']}; "
                     f"evaluation cost (median) {r['eval_cost_in_steps_median']:.2f} training steps")
        per_resp = mg["least_degradation_bits_per_response"]
        for i, (g, f) in enumerate(zip(mg["levels"], mg["level_fractions"])):
            cells = ", ".join(f"{m} {'n/a' if per_resp[m][i] is None else f'{per_resp[m][i]:.3f}'}" for m in per_resp)
            claim = mg["claim"]["per_level"][i] if mg["claim"] else "-"
            lines.append(f"  gain >= {g:.3f} ({f:.0%} of best): least dL(P1) bits/response: {cells}; "
                         f"best {mg['best'][i]}; TALR better than CE: {claim}")
        if mg["claim"]:
            lines.append(f"  matched gain: '{mg['claim']['statement']}' -> {mg['claim']['verdict']}")
        for row in r["equal_step"]:
            lines.append(f"  equal steps: {row['method']} lr={row['lr']:g} step {row['step']}: gain "
                         f"{row['domain_gain_bits']:.3f}, dL(P1) {row['dL_P1_bits_per_response']:+.3f} bits/response")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="seconds-size world and runs")
    ap.add_argument("--out", default=MatchedGainConfig.out)
    ap.add_argument("--methods", default="ce,talr")
    ap.add_argument("--lrs", default="1e-3,3e-3")
    ap.add_argument("--steps", type=int, default=MatchedGainConfig.steps)
    ap.add_argument("--every", type=int, default=MatchedGainConfig.every)
    ap.add_argument("--world-seed", type=int, default=0)
    a = ap.parse_args(argv)
    cfg = MatchedGainConfig(methods=tuple(a.methods.split(",")), lrs=tuple(float(x) for x in a.lrs.split(",")),
                            steps=a.steps, every=a.every, smoke=a.smoke, out=a.out, world_seed=a.world_seed)
    res = run(cfg, log=lambda s: print(s, flush=True))
    print(report(res))
    print(json.dumps({v: r["matched_gain"]["claim"]["verdict"] if r["matched_gain"]["claim"] else None
                      for v, r in res["variants"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The measured side of the forecast study: a grid of fine-tuning runs in the tiny world.

Every run is `sft.world_runs.finetune_exact` (the demo's: CoT world, AdamW, cosine schedule, no
warm-up) with the exact end metrics: ``dL_P1_bits`` = KL(P1 || q_T) - KL(P1 || q0) and
``domain_gain_bits`` = the drop of E_P2[-log2 q(completion | prompt)], plus baseline (d),
``kl_q0_qT_domain_bits`` = sum over P2's completion prefixes u of P2(u) KL(q0(.|u) || q_T(.|u))
(the KL between the pretrained and the trained model on the domain prompts, chain rule along
P2's responses; needs the trained model).

Runs are cached one JSON per configuration under ``DIR/runs/<hash>.json`` (the hash of the
world key and the run's fields); a second call skips them, Ctrl-C loses the current run only.
``workers > 1`` runs that many processes, one torch thread each.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

LN2 = math.log(2.0)


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the grid."""

    world_key: str  # `WorldConfig.key()` of the pretrained world (plus the variant below)
    variant: str
    method: str
    lr: float
    steps: int
    batch: int
    seed: int

    def key(self) -> str:
        blob = json.dumps({"v": 1, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def kl_q0_qT_on_tree(tree, logq0: np.ndarray, logqT: np.ndarray, min_depth: int) -> float:
    """sum_{u: depth(u) >= min_depth, u not forced} P(u) KL(q0(.|u) || qT(.|u)), in bits.

    ``logq0``/``logqT``: dense natural-log conditionals ``[N, V + 1]`` (renormalised)."""
    sel = (tree.depth >= min_depth) & ~tree.forced_end() & (tree.mass > 0)
    p0 = np.exp(logq0[sel])
    kl_u = np.sum(p0 * (logq0[sel] - logqT[sel]), axis=1)
    return float(np.dot(tree.mass[sel], kl_u) / LN2)


class WorldCache:
    """Per-process cache of (world, pretrained model, base metrics, base P2 conditionals)."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self._worlds: dict = {}

    def get(self, wcfg):
        key = (wcfg.key(), wcfg.variant)
        if key not in self._worlds:
            from sft.treeprobs import exact_full_logprobs
            from sft.worlds import build_world, exact_metrics, pretrain

            world = build_world(wcfg)
            model0, _ = pretrain(world, self.cache_dir)
            logq1 = exact_full_logprobs(model0, world.p1, bos_id=world.bos_id, eos_id=world.eos_id)
            base = exact_metrics(model0, world, logq_p1_full=logq1)
            logq0 = exact_full_logprobs(model0, world.p2, bos_id=world.bos_id, eos_id=world.eos_id, renormalize=True)
            self._worlds[key] = (world, model0, base, logq0, logq1)
        return self._worlds[key]


def run_one(spec: RunSpec, wcfg, worlds: WorldCache) -> dict:
    """Fine-tune and measure one configuration (see the module docstring)."""
    from sft.treeprobs import exact_full_logprobs
    from sft.world_runs import finetune_exact

    world, model0, base, logq0, logq1 = worlds.get(wcfg)
    tmp = Path(tempfile.mkdtemp(prefix="talr-forecast-run-"))
    try:
        model, s, res, secs = finetune_exact(world, model0, spec.method, spec.lr, steps=spec.steps, batch=spec.batch,
                                             seed=spec.seed, run_dir=tmp, base=base)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logqT = exact_full_logprobs(model, world.p2, bos_id=world.bos_id, eos_id=world.eos_id, renormalize=True)
    out = {"spec": asdict(spec), "status": res.status, "seconds": secs,
           "dL_P1_bits": s["dL_P1_bits"], "domain_gain_bits": s["domain_gain_bits"],
           "domain_acc": s["domain_acc"],
           "kl_q0_qT_domain_bits": kl_q0_qT_on_tree(world.p2, logq0, logqT, world.prompt_len)}
    return out


_WORKER: dict = {}


def _init_worker(cache_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER["worlds"] = WorldCache(cache_dir)


def _work(item):
    spec, wcfg, path = item
    from experiments.outputs import write_json

    res = run_one(spec, wcfg, _WORKER["worlds"])
    write_json(path, res)
    return res


def run_grid(specs: list[RunSpec], wcfg, out: Path, *, cache_dir: str, workers: int = 1,
             progress: bool = True) -> list[dict]:
    """Run (or reload) every spec; results in the order of ``specs``."""
    from tqdm.auto import tqdm

    runs_dir = Path(out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    paths = [runs_dir / f"{s.key()}.json" for s in specs]
    todo = [(s, wcfg, p) for s, p in zip(specs, paths) if not p.exists()]
    bar = tqdm(total=len(todo), desc="forecast study runs", unit="run", disable=not progress)
    if todo:
        # pretrain once in the parent so the workers only load the cached checkpoint
        _init_worker(cache_dir)
        _WORKER["worlds"].get(wcfg)
        if workers > 1 and len(todo) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(cache_dir,)) as pool:
                for _ in pool.imap_unordered(_work, todo):
                    bar.update(1)
        else:
            for item in todo:
                _work(item)
                bar.update(1)
    bar.close()
    return [json.loads(p.read_text()) for p in paths]

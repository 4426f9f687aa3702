"""The replay's batch-gradient norm against the real runs' (a diagnostic of TALR's over-forecast on
SmolLM2): for CE, TALR and FLOW at each rate a grid study trained and forecast, the expected norm sqrt(E_b ||g_t||^2) of
the step's batch gradient that `sft.forecast.replay_adam` replays (the study's forecast unit's
moments, kappa and lam_c: the same probe batches, recomputed) next to the ``grad_norm`` the real run
logged at each step, with the clip at ``max_grad_norm``. Once a real gradient falls below the clip,
Adam's steps shrink (v remembers the larger clipped gradients, beta2 = 0.999); a replay that stays
above the clip keeps full-size steps.

    PYTHONPATH=$PWD .venv/bin/python -m experiments.bench.forecast_grad_norms \\
        --preset heldout --variant label --study docs/study-smollm2-heldout --out docs/forecast/grad_norms

Prints one line per (method, lr): the replayed and real norms at a few steps and the first step at which
each falls below the clip; writes ``grad_norms_<variant>.json`` (every step, and the real runs' TALR tau,
median p and share of tokens at the weight floor) and ``grad_norms_<variant>.png`` into ``--out``.
About 5 minutes on 2 CPU cores for SmolLM2-135M's label variant (three gradient passes).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def real_run(study: Path, variant: str, method: str, lr: float) -> dict | None:
    """The run folder's per-step ``grad_norm`` (metrics.jsonl) and token statistics, or None."""
    hits = sorted(study.glob(f"runs/{variant}-{method}-{lr:g}-*/metrics.jsonl"))
    if not hits:
        return None
    rows = [json.loads(x) for x in hits[0].read_text().splitlines() if x.strip()]
    out = {"grad_norm": [r["grad_norm"] for r in rows if "grad_norm" in r]}
    stats = hits[0].with_name("token_stats.jsonl")
    if stats.exists():
        st = [json.loads(x) for x in stats.read_text().splitlines() if x.strip()]
        for k in ("tau", "median_p", "frac_floor", "mean_nll"):
            out[k] = [s.get(k) for s in st]
    return out


def below(norms, clip: float) -> int | None:
    """The first step (1-based) whose norm is below ``clip``."""
    return next((t for t, n in enumerate(norms, start=1) if n < clip), None)


def figure(path: Path, res: dict, clip: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 3.8), squeeze=False)
    for ax, m in zip(axes[0], methods):
        for i, r in enumerate(x for x in res["rows"] if x["method"] == m):
            col = f"C{i}"
            t = range(1, len(r["replay_norm"]) + 1)
            ax.plot(t, r["replay_norm"], "--", color=col, label=f"replay, lr {r['lr']:g}")
            if r["real"] is not None:
                ax.plot(range(1, len(r["real"]["grad_norm"]) + 1), r["real"]["grad_norm"], "-o", ms=3, color=col,
                        label=f"real run, lr {r['lr']:g}")
        ax.axhline(clip, color="k", lw=0.8, ls=":", label=f"clip {clip:g}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("batch gradient norm (before the clip)")
        ax.set_title(f"{m.upper()} ({res['variant']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    import numpy as np
    import torch

    from experiments.studies.grid import (general_examples, load_base, make_config, prepare_data,
                                          variant_forecast_config)
    from sft.forecast import cosine_lrs, method_gradients, replay_adam
    from sft.forecast_run import probe_batches

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="heldout", help="the grid study's preset (its seed draws the batches)")
    ap.add_argument("--variant", default="label")
    ap.add_argument("--study", default="docs/study-smollm2-heldout", help="the study folder (runs/, study.json)")
    ap.add_argument("--out", default=None, help="folder for the JSON and the figure (default: print only)")
    a = ap.parse_args(argv)
    study = Path(a.study)
    unit = json.loads((study / "cache" / json.loads((study / "study.json").read_text())["forecast_units"][a.variant])
                      .read_text())
    cfg = make_config(a.preset)
    model, tok, _ = load_base(cfg)
    data = prepare_data(cfg, tok)
    fc = variant_forecast_config(cfg, a.variant, tok, len(general_examples(tok, data)))
    batches, _ = probe_batches(data.train[a.variant][:cfg.steps * cfg.batch_size], fc, np.random.default_rng(fc.seed))
    kw = dict(pad_token_id=fc.pad_token_id, w_min=fc.w_min, micro_batch=fc.micro_batch)
    ce = method_gradients(model, batches, "ce", **kw)
    own = {"talr": dict(batch_taus=ce.tokens.batch_taus([len(b) for b in batches])),
           "flow": dict(flow_tau=max(float(np.median(ce.tokens.sequence_means())), 1e-12))}  # as the forecast reads them
    methods = [m for m in ("ce", "talr", "flow") if any(r["method"] == m for r in unit["rows"])]
    rows = []
    for method in methods:
        gm = ce if method == "ce" else method_gradients(model, batches, method, ce_mean=ce.ce(), **kw, **own[method])
        gm.kappa = torch.tensor(unit["probe"]["kappa"], dtype=torch.float64)
        gm.lam_c = unit["probe"]["lambda_c"] or float("inf")
        gm.noise_floor, gm.keep_norm = fc.noise_floor, fc.keep_norm
        for lr in sorted({r["lr"] for r in unit["rows"] if r["method"] == method}):
            seen = []
            replay_adam(gm, method, cosine_lrs(lr, fc.steps), max_grad_norm=fc.max_grad_norm, w_min=fc.w_min,
                        track=fc.track, block=fc.replay_block, on_step=lambda t, n, c: seen.append((n, c)))
            real = real_run(study, a.variant, method, lr)
            fr = next(x for x in unit["rows"] if x["method"] == method and x["lr"] == lr)
            r = {"method": method, "lr": lr, "forecast_bits_per_token": fr.get("dL_general_bits_per_token"),
                 "tracked_loss_nats": fr.get("tracked_loss_nats"),
                 "replay_norm": [n for n, _ in seen], "replay_clip": [c for _, c in seen],
                 "replay_below_clip_at": below([n for n, _ in seen], fc.max_grad_norm), "real": real,
                 "real_below_clip_at": None if real is None else below(real["grad_norm"], fc.max_grad_norm)}
            rows.append(r)
            pick = [1, 3, 5, 10, fc.steps]
            fmt = lambda xs: " ".join(f"{xs[t - 1]:.2f}" for t in pick if t <= len(xs))  # noqa: E731
            print(f"{a.variant} {method} lr {lr:g}: steps {pick}: replay {fmt(r['replay_norm'])}"
                  + ("" if real is None else f" | real {fmt(real['grad_norm'])}")
                  + f" | below the clip from step {r['replay_below_clip_at']} (replay), {r['real_below_clip_at']} (real)",
                  flush=True)
    res = {"variant": a.variant, "preset": a.preset, "study": str(study), "max_grad_norm": fc.max_grad_norm,
           "ell0": ce.ell0.tolist(), "kappa": unit["probe"]["kappa"],
           "lambda_c": unit["probe"]["lambda_c"], "rows": rows}
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"grad_norms_{a.variant}.json").write_text(json.dumps(res, indent=1))
        figure(out / f"grad_norms_{a.variant}.png", res, fc.max_grad_norm)


if __name__ == "__main__":
    main()

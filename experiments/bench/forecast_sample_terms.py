"""The D1 sample's two terms of dL(P1) against the exact decomposition over P1's whole tree (why
version 4 of `sft.forecast` reads the KL term alone): real CE runs of T = 150 steps at B = 16 at
every rate of the default grid (the forecast probe's own AdamW loop on the whole D2), then per
run the exact dL(P1) with its first-order and KL terms, and the same on the study's D1 sample
(128 sequences) and on a sample of 1024.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python -m experiments.bench.forecast_sample_terms --world-seed 2

Prints one line per rate (bits per sequence). Nothing is written.
"""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    import torch

    from experiments.studies import forecast as S
    from sft.forecast import ComputeMeter, cosine_lrs
    from sft.forecast_run import HARD_GROUP_P, probe_losses, token_groups
    from sft.treeprobs import exact_full_logprobs
    from sft.worlds import build_world, pretrain
    from theory.prefix import prefix_decomposition, with_other

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = S.make_config("default", world_seed=a.world_seed, progress=False)
    world = build_world(S.world_config(cfg))
    model0, _ = pretrain(world, cfg.cache_dir)
    fcfg = S.forecast_config(cfg, world)
    trees = {n: S.general_tree(world, n) for n in (128, 1024)}
    meter = ComputeMeter()
    lq0 = {n: t.logq(model0, meter) for n, t in trees.items()}

    def exact(m):
        return with_other(exact_full_logprobs(m, world.p1, bos_id=world.bos_id, eos_id=world.eos_id))

    ex0 = exact(model0)
    groups = token_groups(model0, world.d2_train, fcfg.pad_token_id, HARD_GROUP_P, meter)
    for lr in fcfg.lrs:
        m = probe_losses(model0, world.d2_train, groups, fcfg, cosine_lrs(lr, fcfg.steps), meter, return_model=True)[1]
        e = prefix_decomposition(world.p1, ex0, exact(m), unit="bits")
        line = f"world {a.world_seed} lr {lr:.3g}: exact {e.delta:.3f} (first-order {e.first_order:.3f}, KL {e.kl_term:.3f})"
        for n, t in trees.items():
            d = prefix_decomposition(t.tree, lq0[n], t.logq(m, meter), unit="bits")
            line += f" | sample {n}: {d.delta:.3f} (first-order {d.first_order:.3f}, KL {d.kl_term:.3f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()

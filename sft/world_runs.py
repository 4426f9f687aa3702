"""One fine-tuning run in the tiny world measured exactly at its end, and the constants of
Appendix E at q0: what a grid of tiny-world runs (`talr study forecast`) and the demo share."""
from __future__ import annotations

import copy
import time
from pathlib import Path

__all__ = ["finetune_exact", "appendix_e_constants", "general_sample", "general_tree"]


def finetune_exact(world, model0, method: str, lr: float, *, steps: int, batch: int, seed: int, run_dir: Path,
                   base: dict) -> tuple:
    """Fine-tune a copy of ``model0`` with ``method`` at peak rate ``lr`` (AdamW, the trainer's
    cosine schedule, no warm-up) for ``steps`` steps of ``batch`` sequences of the world's D2;
    LoRA comes back merged. Returns ``(model, end, TrainResult, seconds)`` with ``end`` the exact
    metrics of `sft.worlds.exact_metrics` and, against ``base`` (q0's), ``dL_P1_bits`` =
    KL(P1 || q_T) - KL(P1 || q0) and ``domain_gain_bits`` = the drop of E_P2[-log2 q(completion | prompt)]."""
    from .data import SFTDataset
    from .trainer import TrainConfig, train
    from .worlds import exact_metrics

    model = copy.deepcopy(model0)
    tc = TrainConfig(method=method, lr=lr, max_steps=steps, batch_size=batch, seed=seed, out=str(run_dir),
                     progress=False, save_final=False, token_stats=True, logging_steps=max(1, steps // 5), warmup=0.0)
    t0 = time.perf_counter()
    res = train(tc, model, SFTDataset(world.d2_train), pad_token_id=world.pad_id)
    secs = time.perf_counter() - t0
    model = res.model
    if hasattr(model, "merge_and_unload"):  # LoRA: evaluate the merged model
        model = model.merge_and_unload()
    end = exact_metrics(model, world)
    end["dL_P1_bits"] = end["kl_p1_bits"] - base["kl_p1_bits"]
    end["domain_gain_bits"] = base["cond_code_len_p2_bits"] - end["cond_code_len_p2_bits"]
    return model, end, res, secs


def appendix_e_constants(world, model0):
    """Constants of Appendix E at q0 on the union of the P1 and P2 trees (`theory.estimate.estimate_constants`)."""
    from theory.estimate import estimate_constants

    from .treeprobs import exact_full_logprobs

    u, p1u, p2u = world.p1.union_aligned(world.p2)
    logq = exact_full_logprobs(model0, u, bos_id=world.bos_id, eos_id=world.eos_id, renormalize=True)
    return estimate_constants(p1u, p2u, logq, alpha=0.1, threshold=0.1)


def general_sample(world, n: int, seed: int = 123) -> list[dict]:
    """``n`` D1 examples sampled from P1 (labels on every response token and the EOS)."""
    from .data import IGNORE_INDEX

    out = []
    for z in world.d1_samples(n, seed=seed):
        ids = world.model_ids(z)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return out


def general_tree(world, n: int, seed: int = 123):
    """The same ``n`` P1 samples as `general_sample`, as an empirical token tree (`SampleTree`)."""
    from .forecast_run import SampleTree
    from theory.tree import TokenTree

    zs = world.d1_samples(n, seed=seed)
    tree = TokenTree.from_sequences([list(map(int, z)) for z in zs], max_depth=world.cfg.max_depth,
                                    vocab_size=world.tree_vocab)
    return SampleTree(tree, world.bos_id, world.eos_id)

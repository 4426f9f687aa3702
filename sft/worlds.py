"""The tiny-transformer world: a small Llama on synthetic languages known exactly as token trees.

Two distributions over responses, both exact :class:`theory.tree.TokenTree` objects that share
one token space (so ``p1.union(p2)`` gives one topology for `theory.estimate`):

* ``P1`` (general): the D1 marker ``M1`` followed by an order-2 Markov chain over ``n_content``
  content tokens. Every state ``(a, b)`` has ``branching`` successors with Dirichlet
  probabilities; the chain stops with a hazard ``eos_hazard`` per token (never before
  ``min_len`` content tokens) and is cut at ``max_depth`` tokens (Definition 3.2: the end is
  certain there). The support is small enough (<~20k responses) to enumerate.
* ``P2`` (domain): the D2 marker ``M2``, a prompt ``(x, y)`` of two content tokens (uniform
  over the first ``n_prompt`` of them), and a completion ending in one *hard* answer token
  ``h = hard[(x + 2 y) mod n_hard]``. Hard tokens are vocabulary ids that P1 never emits, so
  the pretrained model gives them probability ~0 (knowledge absent from P1, like the clinical
  conversion factors of Section 4.3). Variant ``"cot"``: ``cot_len`` easy tokens first, the
  most probable P1 continuation of the state ``(x, y)`` (predictable from P1's structure),
  then ``h`` (``answer_first=True``: ``h`` first, then the easy tokens); variant ``"label"``:
  ``h`` alone.

Design (issue 5's prototype notes): D2 has its own marker, so P2's nodes are disjoint from
P1's and fine-tuning reaches P1 only through shared parameters (Assumption B.5). The marker
also appears in pretraining (a fraction ``marker_rate`` of pretraining sequences is ``M2``
followed by a generic P1 continuation), so fine-tuning does not start from a random embedding.

Token layout (tree ids equal model ids): content ``0..n_content-1``, hard tokens next, then
``M1``, ``M2``; that is the tree vocabulary ``V``. The model adds ``EOS = V`` (the tree's EOS
index), ``PAD = V + 1`` and ``BOS = V + 2``. A model reads ``[BOS] + response (+ [EOS])``;
the tree root's conditional is the model's prediction at ``BOS``.

Exactness: `sft.treeprobs.exact_tree_logprobs(model, p1, bos_id=..., eos_id=...)` gives the model's
natural-log conditionals on every node, so ``theory.divergence.kl(p1, ...)`` of it is KL(P1 || q_model)
in bits per response with no sampling. The model may put a little mass on PAD / BOS; that mass is simply
outside P's support (the KL is still the exact KL to the model's sequence distribution).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from theory.divergence import TreeLogProbs, kl
from theory.tree import TokenTree

from .data import IGNORE_INDEX
from .io import atomic_write_json, publish_dir
from .treeprobs import exact_full_logprobs, exact_tree_logprobs

__all__ = ["WorldConfig", "World", "build_world", "pretrain", "new_model", "exact_metrics", "p1_mode_and_entropy",
           "conditional_code_length_bits", "greedy_complete", "pretrain_dataset", "entropy_bits"]

_CACHE_VERSION = 1  # bump when the world's construction or the pretraining recipe changes
_NOT_PRETRAINING = ("variant", "cot_len", "n_prompt", "n_train", "answer_first")  # P2-only fields


@dataclass
class WorldConfig:
    """Configuration of a tiny-transformer world (every field documented where declared)."""

    n_content: int = field(default=24, metadata={"help": "content tokens of the synthetic language"})
    n_hard: int = field(default=4, metadata={"help": "hard answer tokens (ids P1 never emits)"})
    max_depth: int = field(default=10, metadata={"help": "response length cut d, marker included"})
    branching: int = field(default=3, metadata={"help": "most successors of an order-2 state of P1"})
    min_branching: int = field(default=2, metadata={"help": "fewest successors (uniform in between)"})
    n_start: int = field(default=6, metadata={"help": "possible first content tokens of P1"})
    min_len: int = field(default=3, metadata={"help": "P1 never ends before this many content tokens"})
    eos_hazard: float = field(default=0.15, metadata={"help": "P1's per-token stop probability after min_len"})
    concentration: float = field(default=1.0, metadata={"help": "Dirichlet concentration of P1's transitions"})
    variant: str = field(default="cot", metadata={"help": "P2 completion: cot (easy tokens + answer) | label"})
    cot_len: int = field(default=6, metadata={"help": "easy tokens before the answer (variant cot)"})
    answer_first: bool = field(default=False, metadata={"help": "variant cot: the hard answer token right after "
                                                                 "the prompt, the easy tokens after it"})
    n_prompt: int = field(default=6, metadata={"help": "prompt tokens x, y range over the first n_prompt"})
    marker_rate: float = field(default=0.1, metadata={"help": "pretraining fraction starting with the D2 marker"})
    n_train: int = field(default=256, metadata={"help": "SFT examples sampled from P2 (d2_train)"})
    # model
    hidden: int = field(default=64, metadata={"help": "Llama hidden size"})
    layers: int = field(default=2, metadata={"help": "Llama layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate: int = field(default=128, metadata={"help": "MLP width"})
    # pretraining (sft.trainer, method ce)
    pretrain_steps: int = field(default=1500, metadata={"help": "pretraining optimizer steps"})
    pretrain_batch: int = field(default=64, metadata={"help": "pretraining sequences per step"})
    pretrain_lr: float = field(default=3e-3, metadata={"help": "pretraining peak learning rate (cosine)"})
    seed: int = field(default=0, metadata={"help": "seed of the world, the sampling and the model init"})

    def __post_init__(self):
        if self.variant not in ("cot", "label"):
            raise ValueError(f"variant {self.variant!r}: expected 'cot' or 'label'")
        need = 1 + 2 + (self.cot_len if self.variant == "cot" else 0) + 1
        if need > self.max_depth:
            raise ValueError(f"P2 responses have {need} tokens > max_depth={self.max_depth}; "
                             "lower cot_len or raise max_depth")
        if not (self.n_prompt <= self.n_content and self.n_start <= self.n_content
                and self.branching <= self.n_content):
            raise ValueError("n_prompt, n_start and branching must be <= n_content")

    @classmethod
    def smoke(cls, **kw) -> "WorldConfig":
        """A test-size world: small vocabulary and trees, a few dozen pretraining steps."""
        base = dict(n_content=12, n_hard=3, max_depth=7, branching=2, min_branching=2, n_start=4, min_len=2, cot_len=3,
                    n_prompt=4, n_train=64, hidden=32, intermediate=64, pretrain_steps=60,
                    pretrain_batch=32, pretrain_lr=1e-2)
        return cls(**{**base, **kw})

    @classmethod
    def default(cls, **kw) -> "WorldConfig":
        """The demo's world (pretraining takes a few minutes on two CPU cores)."""
        return cls(**kw)

    def key(self) -> str:
        """Hash of the fields that pretraining depends on (the cache key): the CoT and the
        label-only variants of one world share their pretrained checkpoint."""
        d = {k: v for k, v in asdict(self).items() if k not in _NOT_PRETRAINING}
        blob = json.dumps({"v": _CACHE_VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(eq=False)
class World:
    """A built world: exact trees, token ids, SFT data (see the module docstring)."""

    cfg: WorldConfig
    p1: TokenTree
    p2: TokenTree
    vocab_size: int  # model vocabulary (tree vocabulary + EOS, PAD, BOS)
    eos_id: int
    pad_id: int
    bos_id: int
    m1_id: int
    m2_id: int
    hard_token_ids: np.ndarray
    prompt_len: int  # tree tokens of a P2 prompt (marker + x + y); the rest is the completion
    trans: np.ndarray  # P1's order-2 transitions [S, n_content] (state index a * (n_content + 1) + b)
    d2_train: list[dict]

    @property
    def tree_vocab(self) -> int:
        return self.p1.vocab_size

    def model_ids(self, response: Sequence[int], eos: bool = True) -> list[int]:
        """``[BOS] + response (+ [EOS])``: a response as model input ids."""
        return [self.bos_id, *map(int, response)] + ([self.eos_id] if eos else [])

    def sft_example(self, response: Sequence[int]) -> dict:
        """Completion-only SFT example (HF labels: -100 on BOS and the prompt)."""
        ids = self.model_ids(response)
        k = 1 + self.prompt_len
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * k + ids[k:]}

    def answer_of(self, prompt: Sequence[int]) -> int:
        """The hard answer token of a P2 prompt ``(M2, x, y)``."""
        x, y = int(prompt[1]), int(prompt[2])
        return int(self.hard_token_ids[(x + 2 * y) % self.cfg.n_hard])

    def p2_prompts(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompts [n, prompt_len], P2 probability of each)."""
        ids = np.flatnonzero(self.p2.depth == self.prompt_len)
        return np.array([self.p2.prefix(int(u)) for u in ids]), self.p2.mass[ids]

    def d1_samples(self, n: int, seed: int | None = None) -> list[np.ndarray]:
        """``n`` responses from P1 (marker included)."""
        return self.p1.sample(n, rng=np.random.default_rng(seed))


# ----------------------------------------------------------------------------------------------
# building the world
# ----------------------------------------------------------------------------------------------
def _p1_transitions(cfg: WorldConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Start distribution [n_content] and order-2 transitions [(n_content + 1) ** 2, n_content]
    (state ``a * (C + 1) + b``; ``a = C`` means "no token yet")."""
    C = cfg.n_content
    start = np.zeros(C)
    start[rng.choice(C, cfg.n_start, replace=False)] = rng.dirichlet(np.full(cfg.n_start, 2.0))
    trans = np.zeros(((C + 1) ** 2, C))
    for s in range(trans.shape[0]):
        k = int(rng.integers(min(cfg.min_branching, cfg.branching), cfg.branching + 1))
        succ = rng.choice(C, k, replace=False)
        trans[s, succ] = rng.dirichlet(np.full(k, cfg.concentration))
    return start, trans


def _state(C: int, a: int, b: int) -> int:
    return a * (C + 1) + b


def build_world(cfg: WorldConfig) -> World:
    """Build P1 and P2 exactly, and sample ``d2_train`` from P2 (deterministic in ``cfg.seed``)."""
    rng = np.random.default_rng(cfg.seed)
    C, H = cfg.n_content, cfg.n_hard
    V = C + H + 2
    m1, m2 = C + H, C + H + 1
    eos, pad, bos = V, V + 1, V + 2
    hard = np.arange(C, C + H)
    start, trans = _p1_transitions(cfg, rng)

    def p1_next(prefixes):  # prefixes include the marker: (M1, t1, t2, ...)
        out = np.zeros((len(prefixes), V + 1))
        for i, pre in enumerate(prefixes):
            if len(pre) == 0:
                out[i, m1] = 1.0
                continue
            n = len(pre) - 1  # content tokens so far
            if n == 0:
                out[i, :C] = start
                continue
            a = pre[-2] if n >= 2 else C
            stop = cfg.eos_hazard if n >= cfg.min_len else 0.0
            out[i, :C] = (1.0 - stop) * trans[_state(C, a, pre[-1])]
            out[i, V] = stop
        return out

    p1 = TokenTree.from_distribution(p1_next, V, cfg.max_depth, batched=True)

    # P2: uniform prompts (M2, x, y); completion = easy CoT (P1's most probable continuation) + answer
    seqs, weights = [], []
    n_prompts = cfg.n_prompt ** 2
    for x in range(cfg.n_prompt):
        for y in range(cfg.n_prompt):
            comp, a, b = [], x, y
            for _ in range(cfg.cot_len if cfg.variant == "cot" else 0):
                c = int(np.argmax(trans[_state(C, a, b)]))
                comp.append(c)
                a, b = b, c
            h = int(hard[(x + 2 * y) % H])
            comp = [h, *comp] if cfg.answer_first else [*comp, h]
            seqs.append([m2, x, y, *comp])
            weights.append(1.0 / n_prompts)
    p2 = TokenTree.from_sequences(seqs, weights=weights, max_depth=cfg.max_depth, vocab_size=V)

    world = World(cfg=cfg, p1=p1, p2=p2, vocab_size=V + 3, eos_id=eos, pad_id=pad, bos_id=bos, m1_id=m1,
                  m2_id=m2, hard_token_ids=hard, prompt_len=3, trans=trans, d2_train=[])
    train_rng = np.random.default_rng([cfg.seed, 2])
    world.d2_train = [world.sft_example(z) for z in p2.sample(cfg.n_train, rng=train_rng)]
    return world


def pretrain_dataset(world: World, n: int, seed: int = 1) -> list[dict]:
    """``n`` pretraining sequences: P1 samples, a fraction ``marker_rate`` with the D2 marker
    in place of ``M1`` (generic continuations after M2). Labels on every token but BOS."""
    rng = np.random.default_rng([world.cfg.seed, seed])
    zs = world.p1.sample(n, rng=rng)
    swap = rng.random(n) < world.cfg.marker_rate
    out = []
    for z, s in zip(zs, swap):
        z = z.copy()
        if s:
            z[0] = world.m2_id
        ids = world.model_ids(z)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return out


# ----------------------------------------------------------------------------------------------
# exact metrics (model conditionals from sft.treeprobs)
# ----------------------------------------------------------------------------------------------
def conditional_code_length_bits(tree: TokenTree, lp: TreeLogProbs, prompt_len: int) -> float:
    """``E_P[-log2 q(completion | prompt)]``: the code length of the tokens after the first
    ``prompt_len`` (and of the EOS), what completion-only SFT trains."""
    e = tree.depth > prompt_len
    eos = np.where(tree.forced_end(), 0.0, lp.eos)
    f = tree.depth >= prompt_len
    nats = -(np.dot(tree.mass[e], lp.edge[e]) + np.dot(tree.eos_mass[f], eos[f]))
    return float(nats / math.log(2.0))


@torch.no_grad()
def greedy_complete(model: nn.Module, world: World, prompts: np.ndarray, max_new: int | None = None) -> np.ndarray:
    """Greedy completions ``[n, max_new]`` of P2 prompts (batched; EOS then anything)."""
    max_new = max_new or world.cfg.max_depth - world.prompt_len + 1
    dev = next(model.parameters()).device
    ids = torch.as_tensor(np.c_[np.full(len(prompts), world.bos_id), prompts], device=dev)
    was = model.training
    model.eval()
    try:
        gen = []
        for _ in range(max_new):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            gen.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    finally:
        model.train(was)
    return torch.stack(gen, 1).cpu().numpy()


def p1_mode_and_entropy(p1: TokenTree, logq_full: np.ndarray) -> dict:
    """General measures beside KL on P1's coded prefixes (weights P1(u)):

    ``mode_acc_p1``: the P1-mass-weighted fraction of prefixes where q's argmax over the tree's
    alphabet is P1's argmax (benchmark-accuracy analogue: forgetting lowers it, sharpening does
    not); ``q_entropy_p1_bits``: ``sum_u P1(u) H(q_u)`` in bits per response (equal to H(P1) at
    q = P1; a fall at unchanged mode accuracy is sharpening, not forgetting)."""
    act = (~p1.forced_end()) & (p1.mass > 0)
    w = p1.mass[act]
    lq = np.asarray(logq_full, dtype=np.float64)[act, : p1.vocab_size + 1]
    same = np.argmax(lq, axis=1) == np.argmax(p1.cond_full()[act], axis=1)
    q = np.exp(lq)
    with np.errstate(invalid="ignore"):
        h = -np.where(q > 0, q * lq, 0.0).sum(1) / math.log(2.0)
    return {"mode_acc_p1": float(np.dot(w, same) / w.sum()), "q_entropy_p1_bits": float(np.dot(w, h))}


def exact_metrics(model: nn.Module, world: World, batch_size: int = 512,
                  logq_p1_full: np.ndarray | None = None) -> dict:
    """Exact scores of ``model`` on the world (bits per response unless said otherwise).

    ``logq_p1_full``: the model's raw conditionals on P1 (`sft.treeprobs.exact_full_logprobs`,
    ``renormalize=False``) when the caller already has them (one forward pass saved).
    ``kl_p1_bits`` KL(P1 || q); ``mode_acc_p1`` and ``q_entropy_p1_bits``
    (:func:`p1_mode_and_entropy`); ``kl_p2_bits`` KL(P2 || q) over whole P2 responses;
    ``cond_code_len_p2_bits`` E_P2[-log2 q(completion | prompt)]; ``cond_kl_p2_bits`` that
    minus P2's conditional entropy; ``answer_code_len_bits`` the answer token's share;
    ``answer_prob`` E_P2[q(answer | prompt, gold CoT)]; ``domain_acc`` P2-weighted fraction of
    prompts whose greedy completion's first hard token is the right answer (exact expectation
    over P2's prompts).
    """
    if logq_p1_full is None:
        logq_p1_full = exact_full_logprobs(model, world.p1, batch_size=batch_size, bos_id=world.bos_id,
                                           eos_id=world.eos_id)
    lp1 = TreeLogProbs.from_full(world.p1, logq_p1_full)
    lp2 = exact_tree_logprobs(model, world.p2, batch_size=batch_size, bos_id=world.bos_id, eos_id=world.eos_id)
    p2 = world.p2
    cond = conditional_code_length_bits(p2, lp2, world.prompt_len)
    own = TreeLogProbs.from_tree(p2)
    with np.errstate(invalid="ignore"):
        h_cond = conditional_code_length_bits(p2, TreeLogProbs(np.nan_to_num(own.edge, neginf=0.0),
                                                               np.nan_to_num(own.eos, neginf=0.0)), world.prompt_len)
    ans = np.isin(p2.token, world.hard_token_ids)
    ans_bits = float(-np.dot(p2.mass[ans], lp2.edge[ans]) / math.log(2.0))
    ans_prob = float(np.dot(p2.mass[ans], np.exp(lp2.edge[ans])))
    prompts, w = world.p2_prompts()
    gen = greedy_complete(model, world, prompts)
    is_hard = np.isin(gen, world.hard_token_ids)
    first = np.where(is_hard.any(1), gen[np.arange(len(gen)), is_hard.argmax(1)], -1)
    gold = np.array([world.answer_of(p) for p in prompts])
    acc = float(np.dot(w, first == gold) / w.sum())
    return {"kl_p1_bits": kl(world.p1, lp1), **p1_mode_and_entropy(world.p1, logq_p1_full),
            "kl_p2_bits": kl(p2, lp2), "cond_code_len_p2_bits": cond,
            "cond_kl_p2_bits": cond - h_cond, "answer_code_len_bits": ans_bits, "answer_prob": ans_prob,
            "domain_acc": acc}


def entropy_bits(tree: TokenTree) -> float:
    """Entropy of the tree's distribution over responses, in bits."""
    ids, p = tree.leaves()
    return float(-np.dot(p, np.log2(p)))


# ----------------------------------------------------------------------------------------------
# pretraining (cached by config hash)
# ----------------------------------------------------------------------------------------------
def new_model(world: World) -> nn.Module:
    from .models import load_model

    cfg = world.cfg
    spec = dict(vocab_size=world.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                max_position_embeddings=max(32, cfg.max_depth + 2), bos_token_id=world.bos_id,
                eos_token_id=world.eos_id, pad_token_id=world.pad_id)
    return load_model(spec, dtype=torch.float32, seed=cfg.seed)


def pretrain(world: World, cache_dir: str | Path | None = None, *, progress: bool = False,
             force: bool = False, threads: int | None = 1) -> tuple[nn.Module, dict]:
    """Pretrain a small Llama on P1 (with the D2 marker's generic continuations) using
    `sft.trainer.train` (method ``ce``), or reload it from ``cache_dir/<config hash>/``
    (``None``: the user's cache, `sft.runs.user_cache_dir` ``("worlds")``, never the working folder).

    Returns ``(model, info)``; ``info`` holds ``kl_p1_bits`` (exact KL(P1 || q0), bits per
    response), ``H_p1_bits`` (entropy of P1), ``pretrain_seconds`` (of the run that made the
    checkpoint), ``cached`` and the cache ``path``.

    ``threads``: torch CPU threads during pretraining (restored after). One thread is the
    default: a 64-wide model is all per-op overhead, and on a shared 2-core machine two
    threads measured 10x slower (0.33 s vs 0.04 s per step); ``None`` leaves the setting.
    """
    from transformers import LlamaForCausalLM

    from .trainer import TrainConfig, train

    from .runs import user_cache_dir

    cfg = world.cfg
    folder = Path(cache_dir if cache_dir is not None else user_cache_dir("worlds")) / cfg.key()
    info_path = folder / "info.json"
    if info_path.exists() and not force:
        model = LlamaForCausalLM.from_pretrained(str(folder / "model"), local_files_only=True)
        info = json.loads(info_path.read_text())
        return model, {**info, "cached": True, "path": str(folder)}
    model = new_model(world)
    data = pretrain_dataset(world, cfg.pretrain_steps * cfg.pretrain_batch)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tc = TrainConfig(method="ce", lr=cfg.pretrain_lr, max_steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch,
                     warmup=0.05, seed=cfg.seed, out=str(folder / "run"), progress=progress, save_final=False,
                     token_stats=False, logging_steps=max(1, cfg.pretrain_steps // 10),
                     overwrite=True)  # a killed earlier pretraining left its (marked) run folder
    try:
        res = train(tc, model, data, pad_token_id=world.pad_id, extra_config={"world": asdict(cfg)})
    finally:
        torch.set_num_threads(old_threads)
    secs = time.perf_counter() - t0
    if res.status != "completed":
        raise RuntimeError(f"pretraining of world {cfg.key()} stopped: {res.status} {res.message}")
    model = res.model
    model.config.use_cache = True
    lp = exact_tree_logprobs(model, world.p1, bos_id=world.bos_id, eos_id=world.eos_id)
    info = {"kl_p1_bits": kl(world.p1, lp), "H_p1_bits": entropy_bits(world.p1), "pretrain_seconds": secs,
            "train_loss": res.train_loss, "p1_nodes": world.p1.n_nodes,
            "p1_responses": int(world.p1.leaves()[0].size), "config": asdict(cfg)}
    tmp = folder / "model.tmp"
    if tmp.exists():  # left by an interrupted earlier save
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    publish_dir(tmp, folder / "model", overwrite=True)
    atomic_write_json(info_path, info)  # written last: its presence marks a complete cache
    return model, {**info, "cached": False, "path": str(folder)}

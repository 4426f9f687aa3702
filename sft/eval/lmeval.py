"""Generation tasks from local JSONL files on an in-memory model, scored under lm-eval's names.

Two back ends share one task description (:class:`GenerationTask`):

* ``backend="lm_eval"`` runs the real harness: ``lm_eval.simple_evaluate`` with
  ``HFLM(pretrained=model, tokenizer=tokenizer)`` and a task dict whose ``dataset_path`` is ``json``
  and ``dataset_kwargs.data_files`` point at the local files (needs ``pip install lm-eval==0.4.13``).
* ``backend="builtin"`` needs no lm-eval: it rebuilds lm-eval's plain-text prompt
  (few-shot examples ``doc_to_text + target_delimiter + target + fewshot_delimiter``, drawn by
  ``random.Random(fewshot_seed).sample(train, k)`` once per test document in order, as lm-eval's
  default sampler does), greedy-decodes, cuts the output at the first stop string, applies the
  same regex filters (``findall``, ``group_select``, first non-empty group, ``strip``, fallback
  ``[invalid]``) and lm-eval's ``exact_match`` (``regexes_to_ignore`` removed from prediction and
  reference, then ``ignore_case``).

GSM8K (:data:`GSM8K`) mirrors lm-eval 0.4.13's ``gsm8k.yaml``: 5-shot from the train file, prompt
``Question: {question}\\nAnswer:``, strict filter ``#### (\\-?[0-9\\.\\,]+)``, flexible filter
``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (last match), metrics ``exact_match,strict-match`` and
``exact_match,flexible-extract`` (stderr: sample standard deviation / sqrt(n), as lm-eval).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import string
from dataclasses import dataclass, field
from typing import Callable, Sequence

LM_EVAL_PIN = "lm-eval==0.4.13"
_FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class GenerationTask:
    """A generate-until task in lm-eval's terms; templates use ``{{field}}`` placeholders only."""

    name: str
    doc_to_text: str
    doc_to_target: str
    until: tuple = ()
    filters: tuple = ()  # (filter name, regex, group_select)
    regexes_to_ignore: tuple = ()
    ignore_case: bool = False
    ignore_punctuation: bool = False
    num_fewshot: int = 0
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    metric: str = "exact_match"
    fallback: str = "[invalid]"
    max_gen_toks: int = 256


GSM8K = GenerationTask(
    name="gsm8k_local",
    doc_to_text="Question: {{question}}\nAnswer:",
    doc_to_target="{{answer}}",
    until=("Question:", "</s>", "<|im_end|>"),
    filters=(("strict-match", r"#### (\-?[0-9\.\,]+)", 0),
             ("flexible-extract", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)),
    regexes_to_ignore=(",", r"\$", "(?s).*#### ", r"\.$"),
    ignore_case=True,
    num_fewshot=5,
)


def render(template: str, doc: dict, where: str = "") -> str:
    """Fill ``{{field}}`` placeholders from `doc`."""
    rest = _FIELD.sub("", template)
    if "{{" in rest or "{%" in rest:
        raise ValueError(f"template {template!r}: only plain {{{{field}}}} placeholders are supported")

    def sub(m):
        if m.group(1) not in doc:
            raise KeyError(f"{where}field '{m.group(1)}' missing (needed by {template!r})")
        return str(doc[m.group(1)])

    return _FIELD.sub(sub, template)


def read_docs(path: str | os.PathLike) -> list[dict]:
    """Records of a local JSONL task file (errors name the file and line)."""
    from .codelength import read_jsonl

    return read_jsonl(path)


# --------------------------------------------------------------------------- scoring (lm-eval semantics)


def apply_filter(response: str, regex: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's ``regex`` filter followed by ``take_first``."""
    match = re.findall(regex, response if isinstance(response, str) else "")
    if not match:
        return fallback
    m = match[group_select]
    if isinstance(m, tuple):
        m = [x for x in m if x]
        m = m[0] if m else fallback
    return m.strip()


def exact_match(prediction: str, reference: str, regexes_to_ignore: Sequence[str] = (),
                ignore_case: bool = False, ignore_punctuation: bool = False) -> float:
    """lm-eval's ``exact_match`` (HF evaluate semantics) for one pair."""
    for s in regexes_to_ignore:
        prediction, reference = re.sub(s, "", prediction), re.sub(s, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def score_responses(task: GenerationTask, responses: Sequence[str], docs: Sequence[dict]) -> dict:
    """Metrics ``{metric},{filter}`` and ``{metric}_stderr,{filter}`` of raw responses."""
    out = {}
    refs = [render(task.doc_to_target, d, f"doc {i}: ") for i, d in enumerate(docs)]
    for fname, regex, group in task.filters:
        scores = [exact_match(apply_filter(r, regex, group, task.fallback), ref, task.regexes_to_ignore,
                              task.ignore_case, task.ignore_punctuation) for r, ref in zip(responses, refs)]
        n = len(scores)
        mean = sum(scores) / n
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else float("nan")
        out[f"{task.metric},{fname}"] = mean
        out[f"{task.metric}_stderr,{fname}"] = sd / math.sqrt(n) if n > 1 else float("nan")
    return out


# --------------------------------------------------------------------------- prompts and generation


def build_prompts(task: GenerationTask, docs: Sequence[dict], train_docs: Sequence[dict] | None,
                  num_fewshot: int, fewshot_seed: int = 1234) -> list[str]:
    """lm-eval's plain-text contexts (no chat template) for `docs`, in order."""
    if num_fewshot > 0 and not train_docs:
        raise ValueError(f"{num_fewshot}-shot prompts need a train file with examples")
    if num_fewshot > 0 and num_fewshot > len(train_docs):
        raise ValueError(f"{num_fewshot}-shot prompts but the train file has {len(train_docs)} examples")
    rnd = random.Random(fewshot_seed)
    prompts = []
    for i, doc in enumerate(docs):
        ctx = ""
        if num_fewshot > 0:
            for shot in rnd.sample(list(train_docs), num_fewshot):
                ctx += (render(task.doc_to_text, shot) + task.target_delimiter
                        + render(task.doc_to_target, shot) + task.fewshot_delimiter)
        prompts.append(ctx + render(task.doc_to_text, doc, f"doc {i}: "))
    return prompts


# --------------------------------------------------------------------------- entry points


def lm_eval_task_config(task: GenerationTask, test_file: str, train_file: str | None = None,
                        num_fewshot: int | None = None) -> dict:
    """The task as an lm-eval task dict reading local JSONL files."""
    k = task.num_fewshot if num_fewshot is None else num_fewshot
    data_files = {"test": os.path.abspath(test_file)}
    cfg = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": task.doc_to_text,
        "doc_to_target": task.doc_to_target,
        "target_delimiter": task.target_delimiter,
        "fewshot_delimiter": task.fewshot_delimiter,
        "num_fewshot": k,
        "metric_list": [{"metric": task.metric, "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": task.ignore_case, "ignore_punctuation": task.ignore_punctuation,
                         "regexes_to_ignore": list(task.regexes_to_ignore)}],
        "generation_kwargs": {"until": list(task.until), "do_sample": False, "temperature": 0.0,
                              "max_gen_toks": task.max_gen_toks},
        "repeats": 1,
        "filter_list": [{"name": n, "filter": [{"function": "regex", "regex_pattern": rx, "group_select": g},
                                               {"function": "take_first"}]} for n, rx, g in task.filters],
        "metadata": {"version": 3.0},
    }
    if train_file is not None:
        data_files["train"] = os.path.abspath(train_file)
        cfg.update({"training_split": "train", "fewshot_split": "train"})
    return cfg


def run_task(task: GenerationTask, model, tokenizer, test_file: str | os.PathLike,
             train_file: str | os.PathLike | None = None, *, limit: int | None = None,
             num_fewshot: int | None = None, backend: str = "builtin", batch_size: int = 8,
             max_new_tokens: int | None = None, fewshot_seed: int = 1234, progress: bool = True,
             generate_fn: Callable[[list[str]], list[str]] | None = None, return_samples: bool = False) -> dict:
    """Run a generation task on an in-memory model; metrics keyed as lm-eval reports them.

    backend: "builtin" (no lm-eval needed), "lm_eval" (the real harness), or "auto" (lm_eval when
    importable). limit: first N test documents. generate_fn: builtin only; replaces the model with
    a function prompts -> responses (scripted models, tests). Returns
    ``{"<metric>,<filter>": float, "<metric>_stderr,<filter>": float, ..., "n": int, "backend": str}``
    plus "samples" (prompt, response, target) when return_samples.
    """
    k = task.num_fewshot if num_fewshot is None else num_fewshot
    if max_new_tokens is not None:
        task = GenerationTask(**{**task.__dict__, "max_gen_toks": max_new_tokens})
    if backend == "auto":
        try:
            import lm_eval  # noqa: F401
            backend = "lm_eval"
        except ImportError:
            backend = "builtin"
    if backend == "lm_eval":
        if generate_fn is not None:
            raise ValueError("generate_fn works with backend='builtin' only")
        return _run_lm_eval(task, model, tokenizer, os.fspath(test_file),
                            None if train_file is None else os.fspath(train_file), limit, k, batch_size, fewshot_seed)
    if backend != "builtin":
        raise ValueError(f"backend must be 'builtin', 'lm_eval' or 'auto', got {backend!r}")
    docs = read_docs(test_file)
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise ValueError(f"{test_file}: no documents")
    train = read_docs(train_file) if (train_file is not None and k > 0) else None
    prompts = build_prompts(task, docs, train, k, fewshot_seed)
    if generate_fn is not None:
        responses = list(generate_fn(prompts))
        if len(responses) != len(prompts):
            raise ValueError(f"generate_fn returned {len(responses)} responses for {len(prompts)} prompts")
    else:
        from .generate import greedy_generate

        responses = greedy_generate(model, tokenizer, prompts, stop=task.until, max_new_tokens=task.max_gen_toks,
                                    batch_size=batch_size, progress=progress)
    out = {**score_responses(task, responses, docs), "n": len(docs), "backend": "builtin", "num_fewshot": k}
    if return_samples:
        out["samples"] = [{"prompt": p, "response": r, "target": render(task.doc_to_target, d)}
                          for p, r, d in zip(prompts, responses, docs)]
    return out


def _run_lm_eval(task, model, tokenizer, test_file, train_file, limit, k, batch_size, fewshot_seed) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(f"backend='lm_eval' needs the harness: pip install {LM_EVAL_PIN} "
                          f"(or use backend='builtin')") from None
    if k > 0 and train_file is None:
        raise ValueError(f"{k}-shot prompts need a train file with examples")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=[lm_eval_task_config(task, test_file, train_file, k)],
                                  num_fewshot=k, limit=limit, fewshot_random_seed=fewshot_seed,
                                  log_samples=False, task_manager=TaskManager(include_defaults=False))
    got = res["results"][task.name]
    out = {key: float(v) for key, v in got.items() if key.startswith(task.metric) and "," in key
           and isinstance(v, (int, float))}
    n = res.get("n-samples", {}).get(task.name, {}).get("effective")
    out.update({"n": int(n) if n is not None else None, "backend": "lm_eval", "num_fewshot": k})
    return out


def evaluate_gsm8k(model, tokenizer, test_file, train_file=None, **kwargs) -> dict:
    """GSM8K (lm-eval's gsm8k task, 5-shot by default) from local JSONL files; see :func:`run_task`."""
    return run_task(GSM8K, model, tokenizer, test_file, train_file, **kwargs)

"""SFT data: JSONL rows -> token ids with completion-only labels, and a padding collator.

Accepted row forms (one JSON object per line):

* ``{"prompt": str, "completion": str}`` -- prompt/completion text;
* ``{"prompt": [messages], "completion": [messages] | str}`` -- conversational prompt/completion;
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` -- the last message is the assistant's
  completion, everything before it the prompt;
* with ``template=`` one of `TEMPLATES` (the paper's Tables 4-6): the template's fields
  (e.g. ``note``, ``question``) plus ``completion``.

Conversations are rendered through the tokenizer's chat template (ChatML, the format of the
paper's tables, when the tokenizer has none). Plain prompt/completion text is concatenated and an
EOS appended unless ``chat_template=True``. Labels are -100 on every prompt token (including an
assistant prefix such as Table 4's "Let me solve this step by step.\\n<think>") and equal the ids
on completion tokens. Prompt and completion are tokenized separately and concatenated, so the
label boundary is exact.

Evaluation sets (`read_eval_jsonl`: `talr compare`, ``talr forecast --general``) accept these
forms and also ``{"text": str}`` (coded whole) and the HumanEval form ``{"prompt",
"canonical_solution"}``; one reader for both commands.

A bad row raises `DataError` naming the file, the 1-based line and the field; nothing is
returned or written for a file with a bad row. Lines are read by `sft.io.json_lines` (not
UTF-8, not JSON, nested too deep, an over-long integer, a lone surrogate: each names its line).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .chatml import CHATML_TEMPLATE
from .io import json_lines

IGNORE_INDEX = -100


class DataError(ValueError):
    """A row that cannot be used; the message names file, line and field."""


@dataclass(frozen=True)
class PromptTemplate:
    """One of the paper's prompt templates: system text, user text with {fields}, assistant prefix."""

    name: str
    system: str
    user: str
    assistant_prefix: str
    fields: tuple[str, ...]

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.user.format(**{f: row[f] for f in self.fields})},
        ]


def _paper_templates() -> dict[str, PromptTemplate]:
    """Tables 4-6, from their single source in `sft.eval.medcalc` / `sft.eval.esci` (torch-free)."""
    from .eval import esci as E
    from .eval import medcalc as M

    return {
        # Table 4
        "medcalc": PromptTemplate("medcalc", M.SYSTEM_PROMPT, M.USER_TEMPLATE, M.ASSISTANT_PREFIX,
                                  ("note", "question")),
        # Table 5 (w/o CoT) and Table 6 (w/ CoT); fields named as in the official ESCI files
        "esci": PromptTemplate("esci", E.SYSTEM_PROMPT_NO_COT, E.USER_TEMPLATE_NO_COT, E.ASSISTANT_PREFIX_NO_COT,
                               ("query", "product_info")),
        "esci_cot": PromptTemplate("esci_cot", E.SYSTEM_PROMPT_COT, E.USER_TEMPLATE_COT, E.ASSISTANT_PREFIX_COT,
                                   ("query", "product_info")),
    }


TEMPLATES: dict[str, PromptTemplate] = _paper_templates()


# ----------------------------------------------------------------------------------------------
# reading rows
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """A parsed row: prompt messages (or plain text), assistant prefix, completion text.

    ``prompt`` None: an evaluation text coded whole (`parse_eval_row`)."""

    prompt: list[dict[str, str]] | str | None
    completion: str
    assistant_prefix: str = ""
    where: str = ""  # "file:line" for error messages
    extra: dict[str, Any] | None = None


def _err(path, line, field, msg) -> DataError:
    return DataError(f"{path}:{line}: field {field!r}: {msg}")


def _check_messages(value, path, line, field) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _err(path, line, field, "expected a non-empty list of {role, content} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _err(path, line, f"{field}[{i}]", "expected an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise _err(path, line, f"{field}[{i}].role", f"unknown role {m['role']!r}")
    return value


def parse_row(obj: Any, path: str = "<memory>", line: int = 0, template: str | None = None) -> Row:
    """Validate one JSON object and turn it into a `Row` (raises `DataError`)."""
    if not isinstance(obj, dict):
        raise _err(path, line, "<row>", f"expected a JSON object, got {type(obj).__name__}")
    where = f"{path}:{line}"
    if template is not None:
        if template not in TEMPLATES:
            raise DataError(f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}")
        t = TEMPLATES[template]
        for f in t.fields + ("completion",):
            if not isinstance(obj.get(f), str):
                raise _err(path, line, f, "missing or not a string")
        if not obj["completion"]:
            raise _err(path, line, "completion", "empty")
        return Row(t.messages(obj), obj["completion"], t.assistant_prefix, where)
    if "messages" in obj:
        msgs = _check_messages(obj["messages"], path, line, "messages")
        if msgs[-1]["role"] != "assistant":
            raise _err(path, line, f"messages[{len(msgs) - 1}].role", "the last message must be the assistant's")
        if len(msgs) < 2:
            raise _err(path, line, "messages", "needs at least one prompt message before the assistant's")
        return Row(msgs[:-1], msgs[-1]["content"], "", where)
    if "prompt" not in obj:
        if "text" in obj:
            raise _err(path, line, "text", "a plain text is an evaluation row (talr compare / forecast --general); "
                                           "training rows need 'prompt'+'completion' or 'messages'")
        raise _err(path, line, "prompt", "missing (expected 'prompt'+'completion' or 'messages')")
    if "completion" not in obj:
        raise _err(path, line, "completion", "missing")
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, list):
        prompt = _check_messages(prompt, path, line, "prompt")
    elif not isinstance(prompt, str):
        raise _err(path, line, "prompt", "expected a string or a list of messages")
    if isinstance(completion, list):
        completion = _check_messages(completion, path, line, "completion")
        if len(completion) != 1 or completion[0]["role"] != "assistant":
            raise _err(path, line, "completion", "expected exactly one assistant message")
        completion = completion[0]["content"]
    elif not isinstance(completion, str):
        raise _err(path, line, "completion", "expected a string or a list with one assistant message")
    if not completion:
        raise _err(path, line, "completion", "empty")
    return Row(prompt, completion, "", where)


def _rows(path: str, parse) -> list[Row]:
    """``parse(obj, path, line)`` of every row of a JSONL file; the first bad row raises `DataError`."""
    try:
        rows = [parse(obj, path, i) for i, obj in json_lines(path)]
    except DataError:
        raise
    except ValueError as exc:  # not UTF-8 / not JSON / too deep / lone surrogate: names file and line
        raise DataError(str(exc)) from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_jsonl(path: str | Path, *, template: str | None = None) -> list[Row]:
    """All training rows of a JSONL file (blank lines skipped); the first bad row raises `DataError`."""
    return _rows(str(path), lambda obj, p, i: parse_row(obj, p, i, template))


def parse_eval_row(obj: Any, path: str = "<memory>", line: int = 0, template: str | None = None) -> Row:
    """One row of an evaluation set (`talr compare`, ``talr forecast --general``): every form of
    `parse_row`, plus ``{"text": str}`` (a whole text: ``prompt`` None) and the HumanEval form
    ``{"prompt": str, "canonical_solution": str}`` (raw text, no chat template: ``extra["raw"]``)."""
    if isinstance(obj, dict) and "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise _err(path, line, "text", f"expected a string, got {type(text).__name__}")
        if not text:
            raise _err(path, line, "text", "empty (nothing to code)")
        return Row(None, text, "", f"{path}:{line}")  # type: ignore[arg-type]
    if isinstance(obj, dict) and "canonical_solution" in obj:
        for f in ("prompt", "canonical_solution"):
            if not isinstance(obj.get(f), str) or not obj[f]:
                raise _err(path, line, f, "missing, empty or not a string (HumanEval form)")
        return Row(obj["prompt"], obj["canonical_solution"], "", f"{path}:{line}", {"raw": True})
    return parse_row(obj, path, line, template)


def read_eval_jsonl(path: str | Path, *, template: str | None = None) -> list[Row]:
    """All rows of an evaluation JSONL (`parse_eval_row`); one form per file (text rows, or rows
    with a prompt), since a set is coded either whole or conditionally."""
    rows = _rows(str(path), lambda obj, p, i: parse_eval_row(obj, p, i, template))
    kinds = {r.prompt is None for r in rows}
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes 'text' rows with prompt/completion rows; use one form per file")
    return rows


def eval_texts(tokenizer, rows: Sequence[Row]) -> tuple[list[str | None], list[str]]:
    """(prompts, texts) to code: ``(None, text)`` for text rows, the raw HumanEval pair, else the
    rendered prompt and completion exactly as `talr train` tokenizes them (`split_text`)."""
    prompts, texts = [], []
    for r in rows:
        if r.prompt is None or (r.extra or {}).get("raw"):
            prompts.append(r.prompt)
            texts.append(r.completion)
        else:
            p, c, _ = split_text(tokenizer, r)
            prompts.append(p)
            texts.append(c)
    return prompts, texts


# ----------------------------------------------------------------------------------------------
# tokenization
# ----------------------------------------------------------------------------------------------
def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def split_text(tokenizer, row: Row, *, chat_template: bool | None = None) -> tuple[str, str, bool]:
    """(prompt text, completion text, is_chat). The completion text ends with the turn end / EOS.

    An evaluation text row (``prompt`` None) is ``("", text, False)``; a raw HumanEval row is
    ``(prompt, solution, False)`` (no template, no EOS).
    """
    if row.prompt is None or (row.extra or {}).get("raw"):
        return row.prompt or "", row.completion, False
    conversational = isinstance(row.prompt, list)
    use_chat = chat_template if chat_template is not None else (
        conversational or getattr(tokenizer, "chat_template", None) is not None)
    if not use_chat:
        if conversational:
            raise DataError(f"{row.where}: conversational row needs a chat template")
        return row.prompt, row.completion + (tokenizer.eos_token or ""), False
    msgs = row.prompt if conversational else [{"role": "user", "content": row.prompt}]
    prompt_text = _render(tokenizer, msgs, True) + row.assistant_prefix
    full = _render(tokenizer, msgs + [{"role": "assistant", "content": row.assistant_prefix + row.completion}], False)
    if full.startswith(prompt_text):
        completion_text = full[len(prompt_text):]
    else:  # templates that rewrite earlier turns (e.g. strip <think>): fall back to completion + EOS
        completion_text = row.completion + (tokenizer.eos_token or "")
    return prompt_text, completion_text, True


def tokenize_row(tokenizer, row: Row, *, max_length: int | None = None,
                 chat_template: bool | None = None) -> dict[str, list[int]] | None:
    """``{"input_ids", "labels"}`` for one row; None when truncation leaves no completion token."""
    prompt_text, completion_text, is_chat = split_text(tokenizer, row, chat_template=chat_template)
    p_ids = tokenizer(prompt_text, add_special_tokens=not is_chat)["input_ids"]
    c_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    ids = list(p_ids) + list(c_ids)
    labels = [IGNORE_INDEX] * len(p_ids) + list(c_ids)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


class SFTDataset(torch.utils.data.Dataset):
    """A list of tokenized examples (dicts of lists); ``dropped`` counts rows truncated away."""

    def __init__(self, examples: Sequence[dict[str, Any]], dropped: int = 0):
        self.examples = list(examples)
        self.dropped = dropped

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    def with_column(self, name: str, values: Sequence[Any]) -> "SFTDataset":
        """A new dataset with ``name`` set on every example (e.g. FLOW's ``flow_weight``)."""
        if len(values) != len(self.examples):
            raise ValueError(f"{name}: {len(values)} values for {len(self.examples)} examples")
        return SFTDataset([{**ex, name: v} for ex, v in zip(self.examples, values)], self.dropped)

    def num_tokens(self) -> int:
        return sum(len(ex["input_ids"]) for ex in self.examples)


def tokenize_rows(tokenizer, rows: Iterable[Row], *, max_length: int | None = None,
                  chat_template: bool | None = None) -> SFTDataset:
    examples, dropped = [], 0
    for row in rows:
        ex = tokenize_row(tokenizer, row, max_length=max_length, chat_template=chat_template)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise DataError("no example keeps a completion token after truncation; raise max_length")
    return SFTDataset(examples, dropped)


def as_sft_dataset(data, tokenizer=None, *, max_length: int | None = None) -> SFTDataset:
    """An `SFTDataset` from what `sft.trainer.train` accepts.

    ``data``: an `SFTDataset` (returned as is), or any sequence of rows -- a list of dicts or a
    ``datasets.Dataset`` -- either tokenized (``input_ids`` and ``labels``, HF convention with
    -100 on prompt tokens) or untokenized in one of the JSONL forms of this module (then
    ``tokenizer`` is required).
    """
    if isinstance(data, SFTDataset):
        return data
    rows = [data[i] for i in range(len(data))]
    if not rows:
        raise DataError("the training set is empty")
    if "input_ids" in rows[0]:
        for i, r in enumerate(rows):
            if "labels" not in r:
                raise DataError(f"<dataset>:{i + 1}: field 'labels' missing (tokenized rows need input_ids and labels)")
            if len(r["labels"]) != len(r["input_ids"]):
                raise DataError(f"<dataset>:{i + 1}: field 'labels': length {len(r['labels'])} != input_ids "
                                f"length {len(r['input_ids'])}")
        return SFTDataset(rows)
    if tokenizer is None:
        raise DataError("<dataset>:1: untokenized rows (no 'input_ids') need a tokenizer")
    return tokenize_rows(tokenizer, [parse_row(r, "<dataset>", i + 1) for i, r in enumerate(rows)],
                         max_length=max_length)


def load_sft_dataset(path: str | Path, tokenizer, *, template: str | None = None, max_length: int | None = None,
                     chat_template: bool | None = None) -> SFTDataset:
    """Read a JSONL file and tokenize it with completion-only labels."""
    return tokenize_rows(tokenizer, read_jsonl(path, template=template), max_length=max_length,
                         chat_template=chat_template)


# ----------------------------------------------------------------------------------------------
# collation
# ----------------------------------------------------------------------------------------------
@dataclass
class PadCollator:
    """Right-pads a list of examples to the longest one in the batch (dynamic padding).

    Returns input_ids, attention_mask, labels (-100 on padding) and, when the examples carry it,
    ``flow_weight`` [B] (FLOW's static sequence weights).
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
        B = len(examples)
        input_ids = torch.full((B, n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, n), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((B, n), dtype=torch.long)
        for i, ex in enumerate(examples):
            k = len(ex["input_ids"])
            input_ids[i, :k] = torch.as_tensor(ex["input_ids"])
            labels[i, :k] = torch.as_tensor(ex["labels"])
            attn[i, :k] = 1
        batch = {"input_ids": input_ids, "attention_mask": attn, "labels": labels}
        if "flow_weight" in examples[0]:
            batch["flow_weight"] = torch.tensor([float(ex["flow_weight"]) for ex in examples], dtype=torch.float64)
        return batch

"""ESCI (Shopping Queries): official parquet pair or a JSONL export, Table 5/6 prompts, label
parsing and balanced accuracy.

Official files (amazon-science/esci-data): ``shopping_queries_dataset_examples.parquet``
(:data:`EXAMPLE_COLUMNS`) and ``shopping_queries_dataset_products.parquet``
(:data:`PRODUCT_COLUMNS`), joined on ``(product_locale, product_id)``. A JSONL export holds one
joined record per line with the same field names (the product fields may be absent or null).

Labels follow the paper: 0 = Exact (E), 1 = Substitute (S), 2 = Complement (C), 3 = Irrelevant (I).
The metric is balanced accuracy: the mean, over the classes present in the truth, of each class's
recall; an unparsable prediction (None, -1, anything outside 0..3) is wrong.

Imports only the standard library and numpy; pyarrow is imported inside :func:`load_esci` when a
parquet file is read.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Hashable, Sequence

from ..io import atomic_write_text

EXAMPLE_COLUMNS = ("example_id", "query", "query_id", "product_id", "product_locale", "esci_label",
                   "small_version", "large_version", "split")
PRODUCT_COLUMNS = ("product_id", "product_title", "product_description", "product_bullet_point",
                   "product_brand", "product_color", "product_locale")
LABELS = ("Exact", "Substitute", "Complement", "Irrelevant")
LETTER_TO_LABEL = {"E": 0, "S": 1, "C": 2, "I": 3}

# Table 5 (w/o CoT) and Table 6 (w/ CoT) of the paper.
SYSTEM_PROMPT_NO_COT = "You are a helpful assistant. You provide the user with the answer."
SYSTEM_PROMPT_COT = (
    "You are a helpful assistant. You first think about the reasoning process in the mind and "
    "then provide the user with the answer."
)
_USER_HEAD = (
    "Your task is to classify each product as being an Exact, Substitute, Complement, or "
    "Irrelevant match for the query.\n"
    "Here is the user\u2019s query:\n{query}\n"
    "Here is the product information:\n{product_info}\n"
    "--------------\n"
)
USER_TEMPLATE_NO_COT = _USER_HEAD + (
    "Your final response must be within <answer> </answer> tags.\n"
    "Label the relation type as a number: 0 = Exact, 1 = Substitute, 2 = Complement and "
    "3 = Irrelevant. For example,\n"
    "<answer>one_of_[0, 1, 2, 3]</answer>."
)
USER_TEMPLATE_COT = _USER_HEAD + (
    "Please show your entire reasoning process in **a single** <think> </think> block (do not "
    "open or close the tag more than once).\n"
    "Your final response must be within <answer> </answer> tags.\n"
    "Label the relation type as a number: 0 = Exact, 1 = Substitute, 2 = Complement and "
    "3 = Irrelevant. For example,\n"
    "<think>\n[entire reasoning process here]\n</think>\n"
    "<answer>one_of_[0, 1, 2, 3]</answer>"
)
ASSISTANT_PREFIX_NO_COT = "<answer>"
ASSISTANT_PREFIX_COT = ""

_PRODUCT_FIELDS = (("Title", "product_title"), ("Brand", "product_brand"), ("Color", "product_color"),
                   ("Bullet points", "product_bullet_point"), ("Description", "product_description"))


class ESCIFormatError(ValueError):
    """An ESCI file or record that does not follow the official format."""


# --------------------------------------------------------------------------- reading


def label_id(value, where: str = "") -> int:
    """Map an ESCI label (E/S/C/I letter, full name, or 0..3) to 0..3."""
    if isinstance(value, str):
        v = value.strip()
        if v.upper() in LETTER_TO_LABEL:
            return LETTER_TO_LABEL[v.upper()]
        for k, name in enumerate(LABELS):
            if v.lower() == name.lower():
                return k
        if v in ("0", "1", "2", "3"):
            return int(v)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return value
    raise ESCIFormatError(f"{where}field 'esci_label': expected E, S, C, I (or 0..3), got {value!r}")


def _check_record(rec: dict, where: str, need_product: bool) -> dict:
    for field in ("query", "product_id", "product_locale", "esci_label"):
        if rec.get(field) is None or (isinstance(rec[field], str) and not rec[field].strip()):
            raise ESCIFormatError(f"{where}field '{field}': missing or empty")
    if need_product and rec.get("product_title") is None:
        raise ESCIFormatError(f"{where}field 'product_title': missing (no product for "
                              f"({rec['product_locale']!r}, {rec['product_id']!r}))")
    out = dict(rec)
    out["label"] = label_id(rec["esci_label"], where)
    return out


def load_esci(examples_path: str | os.PathLike, products_path: str | os.PathLike | None = None, *,
              split: str | None = None, small_version: bool | None = None,
              locale: str | None = None, limit: int | None = None) -> list[dict]:
    """Read ESCI examples joined with their products, as a list of dicts with an int ``label``.

    `examples_path` is the official examples parquet (then `products_path` is the products
    parquet) or a ``.jsonl`` export (joined records; `products_path` must be None). The filters
    keep rows whose ``split``, ``small_version`` and ``product_locale`` match; `limit` keeps the
    first rows after filtering. Errors name file, row (0-based parquet row or 1-based JSONL
    line) and field.
    """
    examples_path = os.fspath(examples_path)
    if examples_path.endswith((".jsonl", ".json")):
        if products_path is not None:
            raise ValueError("a JSONL export already holds the product fields; pass products_path=None")
        return _load_jsonl(examples_path, split, small_version, locale, limit)
    if products_path is None:
        raise ValueError("reading the examples parquet needs products_path (the products parquet)")
    return _load_parquet(examples_path, os.fspath(products_path), split, small_version, locale, limit)


def _keep(rec: dict, split, small_version, locale) -> bool:
    if split is not None and rec.get("split") != split:
        return False
    if small_version is not None and bool(rec.get("small_version")) != small_version:
        return False
    return locale is None or rec.get("product_locale") == locale


def _load_jsonl(path, split, small_version, locale, limit) -> list[dict]:
    from ..io import json_lines  # the one JSONL reader: errors name PATH:LINE and the field

    out = []
    try:
        for lineno, rec in json_lines(path):
            if not isinstance(rec, dict):
                raise ESCIFormatError(f"{path}: line {lineno}: expected a JSON object")
            if not _keep(rec, split, small_version, locale):
                continue
            out.append(_check_record(rec, f"{path}: line {lineno}, ", need_product=False))
            if limit is not None and len(out) >= limit:
                break
    except ESCIFormatError:
        raise
    except ValueError as exc:  # not JSON, not UTF-8, too deep...: json_lines names file, line and field
        raise ESCIFormatError(str(exc)) from None
    return out


def _load_parquet(ex_path, pr_path, split, small_version, locale, limit) -> list[dict]:
    try:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading ESCI parquet files needs pyarrow: pip install pyarrow==26.0.1") from None
    ex = _read_table(pq, ex_path, EXAMPLE_COLUMNS)
    mask = None
    for col, value in (("split", split), ("small_version", small_version), ("product_locale", locale)):
        if value is None:
            continue
        column = ex.column(col)
        if col == "small_version":
            column = pc.cast(column, "bool")
        m = pc.fill_null(pc.equal(column, value), False)
        mask = m if mask is None else pc.and_(mask, m)
    rows = list(range(ex.num_rows))
    if mask is not None:
        keep = mask.to_pylist()
        rows = [i for i in rows if keep[i]]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        _read_table(pq, pr_path, PRODUCT_COLUMNS, schema_only=True)
        return []
    ex = ex.take(rows)
    pr = _read_table(pq, pr_path, PRODUCT_COLUMNS,
                     filters=[("product_id", "in", sorted(set(ex.column("product_id").to_pylist())))])
    products = {}
    for p in pr.to_pylist():
        products.setdefault((p["product_locale"], p["product_id"]), p)
    out = []
    for i, rec in zip(rows, ex.to_pylist()):
        where = f"{ex_path}: row {i}, "
        prod = products.get((rec["product_locale"], rec["product_id"]))
        if prod is None:
            raise ESCIFormatError(f"{where}field 'product_id': no product ({rec['product_locale']!r}, "
                                  f"{rec['product_id']!r}) in {pr_path}")
        joined = {**rec, **{k: v for k, v in prod.items() if k not in ("product_id", "product_locale")}}
        out.append(_check_record(joined, where, need_product=True))
    return out


def _read_table(pq, path, columns, filters=None, schema_only=False):
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise ESCIFormatError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ESCIFormatError(f"{path}: missing column(s) {missing}")
    if schema_only:
        return None
    return pq.read_table(path, columns=list(columns), filters=filters)


def write_jsonl_export(records: Sequence[dict], path: str | os.PathLike) -> None:
    """Write joined records (as returned by :func:`load_esci`) as a JSONL export, atomically."""
    fields = EXAMPLE_COLUMNS + tuple(c for c in PRODUCT_COLUMNS if c not in EXAMPLE_COLUMNS)
    text = "".join(json.dumps({f: r.get(f) for f in fields}, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)


# --------------------------------------------------------------------------- prompts


def product_info(rec: dict, max_chars: int | None = 2000) -> str:
    """Product fields as ``Name: value`` lines (empty fields left out), cut to max_chars."""
    lines = [f"{name}: {str(rec[key]).strip()}" for name, key in _PRODUCT_FIELDS
             if rec.get(key) is not None and str(rec[key]).strip()]
    text = "\n".join(lines)
    return text if max_chars is None or len(text) <= max_chars else text[:max_chars]


def build_messages(rec: dict, cot: bool, max_product_chars: int | None = 2000) -> list[dict]:
    """System and user messages of Table 6 (cot=True) or Table 5 (cot=False)."""
    template = USER_TEMPLATE_COT if cot else USER_TEMPLATE_NO_COT
    user = template.format(query=rec["query"], product_info=product_info(rec, max_product_chars))
    return [{"role": "system", "content": SYSTEM_PROMPT_COT if cot else SYSTEM_PROMPT_NO_COT},
            {"role": "user", "content": user}]


def assistant_prefix(cot: bool) -> str:
    """Text the assistant turn starts with in the prompt: ``<answer>`` for Table 5, nothing for Table 6."""
    return ASSISTANT_PREFIX_COT if cot else ASSISTANT_PREFIX_NO_COT


def build_prompt(rec: dict, tokenizer, cot: bool, max_product_chars: int | None = 2000) -> str:
    """Chat template on Table 5/6 plus the assistant prefix."""
    text = tokenizer.apply_chat_template(build_messages(rec, cot, max_product_chars), tokenize=False,
                                         add_generation_prompt=True)
    return text + assistant_prefix(cot)


def sft_target(rec: dict, cot: bool, rationale: str | None = None) -> str:
    """Completion after the prefix: ``k</answer>`` (w/o CoT) or ``<think>..</think>\\n<answer>k</answer>``.

    The CoT rationales of the paper were sampled from Qwen2.5-72B and are not part of ESCI, so
    cot=True needs `rationale` (or a ``rationale`` field in `rec`).
    """
    k = rec["label"] if "label" in rec else label_id(rec["esci_label"])
    if not cot:
        return f"{k}</answer>"
    rationale = rationale if rationale is not None else rec.get("rationale")
    if not rationale:
        raise ValueError("cot=True needs a rationale (ESCI ships none; the paper sampled them from a larger model)")
    return f"<think>\n{rationale.strip()}\n</think>\n<answer>{k}</answer>"


# --------------------------------------------------------------------------- parsing and metric

_ANSWER = re.compile(r"(?:<answer>)?\s*([^<>]*?)\s*</answer>", re.S)
_OPEN_ANSWER = re.compile(r"<answer>\s*([^<>]*?)\s*$", re.S)


def parse_label(text: str) -> int | None:
    """Label 0..3 from the last ``<answer>k</answer>``; None when unparsable.

    Also reads ``k</answer>`` (the Table-5 prompt already opened the tag), an unclosed final
    ``<answer>k``, and a label name or letter (Exact / E ...) inside the tags.
    """
    if not isinstance(text, str):
        return None
    found = _ANSWER.findall(text) or _OPEN_ANSWER.findall(text)
    if not found:
        return None
    inner = found[-1].strip().strip(".").strip()
    if inner in ("0", "1", "2", "3"):
        return int(inner)
    try:
        return label_id(inner)
    except ESCIFormatError:
        return None


def balanced_accuracy(y_true: Sequence[Hashable], y_pred: Sequence) -> float:
    """Mean per-class recall over the classes present in `y_true`.

    A prediction that equals no class of the truth (None, -1, an unparsed value) is simply wrong
    for its row. Equals ``sklearn.metrics.balanced_accuracy_score(y_true, y_pred)`` with unparsable
    predictions mapped to a value outside the labels.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    if len(y_true) == 0:
        raise ValueError("balanced accuracy of an empty set is undefined")
    hits: dict = defaultdict(int)
    counts: dict = defaultdict(int)
    for t, p in zip(y_true, y_pred):
        if t is None:
            raise ValueError("y_true holds None")
        counts[t] += 1
        if p is not None and p == t and type(p) is not bool:
            hits[t] += 1
    return float(sum(hits[c] / counts[c] for c in counts) / len(counts))


def evaluate(predictions: Sequence[str], records: Sequence[dict]) -> dict:
    """Balanced accuracy, plain accuracy, per-class recall and parse-failure count of model outputs."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    y_true = [r["label"] if "label" in r else label_id(r["esci_label"]) for r in records]
    y_pred = [parse_label(p) for p in predictions]
    recall = {}
    for k, name in enumerate(LABELS):
        idx = [i for i, t in enumerate(y_true) if t == k]
        if idx:
            recall[name] = sum(y_pred[i] == k for i in idx) / len(idx)
    return {
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "accuracy": sum(p == t for p, t in zip(y_pred, y_true)) / len(y_true),
        "per_class_recall": recall,
        "n": len(y_true),
        "n_unparsed": sum(p is None for p in y_pred),
    }

"""MedCalc-Bench: official CSV reader, Table-4 prompts, SFT targets, answer parsing and judging.

The official file (ncbi-nlp/MedCalc-Bench, ``dataset/test_data.csv``; the training file may be a
``.zip`` holding one CSV) has the columns of :data:`COLUMNS`. Judging follows the official
``evaluation/run.py`` (``extract_answer`` + ``check_correctness``) rule for rule, without ever
calling ``eval`` on model output:

* calculators 13 and 68 (Output Type ``date``): the answer must start with ``M/D/YYYY``; it is
  correct when it is the same calendar date as the truth (``MM/DD/YYYY``);
* calculator 69 (gestational age, Output Type ``integer``): a ``(weeks, days)`` pair, truth
  written ``('4 weeks', '0 days')``; correct when both integers match;
* Output Type ``integer``: official extraction ("3 out of 5" -> 3; a comma list "3, 4, 5" -> its
  length, 3; else the last number), then ``round(answer) == truth`` with Python's round
  (half to even, as the official code);
* Output Type ``decimal``: official extraction ("str(<arithmetic>)" evaluated by a whitelisted
  AST walker; "x mL/min/1.73" -> x; last "x%" -> x/100; else the last number), then
  ``Lower Limit <= answer <= Upper Limit``;
* anything unparsable is incorrect.

Bounded work (model output is untrusted): judging one output costs O(len(output)) regex steps
plus at most `MAX_EXPR_NODES` arithmetic operations on floats or small integers. The raw answer
is refused (judged incorrect) above `MAX_ANSWER_CHARS` characters or with a digit run longer
than `MAX_DIGITS`; ``**`` and ``pow`` are computed in floats (``pow(7, 10**8)`` overflows at
once instead of building a 10^8-digit integer); ``round``'s digit count is limited; only the
text up to the last ``}`` is searched for ``"answer": ...}`` (so every attempt that starts there
succeeds, and the search is linear).

Deviations from the official code, on purpose: (a) the ``(weeks, days)`` pattern requires a
separator between the two numbers (the official pattern reads "14 weeks" as (1, 4)) and also
accepts "4 weeks and 3 days"; (b) the answer is taken from the last ``<answer>..</answer>`` block
of the Table-4 format before falling back to the official ``"answer": ...}`` search over the whole
text, and a one-line bare value (e.g. "25.2") is accepted as the answer itself.

Imports only the standard library and numpy.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import math
import operator
import os
import re
import zipfile
from collections import defaultdict
from datetime import date
from typing import Iterable, Sequence

import numpy as np

from ..io import atomic_write_text

COLUMNS = (
    "Row Number", "Calculator ID", "Calculator Name", "Category", "Output Type", "Note ID",
    "Note Type", "Patient Note", "Question", "Relevant Entities", "Ground Truth Answer",
    "Lower Limit", "Upper Limit", "Ground Truth Explanation",
)
OUTPUT_TYPES = ("decimal", "integer", "date")
DATE_CALCULATORS = frozenset({13, 68})
WEEKS_DAYS_CALCULATOR = 69

# Table 4 of the paper.
SYSTEM_PROMPT = (
    "You are a helpful assistant. You first think about the reasoning process in the mind and "
    "then provide the user with the answer."
)
USER_TEMPLATE = (
    "You are a helpful assistant for calculating a score for a given patient note. Please think "
    "step-by-step to solve the question and then generate the required score.\n"
    "Here is the patient note:\n{note}\n"
    "Here is the task:\n{question}\n"
    "Please show your entire reasoning process in a single <think> </think> block (do not open "
    "or close the tag more than once).\n"
    "Your final response must be in JSON format within <answer> </answer> tags. For example,\n"
    "<think>\n[entire reasoning process here]\n</think>\n"
    "<answer>\n{{\"answer\": str(short_and_direct_answer_of_the_question)}}\n</answer>"
)
ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"

_PLACEHOLDERS = {
    "str(short_and_direct_answer_of_the_question)",
    "str(value which is the answer to the question)",
    "X.XX",
}


class MedCalcFormatError(ValueError):
    """A MedCalc-Bench file or row that does not follow the official format."""


# --------------------------------------------------------------------------- reading


def _where(path: str, line: int | None, field: str | None) -> str:
    out = str(path)
    if line is not None:
        out += f": line {line}"
    if field is not None:
        out += f", field '{field}'"
    return out


def _read_csv_text(path: str) -> tuple[str, str]:
    """Return (text, name used in messages); a .zip must hold exactly one .csv (or train_data.csv)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.lower().endswith(".csv") and "__MACOSX" not in n]
            if not names:
                raise MedCalcFormatError(f"{path}: zip archive holds no .csv file")
            if len(names) > 1:
                preferred = [n for n in names if os.path.basename(n) in ("train_data.csv", "test_data.csv")]
                if len(preferred) != 1:
                    raise MedCalcFormatError(f"{path}: zip archive holds several .csv files: {names}")
                names = preferred
            raw = zf.read(names[0])
            shown = f"{path}!{names[0]}"
    else:
        with open(path, "rb") as fh:
            raw = fh.read()
        shown = str(path)
    try:
        return raw.decode("utf-8-sig"), shown
    except UnicodeDecodeError as e:
        raise MedCalcFormatError(f"{shown}: not UTF-8 text ({e})") from None


def _check_row(row: dict, where_line) -> None:
    """Validate one row in place; `where_line(field)` builds the error location."""
    for field in ("Row Number", "Calculator ID"):
        try:
            int(row[field])
        except ValueError:
            raise MedCalcFormatError(f"{where_line(field)}: expected an integer, got {row[field]!r}") from None
    otype = row["Output Type"]
    if otype not in OUTPUT_TYPES:
        raise MedCalcFormatError(f"{where_line('Output Type')}: expected one of {OUTPUT_TYPES}, got {otype!r}")
    for field in ("Note ID", "Question"):
        if not row[field].strip():
            raise MedCalcFormatError(f"{where_line(field)}: empty")
    kind = rule_for(row)
    truth = row["Ground Truth Answer"]
    if kind == "date":
        if _parse_date(truth) is None:
            raise MedCalcFormatError(f"{where_line('Ground Truth Answer')}: expected a MM/DD/YYYY date, got {truth!r}")
    elif kind == "weeks_days":
        if _parse_weeks_days(truth) is None:
            raise MedCalcFormatError(f"{where_line('Ground Truth Answer')}: expected a (weeks, days) pair, got {truth!r}")
    else:
        if _to_float(truth) is None:
            raise MedCalcFormatError(f"{where_line('Ground Truth Answer')}: expected a number, got {truth!r}")
        if kind == "decimal":
            for field in ("Lower Limit", "Upper Limit"):
                if _to_float(row[field]) is None:
                    raise MedCalcFormatError(f"{where_line(field)}: expected a number, got {row[field]!r}")
            if float(row["Lower Limit"]) > float(row["Upper Limit"]):
                raise MedCalcFormatError(
                    f"{where_line('Lower Limit')}: Lower Limit {row['Lower Limit']} > Upper Limit {row['Upper Limit']}")


def load_medcalc(path: str | os.PathLike) -> list[dict]:
    """Read an official MedCalc-Bench CSV (or a .zip holding it) into a list of row dicts.

    Values stay strings, keyed by the official column names. Every row is validated (integers,
    Output Type, a parseable truth for its rule, numeric limits for decimals); the first bad row
    raises :class:`MedCalcFormatError` naming file, line (1-based, where the record starts) and field.
    """
    path = os.fspath(path)
    text, shown = _read_csv_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise MedCalcFormatError(f"{shown}: empty file") from None
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise MedCalcFormatError(f"{shown}: line 1: missing column(s) {missing}")
    index = {c: header.index(c) for c in COLUMNS}
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise MedCalcFormatError(f"{shown}: line {start}: malformed CSV ({e})") from None
        if not values:
            continue
        if len(values) != len(header):
            raise MedCalcFormatError(
                f"{shown}: line {start}: expected {len(header)} fields, found {len(values)}")
        row = {c: values[i] for c, i in index.items()}
        _check_row(row, lambda field, _s=start: _where(shown, _s, field))
        rows.append(row)
    if not rows:
        raise MedCalcFormatError(f"{shown}: no rows after the header line")
    return rows


# --------------------------------------------------------------------------- prompts and targets


def build_messages(row: dict) -> list[dict]:
    """System and user messages of Table 4 (apply a chat template, then append ASSISTANT_PREFIX)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(note=row["Patient Note"], question=row["Question"])},
    ]


def build_prompt(row: dict, tokenizer) -> str:
    """The full generation prompt: the tokenizer's chat template on Table 4 plus the assistant prefix."""
    text = tokenizer.apply_chat_template(build_messages(row), tokenize=False, add_generation_prompt=True)
    return text + ASSISTANT_PREFIX


def sft_target(row: dict) -> str:
    """The SFT completion that follows ASSISTANT_PREFIX: rationale, closing </think>, JSON answer."""
    answer = json.dumps({"answer": row["Ground Truth Answer"]}, ensure_ascii=False)
    return f"\n{row['Ground Truth Explanation'].strip()}\n</think>\n<answer>\n{answer}\n</answer>"


def label_target(row: dict) -> str:
    """The label-only completion after ASSISTANT_PREFIX: no rationale, closing </think>, JSON answer."""
    answer = json.dumps({"answer": row["Ground Truth Answer"]}, ensure_ascii=False)
    return f"\n</think>\n<answer>\n{answer}\n</answer>"


def write_sft_jsonl(rows: Iterable[dict], path: str | os.PathLike, *, form: str = "messages",
                    tokenizer=None, include_meta: bool = False) -> int:
    """Write SFT examples as JSON lines; return the number written.

    form="messages": ``{"messages": [system, user, assistant]}`` with the assistant turn
    ASSISTANT_PREFIX + target. form="prompt_completion": conversational
    ``{"prompt": [system, user], "completion": [assistant]}``, or, when `tokenizer` is given, plain
    strings ``{"prompt": chat_template + ASSISTANT_PREFIX, "completion": target}`` so the prefix is
    part of the prompt as in Table 4. form="template": ``{"note", "question", "completion"}``, the
    fields of ``talr train --template medcalc`` (the template adds Table 4's prompt and prefix).
    include_meta adds Row Number, Calculator ID and Note ID.
    The file is written to a temporary name and renamed, so a failure leaves nothing behind.
    """
    if form not in ("messages", "prompt_completion", "template"):
        raise ValueError(f"form must be 'messages', 'prompt_completion' or 'template', got {form!r}")
    lines = []
    for k, row in enumerate(rows):
        missing = [c for c in ("Patient Note", "Question", "Ground Truth Answer", "Ground Truth Explanation")
                   if c not in row]
        if missing:
            raise MedCalcFormatError(f"row {k} (Row Number {row.get('Row Number', '?')}): missing field(s) {missing}")
        msgs = build_messages(row)
        target = sft_target(row)
        if form == "template":
            rec = {"note": row["Patient Note"], "question": row["Question"], "completion": target}
        elif form == "messages":
            rec = {"messages": msgs + [{"role": "assistant", "content": ASSISTANT_PREFIX + target}]}
        elif tokenizer is None:
            rec = {"prompt": msgs, "completion": [{"role": "assistant", "content": ASSISTANT_PREFIX + target}]}
        else:
            rec = {"prompt": build_prompt(row, tokenizer), "completion": target}
        if include_meta:
            rec.update({"row_number": row.get("Row Number"), "calculator_id": row.get("Calculator ID"),
                        "note_id": row.get("Note ID")})
        lines.append(json.dumps(rec, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def write_medcalc_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Write rows in the official column order (atomic; validates every row first)."""
    path = os.fspath(path)
    for k, row in enumerate(rows):
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise MedCalcFormatError(f"row {k}: missing field(s) {missing}")
        _check_row({c: str(row[c]) for c in COLUMNS}, lambda field, _k=k: f"row {_k}, field '{field}'")
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for row in rows:
        w.writerow([row[c] for c in COLUMNS])
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- split


def split_by_note(rows: Sequence[dict], heldout_fraction: float = 0.2, seed: int = 0,
                  merge_identical_notes: bool = True) -> tuple[list[dict], list[dict]]:
    """Deterministic train / held-out split with no patient note on both sides.

    Rows are grouped by ``Note ID``; with merge_identical_notes, rows whose ``Patient Note`` text
    is identical are joined into one group too (in v1.0 the templated QTc notes repeat one text
    under different Note IDs). Groups, sorted by their smallest Note ID, are permuted by
    ``numpy.random.default_rng(seed)``; the first ceil(fraction * groups) are held out.
    Both parts keep the input order.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must lie in [0, 1], got {heldout_fraction}")
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for row in rows:
        a = find(("id", row["Note ID"]))
        if merge_identical_notes:
            b = find(("text", row["Patient Note"]))
            if a != b:
                parent[b] = a
    members: dict = defaultdict(list)
    for row in rows:
        members[find(("id", row["Note ID"]))].append(row["Note ID"])
    groups = sorted(members, key=lambda g: min(members[g]))
    order = np.random.default_rng(seed).permutation(len(groups))
    n_held = math.ceil(heldout_fraction * len(groups))
    held = {groups[i] for i in order[:n_held]}
    train, heldout = [], []
    for row in rows:
        (heldout if find(("id", row["Note ID"])) in held else train).append(row)
    return train, heldout


# --------------------------------------------------------------------------- parsing


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
_JSON_ANSWER = re.compile(r"""[Aa]nswer['"]\s*:\s*([^}]*)\}""")  # = the official (.*?)\} with re.S
MAX_ANSWER_CHARS = 1000  # longer raw answers are judged incorrect (answers are numbers or dates)
MAX_DIGITS = 40  # longest digit run accepted in a raw answer
MAX_EXPR_NODES = 200  # AST nodes of a "str(<arithmetic>)" answer
_LONG_DIGITS = re.compile(r"\d{%d}" % (MAX_DIGITS + 1))


def _json_answers(text: str) -> list[str]:
    end = text.rfind("}")
    return _JSON_ANSWER.findall(text[: end + 1]) if end >= 0 else []
_NUMBER = re.compile(r"(-?\d+(\.\d+)?)")


def extract_answer_text(text: str) -> str | None:
    """The raw answer string of a model output, or None when none is found.

    Order: the JSON ``"answer": ...}`` inside the last ``<answer>`` block; that block's content;
    the last ``"answer": ...}`` anywhere (the official regex, also with single quotes);
    the whole text when it is a single line. Placeholders of the prompt count as not found.
    """
    text = text if isinstance(text, str) else str(text)
    found = None
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        block = blocks[-1]
        inner = _json_answers(block)
        found = inner[-1] if inner else block
    else:
        anywhere = _json_answers(text)
        if anywhere:
            found = anywhere[-1]
        elif "\n" not in text.strip():
            found = text
    if found is None:
        return None
    found = found.strip()
    if len(found) >= 2 and found[0] == found[-1] == '"':
        try:  # a JSON string: undo escapes such as \u00b2
            found = json.loads(found)
        except json.JSONDecodeError:
            pass
    found = found.strip().strip('"').strip("'").strip()
    if not found or found in _PLACEHOLDERS:
        return None
    if len(found) > MAX_ANSWER_CHARS or _LONG_DIGITS.search(found):
        return None  # bounded work: no real answer is this long
    return found


def _to_float(s: str) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _parse_date(s: str) -> date | None:
    m = re.search(r"^\s*(0?[1-9]|1[0-2])/(0?[1-9]|[12][0-9]|3[01])/(\d{4})", s)
    if not m:
        return None
    try:
        return date(int(m.group(3)), int(m.group(1)), int(m.group(2)))
    except ValueError:  # e.g. 02/30/2020
        return None


_WEEKS_DAYS = (
    re.compile(r"(\d+)\s*(?:weeks?|wks?)\b\D{0,12}?(\d+)\s*(?:days?)\b", re.I),
    re.compile(r"\(?\s*(\d+)\s*(?:weeks?)?\s*(?:,|\band\b)\s*(\d+)\s*(?:days?)?\s*\)?", re.I),
)


def _parse_weeks_days(s: str) -> tuple[int, int] | None:
    s = s.replace("[", "(").replace("]", ")").replace("'", "").replace('"', "")
    for pat in _WEEKS_DAYS:
        m = pat.search(s)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def _parse_integer(s: str) -> float | None:
    """Official integer extraction; returns the number before rounding."""
    m = re.search(r"(\d+) out of", s)
    if m:
        return float(m.group(1))
    m = re.search(r"-?\d+(, ?-?\d+)+", s)
    if m:  # official: a list "3, 4, 5" counts its items
        return float(len(m.group(0).split(",")))
    nums = _NUMBER.findall(s)
    return float(nums[-1][0]) if nums else None


def _parse_decimal(s: str) -> float | None:
    """Official decimal extraction, with a safe arithmetic evaluator instead of eval."""
    m = re.search(r"str\((.*)\)", s)
    if m:
        return safe_arith(m.group(1))
    m = re.search(r"(-?\d+(\.\d+)?)\s*mL/min/1.73", s)
    if m:
        return float(m.group(1))
    pct = re.findall(r"(-?\d+(\.\d+)?)\%", s)
    if pct:
        return float(pct[-1][0]) / 100
    nums = _NUMBER.findall(s)
    return float(nums[-1][0]) if nums else None


def _float_pow(a, b):
    return float(a) ** float(b)  # OverflowError at once, never a huge integer


def _round(x, ndigits=None):
    if ndigits is None:
        return round(float(x))
    if not isinstance(ndigits, int) or abs(ndigits) > 20:
        raise ValueError("round: ndigits must be an integer in [-20, 20]")
    return round(float(x), ndigits)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: _float_pow, ast.Mod: operator.mod}
_FUNCS = {"round": _round, "abs": abs, "min": min, "max": max, "pow": _float_pow, "sqrt": math.sqrt,
          "log": math.log, "log10": math.log10, "exp": math.exp, "int": int, "float": float}
_SMALL_INT = 2**53


def safe_arith(expr: str) -> float | None:
    """Evaluate numbers, + - * / ** %, unary minus and a few math calls; anything else -> None.

    Bounded: at most `MAX_EXPR_NODES` nodes; integer literals above 2**53 become floats, so the
    only integers are products/sums of at most that many small ones; ``**``/``pow`` in floats.
    """
    expr = expr.replace("^", "**").split("#")[0].replace("math.", "")
    expr += ")" * max(0, expr.count("(") - expr.count(")"))
    if len(expr) > MAX_ANSWER_CHARS:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if sum(1 for _ in ast.walk(tree)) > MAX_EXPR_NODES:
        return None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            v = node.value
            return float(v) if isinstance(v, int) and abs(v) > _SMALL_INT else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
                and not node.keywords and len(node.args) <= 8):
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"not allowed: {ast.dump(node)[:40]}")

    try:
        v = float(ev(tree))
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- judging


def rule_for(row: dict) -> str:
    """Which official rule judges this row: 'date', 'weeks_days', 'integer' or 'decimal'."""
    cid = int(row["Calculator ID"])
    if cid in DATE_CALCULATORS or row["Output Type"] == "date":
        return "date"
    if cid == WEEKS_DAYS_CALCULATOR:
        return "weeks_days"
    return row["Output Type"]


def parse_answer(answer_text: str, row: dict):
    """The answer as the rule for `row` reads it (date, (weeks, days), int or float), or None."""
    raw = extract_answer_text(answer_text)
    if raw is None:
        return None
    kind = rule_for(row)
    if kind == "date":
        return _parse_date(raw)
    if kind == "weeks_days":
        return _parse_weeks_days(raw)
    if kind == "integer":
        v = _parse_integer(raw)
        return None if v is None else round(v)
    return _parse_decimal(raw)


def is_correct(answer_text: str, row: dict) -> bool:
    """Official MedCalc-Bench judgement of one model output (or bare answer) against `row`."""
    got = parse_answer(answer_text, row)
    if got is None:
        return False
    kind = rule_for(row)
    truth = row["Ground Truth Answer"]
    if kind == "date":
        return got == _parse_date(truth)
    if kind == "weeks_days":
        return got == _parse_weeks_days(truth)
    if kind == "integer":
        t = _to_float(truth)
        return t is not None and got == t
    lo, hi = _to_float(row["Lower Limit"]), _to_float(row["Upper Limit"])
    return lo is not None and hi is not None and lo <= got <= hi


def accuracy(predictions: Sequence[str], rows: Sequence[dict]) -> dict:
    """Overall and per-Category accuracy of model outputs against rows (same order).

    Returns ``{"accuracy": float, "n": int, "n_correct": int, "n_unparsed": int,
    "per_category": {Category: {"accuracy", "n", "n_correct"}}}``.
    """
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    if not rows:
        raise ValueError("no rows to score")
    per: dict = defaultdict(lambda: [0, 0])
    n_correct = n_unparsed = 0
    for pred, row in zip(predictions, rows):
        if parse_answer(pred, row) is None:
            n_unparsed += 1
        ok = is_correct(pred, row)
        n_correct += ok
        per[row["Category"]][0] += ok
        per[row["Category"]][1] += 1
    return {
        "accuracy": n_correct / len(rows),
        "n": len(rows),
        "n_correct": n_correct,
        "n_unparsed": n_unparsed,
        "per_category": {c: {"accuracy": k / n, "n": n, "n_correct": k} for c, (k, n) in sorted(per.items())},
    }

"""docs/PAPER.md: every numbered statement of the paper is indexed, and every function and test it
names exists (the index cannot rot silently)."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT = (REPO / "docs" / "PAPER.md").read_text()
STATEMENTS = ["Definition 3.1", "Definition 3.2", "Definition B.3", "Proposition 3.1", "Proposition B.1",
              "Proposition B.2", "Lemma E.1", "Lemma E.2", "Lemma E.3", "Theorem 3.1", "Theorem 3.2",
              "Theorem B.1 (= E.1)", "Theorem E.2", "Theorem E.3", "Theorem B.2 (= E.4)", "Theorem B.3 (= E.5)",
              "Algorithm 1"] + [f"Assumption B.{i}" for i in range(1, 6)]
THEORY = {"tree", "coding", "divergence", "tilting", "bounds", "estimate", "simulate", "symbolic", "claims"}


def _rows() -> list[str]:
    return [line for line in TEXT.splitlines() if line.startswith("| ") and not line.startswith("| statement")]


@pytest.mark.parametrize("statement", STATEMENTS)
def test_every_statement_has_a_row(statement):
    assert any(row.startswith(f"| {statement}") for row in _rows()), statement


# The results the paper states twice: (first label, second label). Section 3 -> Appendix B, Appendix B ->
# the proofs of Appendix E (Theorem E.1 restates B.1, E.4 restates B.2, E.5 restates B.3).
RESTATED = [("Definition 3.1", "Definition B.1"), ("Definition 3.2", "Definition B.2"),
            ("Proposition 3.1", "Proposition B.3"), ("Theorem B.1", "Theorem E.1"), ("Theorem B.2", "Theorem E.4"),
            ("Theorem B.3", "Theorem E.5")]


def _row(label: str) -> str | None:
    """The row whose statement cell is ``label`` or starts with ``label (``."""
    return next((r for r in _rows() if re.match(rf"\| {re.escape(label)}( \(|\s*\|)", r)), None)


@pytest.mark.parametrize("first, second", RESTATED)
def test_restated_results_are_found_by_both_labels(first, second):
    """The row of the first label carries the second number, and the second label (the paper's literal
    spelling, e.g. "Theorem E.4") has its own row pointing to it."""
    both = f"{first} (= {second.split()[1]})"
    assert _row(both) is not None, both
    alias = _row(second)
    assert alias is not None, second
    assert both in alias.split("|")[3], alias  # its function cell sends the reader to the full row


def test_every_double_label_in_the_index_is_a_known_restatement():
    """Any row labelled "X (= Y)" names a pair of RESTATED, so a new double label needs its own alias row."""
    pairs = {(f, s.split()[1]) for f, s in RESTATED}
    found = set()
    for row in _rows():
        m = re.match(r"\| ((?:Definition|Proposition|Lemma|Theorem|Assumption) [\dA-Z.]+) \(= ([A-Z]?\.?[\dA-Z.]+)\)", row)
        if m:
            found.add((m.group(1), m.group(2)))
    assert found == pairs


def _defines(path: Path, name: str) -> bool:
    return re.search(rf"^\s*(def|class) {re.escape(name)}\b", path.read_text(), re.M) is not None


def test_every_named_function_and_test_exists():
    checked = 0
    for row in _rows():
        cells = row.split("|")
        for cell in cells[3:5]:  # function, test
            last = None
            for tok in re.findall(r"`([^`]+)`", cell):
                if "::" in tok:
                    path, name = tok.split("::")
                    path = path or last
                    last = path
                    root = REPO / "tests" if "test_" in path else REPO
                    assert _defines(root / path, name), tok
                    checked += 1
                elif re.fullmatch(r"[a-z_]+\.[A-Za-z_][\w.]*", tok) and tok.split(".")[0] in THEORY:
                    mod, *attrs = tok.split(".")
                    obj = importlib.import_module(f"theory.{mod}")
                    for a in attrs:
                        obj = getattr(obj, a)
                    checked += 1
    assert checked >= 60


def test_theory_labels_both_numbers_where_the_paper_restates():
    """One spelling each: no "Prop 3.1" and no "Theorem E.4 / B.2"-style labels left in theory/."""
    text = "\n".join(p.read_text() for p in (REPO / "theory").glob("*.py"))
    assert not re.search(r"Prop 3\.1|Theorem E\.[145] ?/ ?B\.|Theorem B\.[123] ?/ ?E\.", text)
    for restated in ("Theorem B.1 (= E.1)", "Theorem B.2 (= E.4)", "Theorem B.3 (= E.5)"):
        assert restated in text, restated

"""The grid's domain axis: one :class:`Domain` record per fine-tuning domain.

    from sft.domains import DOMAINS, get_domain

A record says where the domain's rows come from (a local path; nothing is downloaded), how they
are split into train and held-out parts with no group on both sides, the prompt and target of each
supervision variant (``cot``: rationale then answer; ``label``: the answer alone), the stop string
of generation, and the judge with its metric's name. `experiments.studies.grid` (``talr study
grid --domain NAME``) reads nothing domain-specific but this record.

* ``medcalc``: MedCalc-Bench v1.0 (official CSV, `sft.eval.medcalc`; Table 4 prompt); the synthetic
  generator (`sft.eval.synth_medcalc`) when no file is given and the default one is absent; split by
  note (`sft.eval.medcalc.split_by_note`); accuracy by the official rules.
* ``esci``: Shopping Queries (official parquet pair or a JSONL export, `sft.eval.esci`; Table 5
  prompt); split by query; balanced accuracy (BACC). Label-only: ESCI ships no rationales (the paper
  sampled its CoT targets from Qwen2.5-72B), so ``cot`` is offered only for rows with a ``rationale``.

The tiny world (`sft.worlds`) is not a record: its "rows" are exact token trees, not texts judged
by generation, and its studies (`talr demo`, `talr study forecast`) compute exact code lengths.

Torch-free: the loaders import the standard library, numpy and (for parquet) pyarrow.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

VARIANTS = ("cot", "label")


class DomainDataError(FileNotFoundError):
    """A data path that does not exist or holds no usable rows (the message names the path)."""


@dataclass(frozen=True)
class Domain:
    """One domain of the grid (see the module docstring)."""

    name: str
    title: str  # the data set as reports name it
    env: str  # environment variable naming the default path
    default_file: str  # below the shared data folder
    stop: str  # generation stops here (kept in the output)
    metric: str  # the judge's headline metric, as reports name it ("accuracy", "BACC": balanced accuracy)
    metric_key: str  # its key in the judge's result
    category_field: str  # what reports count the kept rows' categories as ("calculators", "queries")
    group: str  # what the split keeps on one side ("note", "query")
    variants: tuple  # supervision variants the domain offers
    load_rows: Callable  # (path or None, seed, n_synthetic) -> (rows, source text); see :meth:`load`
    split_rows: Callable  # (rows, heldout_fraction, seed) -> (train, held)
    row_fields: Callable  # (row, variant) -> fields of `sft.data.parse_row` with the template
    template: Callable  # variant -> `sft.data.TEMPLATES` name
    judge_rows: Callable  # (predictions, rows) -> the judge's result dict
    category: Callable  # row -> its category (calculator, locale)

    def default_path(self, shared: str | os.PathLike | None = None) -> Path | None:
        """``$env`` or ``shared/default_file`` (None when neither is set)."""
        if os.environ.get(self.env):
            return Path(os.environ[self.env])
        return Path(shared) / self.default_file if shared is not None else None

    def load(self, path: str | os.PathLike | None, *, shared=None, seed: int = 0, n_synthetic: int = 240,
             show: Callable = str) -> tuple[list[dict], str]:
        """(rows, source). ``path`` is what the user gave: it must exist. When None, the default
        path is read if it exists, else the domain's fallback (MedCalc: synthetic rows; ESCI: an
        error naming the option). ``show``: a path as the source text names it."""
        if path is not None and not Path(path).exists():
            raise DomainDataError(f"{self.name} data: {path} not found")
        given = path is not None
        path = Path(path) if given else self.default_path(shared)
        rows, source = self.load_rows(path if path is not None and path.exists() else None, seed, n_synthetic,
                                      missing=None if given else path, show=show)
        if not rows:
            raise DomainDataError(f"{source}: no rows")
        return rows, source

    def split(self, rows: Sequence[dict], heldout_fraction: float, seed: int = 0) -> tuple[list, list]:
        """Deterministic (train, held-out) split; no group (note, query) on both sides."""
        return self.split_rows(rows, heldout_fraction, seed)

    def row(self, row: dict, variant: str):
        """An `sft.data.Row` of the domain's prompt template with the variant's target."""
        from .data import parse_row

        if variant not in self.variants:
            raise ValueError(f"domain {self.name}: variant {variant!r} not offered (offers {list(self.variants)})")
        return parse_row(self.row_fields(row, variant), template=self.template(variant))

    def judge(self, predictions: Sequence[str], rows: Sequence[dict]) -> dict:
        """``{"score", "n_correct", "n_unparsed", "n"}``: ``score`` is the :attr:`metric`."""
        res = self.judge_rows(predictions, rows)
        return {"score": res[self.metric_key], "n_correct": res["n_correct"], "n_unparsed": res["n_unparsed"],
                "n": res["n"]}


# ------------------------------------------------------------------------------------------- medcalc
def _medcalc_rows(path, seed, n_synthetic, missing=None, show=str):
    from .eval.medcalc import load_medcalc
    from .eval.synth_medcalc import generate

    if path is not None:
        return load_medcalc(path), f"MedCalc-Bench v1.0 ({show(path)})"
    return generate(n_synthetic, seed=seed), f"synthetic MedCalc rows ({missing} not found)"


def _medcalc_split(rows, heldout_fraction, seed):
    from .eval.medcalc import split_by_note

    # Template notes number their notes 1..20 per calculator: a note is (Calculator ID, Note ID) there
    # (identical texts across calculators stay together: split_by_note merges identical notes)
    keyed = [{**r, "Note ID": f"{r['Calculator ID']}:{r['Note ID']}"} if r.get("Note Type") == "Template" else r
             for r in rows]
    return split_by_note(keyed, heldout_fraction, seed=seed)


def _medcalc_fields(row, variant):
    from .eval.medcalc import label_target, sft_target

    target = sft_target(row) if variant == "cot" else label_target(row)
    return {"note": row["Patient Note"], "question": row["Question"], "completion": target}


def _medcalc_judge(predictions, rows):
    from .eval.medcalc import accuracy

    return accuracy(predictions, rows)


# ------------------------------------------------------------------------------------------- esci
ESCI_EXAMPLES = "shopping_queries_dataset_examples.parquet"
ESCI_PRODUCTS = "shopping_queries_dataset_products.parquet"
ESCI_LOCALE = "us"  # the study's rows: the small version's US queries (the paper's Table 5 setting)
ESCI_MAX_ROWS = 20000  # the first rows after filtering (the official file holds ~1.8M examples)


def esci_files(path: Path) -> tuple[Path, Path | None]:
    """(examples, products) of an ESCI path: a folder holding the official pair, the examples
    parquet (its products parquet beside it) or a JSONL export (products None)."""
    if path.is_dir():
        path = path / ESCI_EXAMPLES
    if path.suffix in (".jsonl", ".json"):
        return path, None
    products = path.with_name(ESCI_PRODUCTS)
    for p in (path, products):
        if not p.exists():
            raise DomainDataError(f"ESCI data: {p} not found (the official pair {ESCI_EXAMPLES} and "
                                  f"{ESCI_PRODUCTS} in one folder, or a .jsonl export)")
    return path, products


def _esci_rows(path, seed, n_synthetic, missing=None, show=str):
    from .eval.esci import load_esci

    if path is None:
        raise DomainDataError(f"ESCI data: {missing or 'no default path'} not found (pass --data: the official "
                              f"parquet pair's folder, the examples parquet or a JSONL export, or set TALR_ESCI)")
    examples, products = esci_files(Path(path))
    rows = load_esci(examples, products, small_version=True, locale=ESCI_LOCALE, limit=ESCI_MAX_ROWS)
    return rows, f"ESCI Shopping Queries ({show(examples)}, small version, locale {ESCI_LOCALE})"


def _esci_split(rows, heldout_fraction, seed):
    """By query: every product judged for one query lands on one side (the query's text too:
    two query ids of one text stay together)."""
    from .eval.medcalc import split_by_note

    proxies = [{"Note ID": str(r["query_id"]), "Patient Note": r["query"], "i": i} for i, r in enumerate(rows)]
    train, held = split_by_note(proxies, heldout_fraction, seed=seed)
    return [rows[p["i"]] for p in train], [rows[p["i"]] for p in held]


def _esci_fields(row, variant):
    from .eval.esci import product_info, sft_target

    return {"query": row["query"], "product_info": product_info(row),
            "completion": sft_target(row, cot=variant == "cot")}


def _esci_judge(predictions, rows):
    from .eval.esci import evaluate

    res = evaluate(predictions, rows)
    return {**res, "n_correct": round(res["accuracy"] * res["n"])}


# ------------------------------------------------------------------------------------------- records
DOMAINS: dict[str, Domain] = {
    "medcalc": Domain(
        name="medcalc", title="MedCalc-Bench v1.0", env="TALR_MEDCALC",
        default_file="medcalc-bench-v1.0/test_data.csv", stop="</answer>", metric="accuracy",
        metric_key="accuracy", category_field="calculators", group="note", variants=VARIANTS, load_rows=_medcalc_rows,
        split_rows=_medcalc_split, row_fields=_medcalc_fields, template=lambda v: "medcalc",
        judge_rows=_medcalc_judge, category=lambda r: r["Calculator Name"]),
    "esci": Domain(
        name="esci", title="ESCI Shopping Queries", env="TALR_ESCI", default_file=f"esci/{ESCI_EXAMPLES}",
        stop="</answer>", metric="BACC", metric_key="balanced_accuracy",
        category_field="queries", group="query", variants=("label",), load_rows=_esci_rows, split_rows=_esci_split,
        row_fields=_esci_fields, template=lambda v: "esci_cot" if v == "cot" else "esci",
        judge_rows=_esci_judge, category=lambda r: r["query"]),
}


def get_domain(name: str) -> Domain:
    """The record of ``name``; a ValueError lists the known names."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown domain {name!r}: expected one of {sorted(DOMAINS)}") from None

"""experiments.outputs: table cells, strict JSON, atomic PNGs."""
import json

import numpy as np

from experiments.outputs import fmt, markdown_table, pyplot, save_figure, write_json


def test_cells_and_table():
    assert [fmt(x) for x in (None, True, 0.5, 1.23456e-5, 12345.6, 3, float("inf"))] == \
        ["n/a", "yes", "0.500", "1.23e-05", "1.23e+04", "3", "inf"]
    assert markdown_table(["a", "b"], [[1, 0.25]]) == "| a | b |\n|---|---|\n| 1 | 0.250 |"


def test_json_is_strict_and_figures_are_atomic(tmp_path):
    write_json(tmp_path / "r.json", {"x": np.float64(1.5), "bad": float("nan"), "v": np.arange(2)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1.5, "bad": None, "v": [0, 1]}
    fig, ax = pyplot().subplots()
    ax.plot([0, 1], [0, 1])
    assert save_figure(fig, tmp_path / "sub" / "f.png") == "f.png"
    assert (tmp_path / "sub" / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["f.png"]  # no temporary left

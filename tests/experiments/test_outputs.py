"""experiments.outputs: table cells, strict JSON, atomic PNGs, verdicts over seeds, scatter labels."""
import json

import numpy as np
import pytest
from matplotlib.text import Text

from experiments.outputs import annotate_points, fmt, markdown_table, pyplot, save_figure, seed_verdict, write_json


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


@pytest.mark.parametrize("lower, upper, want", [
    ([1.0, 2.0], [3.0, 2.5], "holds"),            # every lower below every upper
    ([3.0, 4.0], [1.0, 2.9], "does not hold"),    # every lower above every upper
    ([1.0, 3.0], [2.0, 4.0], "undecided"),        # ranges overlap: the gap is inside the seeds' spread
    ([1.0, 2.0], [2.0, 3.0], "undecided"),        # touching ranges are not apart
    ([1.0, 0.5], [3.0, 0.7], "undecided"),        # the seeds disagree (seed 2: 0.5 < 0.7 but seed 1 ...)
    ([1.0], [3.0], "undecided"),                  # one seed: no spread to compare the gap with
    ([1.0, None], [3.0, 4.0], "undecided"),       # a missing value
    ([1.0, float("nan")], [3.0, 4.0], "undecided"),
])
def test_seed_verdict_by_hand(lower, upper, want):
    assert seed_verdict(lower, upper) == want


def test_seed_verdict_words():
    assert seed_verdict([1, 2], [3, 4], yes="lower", no="higher") == "lower"
    assert seed_verdict([3, 4], [1, 2], yes="lower", no="higher") == "higher"


def test_labels_of_a_cluster_do_not_overlap():
    """Four methods within half a bit of each other (as ce / kl / l2 / flow near gain 28 in the demo)
    plus outliers: no two label boxes meet, no label covers another point, every label stays inside."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    pts = [(28.5, -3.4), (28.6, -3.5), (28.55, -3.3), (28.4, -3.45), (28.7, -3.38), (31.0, -18.4), (5.0, -0.2),
           (28.5, -3.6)]
    names = ["ce@0.0003", "kl@0.0003", "l2@0.0003", "flow@0.0003", "wise0.5@0.0003", "ce@0.003", "lora@0.0003",
             "dft@0.0003"]
    for x, y in pts:
        ax.scatter(x, y, s=40)
    ax.margins(0.12)
    anns = annotate_points(ax, pts, names, fontsize=7)
    renderer = fig.canvas.get_renderer()
    boxes = []
    for a in anns:  # the text alone, without its leader line
        a.update_positions(renderer)
        boxes.append(Text.get_window_extent(a, renderer))
    px = ax.transData.transform(pts)
    frame = ax.get_window_extent(renderer)
    assert [a.get_text() for a in anns] == names
    for i, b in enumerate(boxes):
        assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
        assert not any(b.overlaps(c) for j, c in enumerate(boxes) if j != i), names[i]
        assert not any(b.padded(8).contains(*p) for j, p in enumerate(px) if j != i), names[i]  # 8 px from markers
    # and placing them all at one fixed offset, as before, does overlap: the test can fail
    fig2, ax2 = plt.subplots(figsize=(6.4, 4.6))
    for x, y in pts:
        ax2.scatter(x, y, s=40)
    fixed = [ax2.annotate(n, p, textcoords="offset points", xytext=(3, 3), fontsize=7) for n, p in zip(names, pts)]
    r2 = fig2.canvas.get_renderer()
    fb = [a.get_window_extent(r2) for a in fixed]
    assert any(fb[i].overlaps(fb[j]) for i in range(len(fb)) for j in range(i))
    plt.close(fig)
    plt.close(fig2)

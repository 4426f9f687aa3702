"""Issue 13, bugs 5-7 and 9 on the theory side: bad numbers fail with their allowed range, never
with a traceback or with exit 0 and NaN; unbounded work is refused before it starts."""
import json
import math

import numpy as np
import pytest

from experiments.cli import main
from theory import bounds as B
from theory import simulate as S
from theory.claims import run_ledger


def test_check_range_names_option_value_and_interval():
    from theory.checks import check_range

    assert check_range("x", 0.5, 0, 1) == 0.5
    with pytest.raises(ValueError, match=r"^lam: 1000.0 is outside \[0, 1\]$"):
        check_range("lam", 1000.0, 0, 1)
    with pytest.raises(ValueError, match=r"lr: nan is not a finite number in \(0, inf\)"):
        check_range("lr", math.nan, 0, lo_open=True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        check_range("clip", 1.0, 0, 1, hi_open=True)
    with pytest.raises(ValueError, match="integer"):
        check_range("n", 1.5, 1, integer=True)
    assert check_range("tau", None, 0, allow_none=True) is None


def test_lambda_max_at_zero_tolerance_is_zero(capsys):
    """`--eps-fg 0` raised ZeroDivisionError (relative error of lambda_max = 0)."""
    assert main(["bounds", "lambda-max", "--T", "10", "--eps-fg", "0", "--H-T", "1", "--V-s", "1", "--C1", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lambda_max"] == 0.0 and "relative_error" not in out


def test_degradation_overflow_is_an_error_not_nan(capsys):
    """Every constant 1e300 printed NaN with exit 0."""
    big = ["1e300"] * 6
    args = ["bounds", "degradation"]
    for flag, v in zip(["--T", "--delta-star", "--mu-T", "--C1", "--C2", "--A"], big):
        args += [flag, v]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "not finite" in captured.err and "nan" not in captured.out.lower()


def test_printed_bounds_carry_units(capsys):
    assert main(["bounds", "degradation", "--T", "100", "--delta-star", "0.5", "--mu-T", "0.4", "--C1", "1",
                 "--C2", "2", "--A", "0.3"]) == 0
    lines = {ln.split(":")[0].strip(): ln for ln in capsys.readouterr().out.splitlines()}
    assert lines["bound"].endswith("nats") and lines["limit_T_inf"].endswith("nats")


@pytest.mark.parametrize("argv,expect", [
    (["claims", "--n", "0"], "argument --n: 0 is outside [1, inf)"),
    (["simulate", "--lam", "1e3", "--out", "X"], "argument --lam: 1000.0 is outside [0, 1]"),
    (["simulate", "--lam", "nan", "--out", "X"], "argument --lam: nan is not a finite number in [0, 1]"),
    (["simulate", "--world", "softmax", "--lr", "-1", "--out", "X"], "argument --lr: -1.0 is outside (0, inf)"),
    (["bounds", "lambda-max", "--T", "1", "--eps-fg", "-1", "--H-T", "1", "--V-s", "1", "--C1", "1"],
     "argument --eps-fg: -1.0 is outside [0, inf)"),
], ids=["claims-n0", "lam1e3", "lam-nan", "softmax-lr", "eps-neg"])
def test_out_of_range_options_are_refused_at_parse_time(argv, expect, capsys, tmp_path):
    argv = [a if a != "X" else str(tmp_path / "out") for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert expect in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_library_entries_validate_too():
    with pytest.raises(ValueError, match=r"n: 0 is outside \[1, inf\)"):
        run_ledger(n=0)
    with pytest.raises(ValueError, match=r"lr: nan"):
        S.SoftmaxConfig(lr=math.nan)
    with pytest.raises(ValueError, match=r"w_min: 2"):
        S.SoftmaxConfig(w_min=2)


def test_simulate_out_pointing_at_a_file(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep")
    assert main(["simulate", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "keep"


def test_complete_tree_nodes_matches_the_built_tree():
    from theory.tree import TokenTree

    for V, d in [(1, 3), (2, 3), (3, 2), (4, 4)]:
        brute = TokenTree.from_sequences([[0] * 0] + [list(p) for k in range(1, d + 1)
                                                      for p in np.ndindex(*([V] * k))], vocab_size=V)
        assert S.complete_tree_nodes(V, d) == brute.n_nodes


def test_huge_world_is_refused_before_it_is_built(tmp_path, capsys):
    """`--depth 12 --vocab 4` used to grow past 10 GB with no output; now refused at once (a build
    would not return: this test would hang, not pass)."""
    assert S.complete_tree_nodes(4, 12) > S.MAX_NODES
    with pytest.raises(ValueError, match="22,369,621 nodes"):
        S.make_world(V=4, depth=12)
    assert main(["simulate", "--world", "tabular", "--depth", "12", "--vocab", "4", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "22,369,621" in err
    assert not (tmp_path / "s").exists()


def test_simulate_json_summary(tmp_path, capsys):
    assert main(["simulate", "--steps", "3", "--out", str(tmp_path / "s"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 4 and out["n_nodes"] == 15 and math.isfinite(out["final_dL_P1_nats"])


def test_degradation_bound_is_nan_only_where_infeasible():
    """T = 10 is infeasible (needs T > 25), T = 100 is not: one call, NaN at the first only."""
    args = dict(delta_star=0.5, mu_T=0.4, C1=1.0, C2=2.0, A=0.3)
    out = B.degradation_bound(T=np.array([10.0, 100.0]), **args)
    assert np.isnan(out[0])
    assert out[1] == pytest.approx(float(B.degradation_bound(T=100.0, **args)), rel=1e-12)
    with pytest.raises(ValueError, match="T > 4"):  # scalars still explain why
        B.degradation_bound(T=10.0, **args)


@pytest.mark.parametrize("argv,expect", [
    (["analyze", "--model", "tiny", "--data", "d", "--out", "o", "--batch-size", "0"],
     "argument --batch-size: 0 is outside [1, inf)"),
    (["train", "--model", "tiny", "--data", "d", "--out", "o", "--max-length", "0"],
     "argument --max-length: 0 is outside [1, inf)"),
    (["simulate", "--steps", "0", "--out", "o"], "argument --steps: 0 is outside [1, inf)"),
], ids=["analyze-batch", "train-max-length", "simulate-steps"])
def test_other_commands_range_check_at_parse_time(argv, expect, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert expect in capsys.readouterr().err


def test_compare_options_are_range_checked(tmp_path, capsys):
    assert main(["compare", str(tmp_path), "--alpha", "2"]) == 2
    assert capsys.readouterr().err == "talr compare: --alpha: 2.0 is outside [0, 1]\n"

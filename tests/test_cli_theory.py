import json

import pytest

from experiments.cli import main


def test_bounds_degradation_json(capsys):
    assert main(["bounds", "degradation", "--T", "100", "--delta-star", "0.5", "--mu-T", "0.4",
                 "--C1", "1", "--C2", "2", "--A", "0.3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["expansion"] == pytest.approx(0.3 * 0.5 / 0.4 + (0.3 * 2 / 0.064 + 1 / 0.16) * 0.25 / 100)
    assert out["bound"] > out["expansion"]


def test_bounds_degradation_infeasible(capsys):
    assert main(["bounds", "degradation", "--T", "10", "--delta-star", "0.5", "--mu-T", "0.4",
                 "--C1", "1", "--C2", "2", "--A", "0.3"]) == 2
    assert "T > 4*C2*Delta_*/mu_T^2 = 25" in capsys.readouterr().err


def test_bounds_bad_number():
    with pytest.raises(SystemExit):
        main(["bounds", "lambda-max", "--T", "abc", "--eps-fg", "0.1", "--H-T", "1", "--V-s", "1", "--C1", "1"])


def test_lambda_max_json(capsys):
    assert main(["bounds", "lambda-max", "--T", "1", "--eps-fg", "2", "--H-T", "1", "--V-s", "1", "--C1", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lambda_max"] == pytest.approx(1.0)


def test_simulate_writes_run(tmp_path, capsys):
    out = tmp_path / "runs" / "tab"
    assert main(["simulate", "--world", "tabular", "--schedule", "cosine", "--lam", "0.2",
                 "--steps", "6", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and rows[-1]["dL_P2_nats"] < 0
    assert json.loads((out / "config.json").read_text())["schedule"] == "cosine"
    assert (out / "delta_L.png").read_bytes()[:4] == b"\x89PNG"
    # refuses to overwrite, leaves no temp folders behind
    assert main(["simulate", "--out", str(out), "--steps", "2"]) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["tab"]


def test_simulate_softmax_and_bad_input(tmp_path, capsys):
    out = tmp_path / "soft"
    assert main(["simulate", "--world", "softmax", "--lr", "0.5", "--steps", "3", "--out", str(out)]) == 0
    assert (out / "metrics.jsonl").exists()
    bad = tmp_path / "bad"
    assert main(["simulate", "--world", "tabular", "--n-hard", "9", "--out", str(bad)]) == 2
    assert not bad.exists() and "n_hard" in capsys.readouterr().err


def test_claims_json(capsys):
    assert main(["claims", "--n", "6", "--only", "Proposition 3.1", "Theorem 3.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in out] == ["Proposition 3.1", "Proposition 3.1 per prefix (new)",
                                      "Proposition 3.1 per prefix, KL bound (new)", "Theorem 3.1",
                                      "Theorem 3.1 corrected"]
    assert out[-1]["corrects"] == "Theorem 3.1" and out[-1]["n_violations"] == 0

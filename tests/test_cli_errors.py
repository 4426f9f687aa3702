"""Issue 21: one error convention for the CLI (rc 2, one line ``talr CMD: message`` on stderr, no
traceback), ``talr --version``, user text in ``talr study --help``, and options checked before any
work: ``--T`` of the bounds, the options a simulated world ignores, a diverged softmax run."""
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _talr(*argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import sys\nfrom experiments.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=600)


def _one_line(err: str, cmd: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"talr {cmd}: "), err
    assert "Traceback" not in err
    return lines[0]


def test_version_is_the_package_version():
    proc = _talr("--version")
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert proc.returncode == 0 and proc.stdout.strip() == f"talr {want}", proc.stderr


def test_study_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["study", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "register" not in out and "``" not in out and "experiments/studies" not in out
    assert "talr study forecast" in out and "talr study smollm2" in out


@pytest.mark.parametrize("argv,cmd,expect", [
    (["bounds", "degradation", "--T", "0.5", "--delta-star", "0.5", "--mu-T", "0.4", "--C1", "1", "--C2", "2",
      "--A", "0.3"], "bounds degradation", "argument --T: 0.5 is outside [1, inf)"),
    (["bounds", "lambda-max", "--T", "0.5", "--eps-fg", "1", "--H-T", "1", "--V-s", "1", "--C1", "1"],
     "bounds lambda-max", "argument --T: 0.5 is outside [1, inf)"),
    (["claims", "--n", "0"], "claims", "argument --n: 0 is outside [1, inf)"),
    (["claims", "--only", "no-such-claim"], "claims", "matches no claim id"),
], ids=["degradation-T", "lambda-max-T", "argparse", "handler"])
def test_every_error_is_one_line_rc2(argv, cmd, expect):
    """argparse's errors (formerly usage + 'error:') and the handlers' take the same form."""
    proc = _talr(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    assert expect in _one_line(proc.stderr, cmd)


def test_per_step_weight_above_one_is_refused(capsys):
    """T = 1 with Lambda_T^min = Delta_*/mu_T = 1.25 (C2 = 0): a tilting weight lam_t is in [0, 1]."""
    assert main(["bounds", "degradation", "--T", "1", "--delta-star", "0.5", "--mu-T", "0.4", "--C1", "1",
                 "--C2", "0", "--A", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "per-step weight 1.25 > 1" in _one_line(err, "bounds degradation")


@pytest.mark.parametrize("argv,flags", [
    (["--world", "tabular", "--lr", "0.1"], "--lr"),
    (["--optimizer", "adam", "--weighting", "talr"], "--optimizer, --weighting"),
    (["--world", "softmax", "--lam", "0.3"], "--lam"),
    (["--world", "softmax", "--warmup", "2", "--lam-min", "0"], "--lam-min, --warmup"),
    (["--world", "softmax", "--q-noise", "0.1", "--rho", "model"], "--q-noise, --rho"),
], ids=["tabular-lr", "tabular-optimizer", "softmax-lam", "softmax-warmup", "softmax-noise"])
def test_options_a_world_ignores_are_refused(argv, flags, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["simulate", *argv, "--steps", "2", "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err, "simulate")
    assert line.startswith(f"talr simulate: {flags}: not used by the") and not out.exists()


def test_world_defaults_still_apply_and_are_recorded(tmp_path):
    assert main(["simulate", "--world", "softmax", "--steps", "2", "--out", str(tmp_path / "s"), "--json"]) == 0
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (cfg["lr"], cfg["optimizer"], cfg["weighting"]) == (0.5, "sgd", "ce") and "lam" not in cfg
    assert main(["simulate", "--steps", "2", "--out", str(tmp_path / "t"), "--json"]) == 0
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert (cfg["lam"], cfg["warmup"], cfg["q_noise"], cfg["rho"]) == (0.1, 0, 0.05, "uniform") and "lr" not in cfg


def test_diverged_softmax_run_is_refused(tmp_path, capsys):
    """`--lr 1e9` exited 0 with dL(P1) = 1.2e8 nats. Full-batch steps on P2 must not end with a
    longer code for P2 than they started from; here dL(P2) is of the same 1e8 size."""
    out = tmp_path / "s"
    assert main(["simulate", "--world", "softmax", "--lr", "1e9", "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err, "simulate")
    assert "diverged" in line and "e+08 nats" in line and "lower --lr" in line
    assert not out.exists()
    assert main(["simulate", "--world", "softmax", "--lr", "50", "--out", str(out), "--json"]) == 0  # large, not diverged

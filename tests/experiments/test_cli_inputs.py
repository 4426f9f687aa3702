"""Issue 21: bad inputs to train / analyze / compare / forecast end in one line with rc 2, before
any work where they can be checked up front; `forecast --general` reads what `compare` reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from sft.io import write_jsonl

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
TINY = "tiny:hidden=32,layers=1,heads=2,intermediate=64"


def _err_line(capsys, cmd: str) -> str:
    cap = capsys.readouterr()
    text = (cap.out + cap.err).strip()  # train still prints its errors on stdout
    assert "Traceback" not in text
    line = text.splitlines()[-1]
    assert line.startswith(f"talr {cmd}: "), text
    return line


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    good = write_jsonl(d / "d.jsonl", [{"prompt": f"add {i} and {i}", "completion": f"= {2 * i}"} for i in range(6)])
    return d, good


def test_compare_on_a_missing_folder_fails_before_the_heavy_imports():
    """`talr compare /nonexistent` spent ~10 s importing torch before saying "no config.json"."""
    code = ("import sys\nfrom experiments.cli import main\nrc = main(sys.argv[1:])\n"
            "print(rc, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, "compare", "/nonexistent/run"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert proc.stderr.strip() == "talr compare: /nonexistent/run: no config.json (not a run folder written by " \
                                  "`talr train`)"


def test_analyze_refuses_an_example_past_the_end(data, capsys):
    """`--example 999` on 6 rows drew row 5 silently."""
    d, good = data
    out = d / "an"
    assert main(["analyze", "--model", TINY, "--data", good, "--out", str(out), "--example", "999",
                 "--no-progress"]) == 2
    assert "--example 999" in _err_line(capsys, "analyze") and not out.exists()


@pytest.mark.parametrize("model,expect", [
    ("world:-1", "expected world:N with N an integer in [0, 4294967295]"),
    ("world:99999999999999999999", "expected world:N with N an integer in [0, 4294967295]"),
    ("world:x", "expected world:N"),
    ("tiny:hidden=0", "'hidden=0': expected an integer >= 1"),
    ("tiny:hidden=33,heads=2", "must split into heads=2 heads of an even size"),
    ("tiny:bogus=3", "unknown key 'bogus'"),
    ("/no/such/model", "no such file or folder"),
], ids=["world-neg", "world-huge", "world-x", "hidden0", "hidden33", "bogus", "missing"])
def test_forecast_model_is_checked_at_parse_time(model, expect, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["forecast", "--model", model, "--out", str(tmp_path / "f")])
    assert exc.value.code == 2 and expect in _err_line(capsys, "forecast") and not (tmp_path / "f").exists()


@pytest.mark.parametrize("methods,expect", [("", "empty"), ("ce,sgd", "unknown ['sgd']"), ("ce,ce", "repeated")],
                         ids=["empty", "unknown", "repeated"])
def test_forecast_methods_are_checked_at_parse_time(methods, expect, capsys, tmp_path):
    """`--methods ''` crashed with KeyError after 220 s of work."""
    with pytest.raises(SystemExit) as exc:
        main(["forecast", "--model", "world:0", "--methods", methods, "--out", str(tmp_path / "f")])
    assert exc.value.code == 2 and expect in _err_line(capsys, "forecast")


def test_forecast_cross_option_checks_come_first(data, capsys, tmp_path):
    d, good = data
    assert main(["forecast", "--model", "world:0", "--domain", good, "--out", str(tmp_path / "f")]) == 2
    assert "--domain: not used with --model world:0" in _err_line(capsys, "forecast")
    assert main(["forecast", "--model", "tiny", "--domain", good, "--out", str(tmp_path / "f")]) == 2
    assert "--domain and --general are required" in _err_line(capsys, "forecast")
    assert main(["advise", "--model", "tiny", "--domain", good, "--general", good, "--budget", "-1",
                 "--out", str(tmp_path / "f")]) == 2
    assert "--budget must be a positive" in _err_line(capsys, "advise")
    assert not (tmp_path / "f").exists()


def test_forecast_general_reads_text_rows_as_compare_does(data, capsys):
    """`forecast --general` refused the {"text"} rows that `compare --general` accepts."""
    d, good = data
    gen = write_jsonl(d / "g.jsonl", [{"text": f"the cat number {i} sat on the mat"} for i in range(4)])
    out = d / "fc"
    assert main(["forecast", "--model", "tiny", "--domain", good, "--general", gen, "--methods", "ce",
                 "--lrs", "1e-2", "--steps", "2", "--batch-size", "2", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "forecast.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["method"] == "ce"
    bad = write_jsonl(d / "g5.jsonl", [{"text": 5}])
    assert main(["forecast", "--model", "tiny", "--domain", good, "--general", bad, "--methods", "ce",
                 "--out", str(d / "fc5"), "--no-progress"]) == 2
    assert f"{bad}:1: field 'text': expected a string, got int" in _err_line(capsys, "forecast")


def test_forecast_size_model_reaches_the_rows_and_a_bad_one_is_refused(data, capsys):
    """`talr forecast --size-model diffusion`: every row carries the diffusion's parts (its dL = c x S2 x the
    method's factor) and the request records the choice; an unknown model is refused before any work."""
    d, good = data
    gen = write_jsonl(d / "g.jsonl", [{"text": f"the cat number {i} sat on the mat"} for i in range(4)])
    out = d / "fcd"
    assert main(["forecast", "--model", "tiny", "--domain", good, "--general", gen, "--methods", "ce,l2",
                 "--lrs", "1e-2", "--steps", "3", "--batch-size", "2", "--size-model", "diffusion",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "forecast.json").read_text())
    assert res["request"]["size_model"] == "diffusion"
    by = {r["method"]: r for r in res["rows"]}
    for r in by.values():
        assert r["dL_P1_bits"] == pytest.approx(r["diffusion_c"] * r["S2"] * r["method_factor"])
    assert by["ce"]["method_factor"] == 1.0 and 0 < by["l2"]["method_factor"] < 1.0
    with pytest.raises(SystemExit):
        main(["forecast", "--model", "tiny", "--domain", good, "--general", gen, "--size-model", "drift",
              "--out", str(d / "never"), "--no-progress"])
    assert not (d / "never").exists()


@pytest.mark.parametrize("line,expect", [
    ("[" * 100_000, ":2: field '<row>': invalid JSON: nested deeper"),
    ('{"prompt": "p", "completion": "c", "n": ' + "9" * 5000 + "}", ":2: field '<row>': invalid JSON: Exceeds the limit"),
    ('{"prompt": "a\\ud800", "completion": "c"}', ":2: field 'prompt': a lone surrogate"),
], ids=["deep", "bigint", "surrogate"])
def test_train_on_a_bad_row_is_one_line(data, line, expect, capsys):
    d, good = data
    bad = d / "bad.jsonl"
    bad.write_text(Path(good).read_text().splitlines()[0] + "\n" + line + "\n")
    assert main(["train", "--model", TINY, "--data", str(bad), "--out", str(d / "never"), "--no-progress"]) == 2
    assert f"{bad}{expect}" in _err_line(capsys, "train") and not (d / "never").exists()


def test_train_on_bad_models_is_one_line(data, capsys, tmp_path):
    from sft.models import byte_tokenizer, load_model

    d, good = data
    folder = tmp_path / "m"
    load_model(TINY).save_pretrained(folder)
    assert main(["train", "--model", str(folder), "--data", good, "--out", str(tmp_path / "r1")]) == 2
    assert "no tokenizer in the folder" in _err_line(capsys, "train")
    byte_tokenizer().save_pretrained(folder)
    f = folder / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    assert main(["train", "--model", str(folder), "--data", good, "--out", str(tmp_path / "r2")]) == 2
    assert "model.safetensors: truncated" in _err_line(capsys, "train")
    assert main(["train", "--model", "tiny:bogus=3", "--data", good, "--out", str(tmp_path / "r3")]) == 2
    assert "unknown key 'bogus'" in _err_line(capsys, "train")

"""`talr forecast` / `talr advise` on a tiny random model and JSONL files (the real-LLM path)."""
from __future__ import annotations

import json

import pytest
import torch

from experiments.cli import main
from sft.io import write_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fc")
    dom = write_jsonl(d / "d2.jsonl", [{"prompt": f"add {i} and {i}", "completion": f"= {2 * i}"} for i in range(12)])
    gen = write_jsonl(d / "d1.jsonl", [{"prompt": "say", "completion": f"word {i} again"} for i in range(8)])
    return d, dom, gen


def _args(d, dom, gen, *extra):
    return ["--model", "tiny", "--domain", dom, "--general", gen, "--methods", "ce,l2", "--lrs", "1e-3,1e-2",
            "--steps", "4", "--batch-size", "2", "--out", str(d / "out"), "--no-progress", *extra]


def test_forecast_writes_table_and_plane_and_advise_reuses_it(files, capsys):
    d, dom, gen = files
    assert main(["forecast", *_args(d, dom, gen)]) == 0
    res = json.loads((d / "out" / "forecast.json").read_text())
    assert [(r["method"], r["lr"]) for r in res["rows"]] == [("ce", 1e-3), ("ce", 1e-2), ("l2", 1e-3), ("l2", 1e-2)]
    assert (d / "out" / "forecast.md").read_text().count("| ce |") == 2
    assert (d / "out" / "tradeoff.png").stat().st_size > 0
    mtime = (d / "out" / "forecast.json").stat().st_mtime_ns
    big = max(r["dL_P1_bits"] for r in res["rows"]) + 1.0
    capsys.readouterr()
    assert main(["advise", "--budget", str(big), *_args(d, dom, gen)]) == 0
    out = capsys.readouterr().out
    best = max(res["rows"], key=lambda r: r["domain_gain_bits"])
    assert out.startswith("advice: ") and "runner-up: " in out
    assert (d / "out" / "forecast.json").stat().st_mtime_ns == mtime  # reused, not recomputed
    low = min(r["dL_P1_bits"] for r in res["rows"])
    if low > 0:
        assert main(["advise", "--budget", str(low / 2), *_args(d, dom, gen)]) == 1  # nothing feasible
    assert best["domain_gain_bits"] >= min(r["domain_gain_bits"] for r in res["rows"])
    # a forecast stored by another revision of the forecast model, or asked of version 7, is recomputed, not read
    from sft.forecast import FORECAST_MODEL

    assert res["request"]["forecast_model"] == FORECAST_MODEL and res["request"]["forecast_version"] == 9
    stale = dict(res, request=dict(res["request"], forecast_model="7: an older model"))
    (d / "out" / "forecast.json").write_text(json.dumps(stale))
    assert main(["forecast", *_args(d, dom, gen)]) == 0
    again = json.loads((d / "out" / "forecast.json").read_text())
    assert again["request"]["forecast_model"] == FORECAST_MODEL
    assert main(["forecast", *_args(d, dom, gen, "--forecast-version", "7")]) == 0
    v7 = json.loads((d / "out" / "forecast.json").read_text())
    assert v7["request"]["forecast_version"] == 7
    assert [r["dL_P1_bits"] for r in v7["rows"]] == pytest.approx([r["dL_P1_bits"] for r in again["rows"]])
    assert main(["forecast", *_args(d, dom, gen, "--forecast-version", "8")]) == 0  # c held below the probes
    v8 = json.loads((d / "out" / "forecast.json").read_text())
    assert v8["request"]["forecast_version"] == 8
    assert [r["dL_P1_bits"] for r in v8["rows"]] == pytest.approx([r["dL_P1_bits"] for r in again["rows"]])


def test_forecast_version_reaches_the_config():
    """``--forecast-version``: each version's settings over the defaults (version 9's), and no other version."""
    from experiments.cli import build_parser
    from experiments.commands.forecast import forecast_config

    def cfg(*extra):
        args = build_parser().parse_args(["forecast", "--model", "tiny", "--domain", "d.jsonl", "--general", "g.jsonl",
                                          "--out", "o", *extra])
        return forecast_config(args, 0)
    assert cfg().c_below == "equilibrium" and cfg().method_walk and cfg().lora_share == "fisher"
    assert cfg("--forecast-version", "8").c_below == "hold" and cfg("--forecast-version", "8").method_walk
    v7 = cfg("--forecast-version", "7")
    assert (v7.c_below, v7.method_walk, v7.lora_share) == ("hold", False, "count")
    with pytest.raises(SystemExit):
        cfg("--forecast-version", "6")


def test_micro_batches_forecast_the_same_rows(files):
    """``--micro-batch 1``: the gradients and probes run one row at a time, summed exactly: the same forecast
    up to float rounding."""
    d, dom, gen = files
    rows = []
    for i, extra in enumerate(([], ["--micro-batch", "1"])):
        args = _args(d, dom, gen, *extra)
        args[args.index("--out") + 1] = str(d / f"mb{i}")
        assert main(["forecast", *args]) == 0
        rows.append(json.loads((d / f"mb{i}" / "forecast.json").read_text())["rows"])
    for a, b in zip(*rows):
        assert (a["method"], a["lr"]) == (b["method"], b["lr"])
        assert b["dL_P1_bits"] == pytest.approx(a["dL_P1_bits"], rel=1e-3, abs=1e-6)
        assert b["domain_gain_bits"] == pytest.approx(a["domain_gain_bits"], rel=1e-3, abs=1e-6)


def test_bad_options_are_rejected(files, capsys):
    d, dom, gen = files
    base = ["--model", "tiny", "--domain", dom, "--general", gen, "--steps", "4", "--batch-size", "2",
            "--no-progress"]
    with pytest.raises(SystemExit):  # argparse: not a number
        main(["forecast", *base, "--lrs", "0.1,abc", "--out", str(d / "bad1")])
    with pytest.raises(SystemExit):  # argparse: a rate outside (0, 1)
        main(["forecast", *base, "--lrs", "0.1,3", "--out", str(d / "bad1")])
    assert main(["advise", *base, "--budget", "-1", "--out", str(d / "bad1")]) == 2
    with pytest.raises(SystemExit):  # argparse: not a method
        main(["forecast", *base, "--methods", "ce,sgd", "--out", str(d / "bad2")])
    assert main(["forecast", *base[:3], str(d / "missing.jsonl"), *base[4:], "--out", str(d / "bad3")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "budget" in err[-3] and "--methods" in err[-2] and "sgd" in err[-2] and "missing.jsonl" in err[-1]
    with pytest.raises(SystemExit):  # argparse: a negative micro-batch
        main(["forecast", *base, "--micro-batch", "-1", "--out", str(d / "bad4")])
    with pytest.raises(SystemExit):  # argparse: not a device
        main(["forecast", *base, "--device", "tpu", "--out", str(d / "bad4")])
    capsys.readouterr()
    # a device this machine does not have: one line naming what it has, before any work
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert main(["forecast", *base, "--device", f"cuda:{n}", "--out", str(d / "bad5")]) == 2
    assert f"--device cuda:{n}: this machine has {n} CUDA device(s)" in capsys.readouterr().err
    assert not (d / "bad5" / "forecast.json").exists()
    # a spill folder that is not there: refused before any work
    assert main(["forecast", *base, "--spill-dir", str(d / "nowhere"), "--out", str(d / "bad6")]) == 2
    assert f"--spill-dir {d / 'nowhere'}: not a directory" in capsys.readouterr().err
    assert not (d / "bad6" / "forecast.json").exists() and not (d / "nowhere").exists()
    for name in ("bad1", "bad2", "bad3"):
        assert not (d / name / "forecast.json").exists()


def test_command_method_list_matches_the_library():
    import argparse

    from experiments.commands.forecast import register
    from sft.forecast import ForecastConfig

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    default = sub.choices["forecast"].parse_args(["--model", "world:0", "--out", "x"]).methods
    assert tuple(default.split(",")) == ForecastConfig().methods == ("ce", "talr", "dft", "flow", "l2", "lora")


def test_study_forecast_seeds_option(capsys, tmp_path):
    """``talr study forecast --seeds``: distinct integers >= 0, else argparse's exit 2 naming the option."""
    import argparse

    from experiments.commands.study import seed_list

    assert seed_list("0") == (0,) and seed_list("2, 0") == (2, 0)
    for bad in ("", "1,1", "-1", "a"):
        with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
            seed_list(bad)
    with pytest.raises(SystemExit) as e:
        main(["study", "forecast", "--seeds", "0,0", "--out", str(tmp_path / "s")])
    assert e.value.code == 2 and "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_forecast_cost_prints_the_formulas_and_the_run_length_that_meets_the_target(capsys):
    """``talr forecast-cost``: the memory and compute formulas of `sft.forecast` for the given sizes, and
    the first T at which the forecast costs at most --target of one run (the passes are fixed, the run
    grows with T); a bad size is refused with one line, exit 2."""
    from sft.forecast import forecast_compute_ratio, forecast_memory_bytes

    assert main(["forecast-cost", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    from experiments.commands import forecast as cmd
    from sft.forecast import WALK_BATCHES

    assert cmd.WALK_BATCHES == WALK_BATCHES == 4
    v8 = forecast_memory_bytes(3.21e9, walk_batches=4)  # a real LLM's grid is sized by diffusion: the walk factors
    assert r["memory_gb"]["peak"] == pytest.approx(v8["peak"] / 1e9)
    assert not r["fits"] and 141 < r["memory_gb"]["peak"] < 155  # a 3B model: 154.2 GB in one memory (115.6 without)
    # ... but with the model on the GPU and the moments in host memory the device holds 5 w N = 32.1 GB
    assert r["fits_with_host_state"] and r["memory_gb"]["device_peak"] == pytest.approx(32.1)
    assert r["memory_gb"]["host_peak"] == pytest.approx(v8["host_peak"] / 1e9)
    assert main(["forecast-cost", "--json", "--walk-batches", "0", "--gpu-gb", "141"]) == 0
    r0 = json.loads(capsys.readouterr().out)
    assert r0["fits"] and r0["memory_gb"]["peak"] == pytest.approx(forecast_memory_bytes(3.21e9)["peak"] / 1e9)
    assert r0["compute"]["walk_ratio"] == 0.0 < r["compute"]["walk_ratio"]
    kw = dict(batch=4, len_d2=282, n_general=24, len_d1=96, n_batches=2, n_weightings=3, grid=8, probe_steps=6,
              replay_flops=8.9, probes=2, walk_batches=4)
    sizes = ["--params", "1.35e8", "--steps", "20", "--batch-size", "4", "--len-d2", "282", "--n-general", "24",
             "--len-d1", "96", "--weightings", "3", "--grid", "8"]
    assert main(["forecast-cost", "--json", *sizes]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["compute"] == pytest.approx(forecast_compute_ratio(steps=20, **kw))
    t = r["steps_for_target"]
    assert forecast_compute_ratio(steps=t, **kw)["ratio"] <= 0.5 < forecast_compute_ratio(steps=t - 1, **kw)["ratio"]
    assert main(["forecast-cost", *sizes]) == 0
    out = capsys.readouterr().out
    assert f"at most 0.5 of a run from T = {t}" in out and ": fits 80 GB" in out
    spill_line = [x for x in out.splitlines() if "--spill-dir" in x]  # the peak with the unread state on disk
    assert len(spill_line) == 1
    assert f"{forecast_memory_bytes(1.35e8, walk_batches=4)['spill_peak'] / 1e9:.1f} GB in one memory" in spill_line[0]
    # a target below the replays' own share (constant in T) is never met, and says why
    assert main(["forecast-cost", *sizes, "--target", "0.001"]) == 0
    assert "never at most 0.001 of a run: the replays alone cost" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["forecast-cost", "--params", "0"])
    assert e.value.code == 2 and "--params: 0.0 is outside (0, inf)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["forecast-cost", "--walk-batches", "-1"])
    assert e.value.code == 2 and "--walk-batches" in capsys.readouterr().err

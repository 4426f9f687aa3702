"""The run folder cannot lose or mix work, and bad options fail before anything is written (issue 13)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from experiments.cli import main as cli
from sft.trainer import TrainConfig, train

from tinyworld import make_model


def _data(tmp_path, n=8):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) + "\n" for i in range(n)))
    return data


def _train(tmp_path, out, *extra):
    return cli(["train", "--model", "tiny:vocab=260,hidden=32", "--data", str(_data(tmp_path)), "--out", str(out),
                "--batch-size", "4", "--no-progress", "--lr", "1e-3", *extra])


class BlowUp(TrainerCallback):
    """Multiplies every weight by 1e30 right after the optimizer step of step 3 (finite, diverged)."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kw):
        if state.global_step == 2:  # global_step counts finished steps: this is step 3
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(1e30)


def test_diverged_weights_are_never_checkpointed_and_the_kept_one_is_from_before(tmp_path, dataset):
    """Bug 1: weights of ~1e30 (finite) used to be saved as checkpoint-3 and kept after the stop."""
    model = make_model(torch.float32)
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=4, out=str(tmp_path / "run"), progress=False, save_steps=1,
                      save_total_limit=None, save_final=False)
    res = train(cfg, model, dataset, pad_token_id=256, callbacks=[BlowUp(model)])
    assert res.status == "non_finite_loss"
    assert res.last_checkpoint.name == "checkpoint-2"
    assert not (tmp_path / "run" / "checkpoint-3").exists()
    from safetensors.torch import load_file

    ck = load_file(str(res.last_checkpoint / "model.safetensors"))
    assert max(float(v.abs().max()) for v in ck.values()) < 100  # finite and not blown up
    assert all(torch.equal(ck[k], v) for k, v in res.model.state_dict().items() if k in ck)  # restored


def test_cli_lr_1e30_keeps_no_diverged_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan4"
    rc = _train(tmp_path, out, "--lr", "1e30", "--max-steps", "4", "--save-steps", "1")
    assert rc == 1
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "non_finite_loss" and result["last_checkpoint"] is None
    assert not list(out.glob("checkpoint-*"))
    assert "non-finite" in capsys.readouterr().out


def test_second_run_into_a_non_empty_folder_is_refused_unless_overwrite(tmp_path, capsys):
    """Bug 3: a second `talr train` into the same --out silently mixed two runs."""
    out = tmp_path / "run"
    assert _train(tmp_path, out, "--max-steps", "3", "--save-steps", "1", "--save-total-limit", "2") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # rotation
    assert not (out / ".partial").exists()
    assert _train(tmp_path, out, "--max-steps", "1") == 2
    msg = capsys.readouterr().err
    assert "not empty" in msg and "--overwrite" in msg and "--resume-from-checkpoint" in msg
    assert (out / "checkpoint-3").is_dir()  # the first run is untouched
    assert _train(tmp_path, tmp_path / "nothing", "--resume-from-checkpoint", "last") == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    assert _train(tmp_path, out, "--max-steps", "1", "--overwrite") == 0
    assert [p.name for p in out.glob("checkpoint-*")] == []  # the old run's checkpoints are gone
    assert json.loads((out / "result.json").read_text())["global_step"] == 1
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "precious.txt").write_text("x")
    assert _train(tmp_path, tmp_path / "notarun", "--max-steps", "1", "--overwrite") == 2
    assert (tmp_path / "notarun" / "precious.txt").exists()


def test_config_records_absolute_paths_and_hashes(tmp_path, monkeypatch, capsys):
    """Bug 4 (train side): relative paths are stored resolved, with each data file's sha256;
    `--json` prints the summary as JSON."""
    import hashlib

    monkeypatch.chdir(tmp_path)
    _data(tmp_path)
    assert cli(["train", "--model", "tiny:vocab=260,hidden=32", "--data", "d.jsonl", "--out", "run", "--batch-size",
                "4", "--no-progress", "--max-steps", "1", "--domain-eval", "d.jsonl", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "completed" and summary["global_step"] == 1 and summary["train_loss_nats_per_token"] > 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    path = str((tmp_path / "d.jsonl").resolve())
    assert cfg["data"] == path and cfg["domain_eval"] == path
    assert cfg["data_files"]["data"]["sha256"] == hashlib.sha256((tmp_path / "d.jsonl").read_bytes()).hexdigest()


BAD = [
    (["--lr", "nan"], "--lr: nan", "(0, inf)"),
    (["--lr", "inf"], "--lr: inf", "(0, inf)"),
    (["--grad-accum", "0"], "--grad-accum: 0", "[1, inf)"),
    (["--tau-scope", "bad"], "--tau-scope 'bad'", "'micro' or 'step'"),
    (["--tau", "-1"], "--tau: -1.0", "(0, inf)"),
    (["--w-min", "2"], "--w-min: 2.0", "[0, 1]"),
    (["--l2-coeff", "-5"], "--l2-coeff: -5.0", "[0, inf)"),
    (["--clip-threshold", "1.5"], "--clip-threshold: 1.5", "[0, 1)"),
    (["--batch-size", "0"], "--batch-size: 0", "[1, inf)"),
]


@pytest.mark.parametrize("flags,name,interval", BAD, ids=[b[0][0] for b in BAD])
def test_bad_numeric_option_is_refused_with_its_range_and_writes_nothing(tmp_path, capsys, flags, name, interval):
    """Bugs 5/6: these were tracebacks, silently clamped, or accepted; `--lr nan` left config.json."""
    out = tmp_path / "run"
    assert _train(tmp_path, out, *flags) == 2
    msg = capsys.readouterr().err
    assert name in msg and interval in msg
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--model", "--tokenizer"])
def test_missing_model_or_tokenizer_path_is_a_clear_error(tmp_path, capsys, flag):
    missing = str(tmp_path / "no-such-model")
    args = ["train", "--model", missing if flag == "--model" else "tiny", "--data", str(_data(tmp_path)),
            "--out", str(tmp_path / "r"), "--no-progress"] + (["--tokenizer", missing] if flag == "--tokenizer" else [])
    assert cli(args) == 2
    msg = capsys.readouterr().err
    assert "no-such-model" in msg and "no such file or folder" in msg
    assert not (tmp_path / "r").exists()


def test_non_utf8_jsonl_names_line_and_byte_offset_in_train_analyze_compare(tmp_path, capsys, tok):
    bad = tmp_path / "bad.jsonl"
    first = b'{"prompt": "a", "completion": "b"}\n'
    bad.write_bytes(first + b'{"prompt": "caf\xe9", "completion": "b"}\n')
    offset = len(first) + len(b'{"prompt": "caf')
    expect = f"{bad}:2: not UTF-8 text (byte offset {offset} in the file"
    assert cli(["train", "--model", "tiny", "--data", str(bad), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert expect in capsys.readouterr().err
    assert cli(["analyze", "--model", "tiny", "--data", str(bad), "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert expect in capsys.readouterr().err  # the CLI convention: errors on stderr
    from experiments.studies.compare import CompareError, load_eval_set

    with pytest.raises(CompareError, match="byte offset"):
        load_eval_set(str(bad), tok)


def test_divergence_warning_when_the_loss_rises_by_orders_of_magnitude(tmp_path, capsys):
    """Bug 6: `--lr 1e3` "completed" with loss ~1e6 and exit 0, without a word. Since issue 21 a
    model that ends collapsed (every token at 1/V) is not "completed" either: rc 1, status diverged."""
    out = tmp_path / "hot"
    data = tmp_path / "same.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n' * 16)
    assert cli(["train", "--model", "tiny", "--data", str(data), "--out", str(out), "--batch-size", "4",
                "--no-progress", "--lr", "1e3", "--max-steps", "4"]) == 1
    msg = capsys.readouterr().out
    assert "warning: training diverged" in msg
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and any("diverged" in w for w in result["warnings"])
    calm = tmp_path / "calm"
    assert _train(tmp_path, calm, "--max-steps", "4") == 0
    assert json.loads((calm / "result.json").read_text())["warnings"] == []


def test_no_progress_silences_transformers_own_bars(tmp_path, capfd):
    """`--no-progress` used to leave transformers' "Loading weights" / "Writing model shards" bars."""
    from sft.models import byte_tokenizer

    folder = tmp_path / "model"
    make_model(torch.float32).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    capfd.readouterr()
    assert cli(["train", "--model", str(folder), "--data", str(_data(tmp_path)), "--out", str(tmp_path / "r"),
                "--max-steps", "1", "--save-steps", "1", "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "it/s]" not in err and "%|" not in err

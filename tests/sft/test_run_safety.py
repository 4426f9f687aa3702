"""`talr train` never deletes, mixes or half-writes what is not its run (issue 21): --overwrite only on
folders talr marked, resume only with the same configuration, one process per run folder, Ctrl-C
and a full disk end with one line and a status, a collapsed run is not "completed"."""
from __future__ import annotations

import fcntl
import json
import os
import stat

import pytest
import torch
from transformers import TrainerCallback

from experiments.cli import main as cli

from tinyworld import make_model

TINY = "tiny:vocab=260,hidden=32"


def _data(tmp_path, n=8, name="d.jsonl"):
    data = tmp_path / name
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) + "\n" for i in range(n)))
    return data


def _train(tmp_path, out, *extra, model=TINY, data=None):
    return cli(["train", "--model", model, "--data", str(data or _data(tmp_path)), "--out", str(out),
                "--batch-size", "4", "--no-progress", "--lr", "1e-3", *extra])


def _model_folder(tmp_path):
    from sft.models import byte_tokenizer

    folder = tmp_path / "mymodel"
    make_model(torch.float32).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_overwrite_never_deletes_the_model_folder_nor_an_unmarked_run(tmp_path, capsys):
    """`--model mymodel --out mymodel --overwrite` deleted the model (it holds config.json)."""
    model = _model_folder(tmp_path)
    before = sorted(p.name for p in model.iterdir())
    capsys.readouterr()  # save_pretrained's own progress bar
    assert _train(tmp_path, model, "--max-steps", "1", "--overwrite", model=str(model)) == 2
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and "talr train: --out" in msg and "input" in msg
    assert sorted(p.name for p in model.iterdir()) == before
    # a folder that merely looks like a run (config.json) but was not marked by talr
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    (fake / "thesis.tex").write_text("x")
    assert _train(tmp_path, fake, "--max-steps", "1", "--overwrite") == 2
    assert "not a folder talr created" in capsys.readouterr().err
    assert (fake / "thesis.tex").exists()
    # a folder talr wrote is replaced
    run = tmp_path / "run"
    assert _train(tmp_path, run, "--max-steps", "1") == 0
    assert (run / ".talr-run").is_file()
    assert _train(tmp_path, run, "--max-steps", "2", "--overwrite") == 0
    assert json.loads((run / "result.json").read_text())["global_step"] == 2


def test_overwrite_refuses_a_symlink_and_keeps_link_and_target(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tmp_path, run, "--max-steps", "1") == 0
    link = tmp_path / "link"
    link.symlink_to(run)
    capsys.readouterr()
    assert _train(tmp_path, link, "--max-steps", "1", "--overwrite") == 2
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and "symbolic link" in msg
    assert link.is_symlink() and (run / "result.json").is_file()


def test_resume_refuses_another_method_lr_or_data_and_names_the_fields(tmp_path, capsys):
    """Resuming with another method/lr/data file mixed two runs under one config.json."""
    run = tmp_path / "run"
    data = _data(tmp_path)
    assert _train(tmp_path, run, "--max-steps", "3", "--save-steps", "1", data=data) == 0
    capsys.readouterr()
    last = ["--max-steps", "5", "--save-steps", "1", "--resume-from-checkpoint", "last"]
    assert _train(tmp_path, run, *last, "--method", "talr", "--lr", "2e-3", data=data) == 2
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and "resume-from-checkpoint refused" in msg
    assert "method: 'ce' -> 'talr'" in msg and "lr: 0.001 -> 0.002" in msg and "max_steps: 3 -> 5" in msg
    other = _data(tmp_path, n=12, name="other.jsonl")
    assert _train(tmp_path, run, "--max-steps", "3", "--save-steps", "1", "--resume-from-checkpoint", "last",
                  data=other) == 2
    assert "data file: sha256" in capsys.readouterr().err
    steps = [json.loads(x)["step"] for x in (run / "token_stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # nothing was appended by the refused resumes
    # the same configuration resumes (here: nothing left to do)
    assert _train(tmp_path, run, "--max-steps", "3", "--save-steps", "1", "--resume-from-checkpoint", "last",
                  data=data) == 0


def test_a_second_process_on_a_locked_run_folder_is_refused_at_once(tmp_path, capsys):
    """Two resumes of one folder at once interleaved their token_stats.jsonl."""
    run = tmp_path / "run"
    assert _train(tmp_path, run, "--max-steps", "2", "--save-steps", "1") == 0
    capsys.readouterr()
    fd = os.open(run / ".talr-lock", os.O_RDWR | os.O_CREAT)  # another process holding the run
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc = _train(tmp_path, run, "--max-steps", "4", "--save-steps", "1", "--resume-from-checkpoint", "last")
    finally:
        os.close(fd)
    assert rc == 2
    assert "in use by another talr process" in capsys.readouterr().err
    assert json.loads((run / "result.json").read_text())["global_step"] == 2
    assert _train(tmp_path, run, "--max-steps", "2", "--save-steps", "1", "--overwrite") == 0  # lock released


class _CtrlC(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_ctrl_c_prints_one_line_writes_status_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    import sft.trainer as T

    run = tmp_path / "run"
    plain = T.run_callbacks
    monkeypatch.setattr(T, "run_callbacks", lambda *a: [*plain(*a), _CtrlC()])
    assert _train(tmp_path, run, "--max-steps", "5", "--save-steps", "2") == 130
    out = capsys.readouterr().err
    assert out.count("\n") == 1
    assert "talr train: interrupted at step 3" in out and "--resume-from-checkpoint last" in out
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "interrupted" and result["global_step"] == 3
    assert result["last_checkpoint"].endswith("checkpoint-2") and not (run / ".partial").exists()
    monkeypatch.setattr(T, "run_callbacks", plain)
    assert _train(tmp_path, run, "--max-steps", "5", "--save-steps", "2", "--resume-from-checkpoint", "last") == 0
    assert json.loads((run / "result.json").read_text())["status"] == "completed"
    steps = [json.loads(x)["step"] for x in (run / "token_stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_full_disk_removes_the_half_written_checkpoint_and_says_disk_full(tmp_path, capsys, monkeypatch):
    """torch.save on a full disk: "unexpected pos" traceback, and .partial/ kept the disk full."""
    real = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):
            with open(f, "wb") as fh:
                fh.write(b"\0" * 100)  # half a file, as a full disk leaves it
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1472 vs 1358")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    assert _train(tmp_path, run, "--max-steps", "3", "--save-steps", "2") == 2
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and out.startswith("talr train: disk full")
    assert not (run / ".partial").exists() and not list(run.glob("checkpoint-*"))
    assert json.loads((run / "result.json").read_text())["status"] == "disk_full"


def test_read_only_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import sft.models

    monkeypatch.setattr(sft.models, "load_model", lambda *a, **k: pytest.fail("model loaded before the --out check"))
    assert _train(tmp_path, "/sys/talr-no-such-dir/run", "--max-steps", "1") == 2
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and "not writable" in msg


def test_lora_targets_matching_nothing_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "lora"
    assert _train(tmp_path, out, "--method", "lora", "--lora-targets", "nothing", "--max-steps", "1") == 2
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and "--lora-targets 'nothing'" in msg and "q_proj" in msg
    assert not out.exists()


def test_collapse_to_uniform_is_not_completed(tmp_path, capsys):
    """`--lr 1e6` "completed" rc 0 with every token at p = 1/512 (the loss fell from 6.29 to ln 512)."""
    out = tmp_path / "hot"
    assert cli(["train", "--model", "tiny", "--data", str(_data(tmp_path, 16)), "--out", str(out),
                "--batch-size", "4", "--no-progress", "--lr", "1e6", "--max-steps", "6"]) == 1
    msg = capsys.readouterr().out
    assert "warning: training collapsed: every token has probability 1/512" in msg
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and not (out / "final").exists()


def test_general_eval_that_does_not_exist_is_refused_at_parse_time(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tmp_path, out, "--general-eval", str(tmp_path / "nope.jsonl")) == 2
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and "--general-eval" in msg and "no such file" in msg
    assert not out.exists()


def test_examples_longer_than_the_context_are_refused_and_max_length_truncates(tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "x" * 40, "completion": "y"}) + "\n"
                    + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    model = "tiny:vocab=260,hidden=32,max_pos=32"  # the ChatML template makes the short row 23 tokens
    out = tmp_path / "run"
    assert _train(tmp_path, out, "--max-steps", "1", model=model, data=data) == 2
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and "1 of 2 examples are longer than the model's context of 32 tokens" in msg
    assert "--max-length 32" in msg and not out.exists()
    assert _train(tmp_path, out, "--max-steps", "1", "--max-length", "99", model=model, data=data) == 2
    assert "exceeds the model's context of 32" in capsys.readouterr().err
    # truncating the prompt leaves example 1 without its completion: dropped, said in config.json
    assert _train(tmp_path, out, "--max-steps", "1", "--max-length", "32", model=model, data=data) == 0
    assert json.loads((out / "config.json").read_text())["n_dropped"] == 1


def test_run_files_follow_the_umask(tmp_path):
    """Files were created 0600 and folders 0700 (mkstemp/mkdtemp) whatever the umask."""
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert _train(tmp_path, run, "--max-steps", "1") == 0
        for name in ("config.json", "result.json"):
            assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
        sim = tmp_path / "sim"
        assert cli(["simulate", "--out", str(sim), "--steps", "2"]) == 0
        assert stat.S_IMODE(sim.stat().st_mode) == 0o755
        assert stat.S_IMODE((sim / "delta_L.png").stat().st_mode) == 0o644
    finally:
        os.umask(old)

"""Accumulation, several processes and kill+resume all equal one uninterrupted large-batch run."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft.trainer import last_checkpoint, train

from tinyworld import make_dataset, make_model, max_param_diff, params

SCRIPT = Path(__file__).parent / "scripts" / "train_script.py"
sys.path.insert(0, str(SCRIPT.parent))
from train_script import config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _run(out, method, tau_scope, batch_size, max_steps=3, grad_accum=1, **kw):
    res = train(config(out, method, tau_scope, batch_size, max_steps, grad_accum=grad_accum, **kw), make_model(),
                make_dataset(), pad_token_id=256)
    assert res.status == "completed"
    return params(res.model)


@pytest.mark.parametrize("method", ["ce", "dft", "talr"])
def test_grad_accumulation_equals_one_large_batch(method, tmp_path):
    init = params(make_model())
    big = _run(tmp_path / "big", method, "step", batch_size=4)
    acc = _run(tmp_path / "acc", method, "step", batch_size=2, grad_accum=2)
    assert max_param_diff(big, init) > 1e-4  # training moved the weights
    assert max_param_diff(big, acc) < 1e-9
    if method == "talr":  # the micro-batch scope is a different loss: the check can fail
        micro = _run(tmp_path / "micro", method, "micro", batch_size=2, grad_accum=2)
        assert max_param_diff(big, micro) > 1e-6


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def test_two_processes_equal_one_process(tmp_path):
    """torchrun, 2 processes x 2 sequences (gloo, CPU) == 1 process x 4 sequences, after 3 steps."""
    runs = [("ce", "micro"), ("talr", "step")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(SCRIPT), str(tmp_path / "ddp"), *[f"{m}:{s}" for m, s in runs],
           "--batch-size", "2"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method, scope in runs:
        out = tmp_path / "ddp" / f"{method}-{scope}"
        ddp = torch.load(out / "params.pt")
        single = _run(tmp_path / f"single-{method}", method, scope, batch_size=4)
        assert max_param_diff(single, params(make_model())) > 1e-4
        assert max_param_diff(ddp, single) < 1e-5, method
        assert (out / "token_stats.jsonl").read_text().count("\n") == 3


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    out = tmp_path / "killed" / "talr-micro"
    cmd = [sys.executable, str(SCRIPT), str(tmp_path / "killed"), "talr:micro", "--batch-size", "4", "--max-steps", "6",
           "--save-steps", "2", "--kill-at", "4"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]  # killed hard after checkpoint-4
    assert last_checkpoint(out).name == "checkpoint-4"
    assert not (out / "params.pt").exists()
    resumed = train(config(out, "talr", "micro", 4, 6, save_steps=2, resume="last"), make_model(), make_dataset(),
                    pad_token_id=256)
    assert resumed.status == "completed" and resumed.global_step == 6
    full = _run(tmp_path / "full", "talr", "micro", batch_size=4, max_steps=6)
    assert max_param_diff(params(resumed.model), full) < 1e-6
    # resuming from the wrong place would not match: compare with the 4-step weights
    from safetensors.torch import load_file

    at4 = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert max(float((at4[k] - full[k]).abs().max()) for k in full if k in at4) > 1e-4
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "token_stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_kill_inside_a_checkpoint_save_then_resume_last_equals_uninterrupted(tmp_path):
    """SIGKILL while checkpoint-4's optimizer.pt is half written: `last` skips it (with a warning),
    resumes from checkpoint-2, and the run ends equal to the uninterrupted one."""
    out = tmp_path / "killed" / "talr-micro"
    cmd = [sys.executable, str(SCRIPT), str(tmp_path / "killed"), "talr:micro", "--batch-size", "4", "--max-steps", "6",
           "--save-steps", "2", "--kill-in-save", "4"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL inside the save
    half = list(out.rglob("checkpoint-4/optimizer.pt"))
    assert len(half) == 1 and half[0].stat().st_size > 0  # the kill did land inside the save
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert last_checkpoint(out).name == "checkpoint-2"
    resumed = train(config(out, "talr", "micro", 4, 6, save_steps=2, resume="last"), make_model(), make_dataset(),
                    pad_token_id=256)
    assert resumed.status == "completed" and resumed.global_step == 6
    full = _run(tmp_path / "full", "talr", "micro", batch_size=4, max_steps=6)
    assert max_param_diff(params(resumed.model), full) < 1e-6
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    lines = (out / "token_stats.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == [1, 2, 3, 4, 5, 6]

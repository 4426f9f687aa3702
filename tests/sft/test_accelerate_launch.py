"""`talr train` under `accelerate launch` (2 CPU processes, gloo) equals one process at the same global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "fixtures" / "medcalc_rows.jsonl"
TINY = "tiny:vocab=260,hidden=32,layers=1,heads=2,intermediate=64"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(out: Path, batch_size: int) -> list[str]:
    return ["-m", "experiments.cli", "train", "--model", TINY, "--data", str(DATA), "--template", "medcalc",
            "--method", "talr", "--tau-scope", "step", "--lr", "1e-2", "--max-steps", "3", "--batch-size",
            str(batch_size), "--seed", "3", "--out", str(out), "--no-progress", "--logging-steps", "1"]


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_accelerate_two_cpu_processes_equal_one(tmp_path):
    _run([sys.executable, *_train_args(tmp_path / "one", 4)])
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_port", str(_port()), *_train_args(tmp_path / "two", 2)])
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    from sft.models import load_model

    init = load_model(TINY, seed=3).state_dict()
    moved = max(float((one[k] - init[k]).abs().max()) for k in one if k in init)
    assert moved > 1e-3  # training moved the weights
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
    # both runs logged 3 steps of TALR's tau (gathered over both processes in the 2-process run)
    for d in ("one", "two"):
        assert (tmp_path / d / "token_stats.jsonl").read_text().count("\n") == 3

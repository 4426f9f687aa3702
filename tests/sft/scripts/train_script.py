"""Subprocess side of the resume and multi-process tests.

    python train_script.py OUT METHOD:TAU_SCOPE [METHOD:TAU_SCOPE ...] [--kill-at STEP] [--batch-size B]

For each run, trains the shared tiny float64 Llama on the shared dataset in OUT/METHOD-SCOPE and
(rank 0) saves its parameters to OUT/METHOD-SCOPE/params.pt. ``--kill-at S`` hard-kills the process (os._exit) right after checkpoint S is saved.
``--kill-in-save S`` sends SIGKILL to the process in the middle of writing checkpoint S's optimizer.pt
(half of its bytes are on disk, model.safetensors is complete, trainer_state.json not yet written).
Under torchrun every rank runs this file.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from sft.trainer import TrainConfig, train  # noqa: E402
from tinyworld import make_dataset, make_model, params  # noqa: E402

torch.set_num_threads(1)


class Kill(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            os._exit(3)


def kill_inside_save(step):
    """Make torch.save of checkpoint-``step``'s optimizer.pt write half its bytes, then SIGKILL."""
    real_save = torch.save

    def save(obj, f, *args, **kw):
        if isinstance(f, (str, os.PathLike)) and str(f).endswith("optimizer.pt") and f"checkpoint-{step}" in str(f):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kw)
            with open(f, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kw)

    torch.save = save


def config(out, method, tau_scope, batch_size, max_steps, save_steps=0, grad_accum=1, resume=None):
    return TrainConfig(method=method, tau_scope=tau_scope, lr=3e-3, max_steps=max_steps, batch_size=batch_size,
                       grad_accum=grad_accum, out=str(out), progress=False, save_steps=save_steps, seed=7,
                       save_final=False, logging_steps=1, save_total_limit=None, resume_from_checkpoint=resume)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--kill-in-save", type=int, default=None)
    a = ap.parse_args()
    if a.kill_in_save:
        kill_inside_save(a.kill_in_save)
    cbs = [Kill(a.kill_at)] if a.kill_at else []
    for run in a.runs:
        method, scope = run.split(":")
        out = Path(a.out) / f"{method}-{scope}"
        res = train(config(out, method, scope, a.batch_size, a.max_steps, a.save_steps), make_model(),
                    make_dataset(), pad_token_id=256, callbacks=cbs)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(params(res.model), out / "params.pt")


if __name__ == "__main__":
    main()

"""TrajectoryCallback in the tiny world (exact probe): training unchanged, values exact, resume
neither duplicates nor loses points, the plateau stop."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch

from sft.data import SFTDataset
from sft.plateau import Plateau
from sft.trainer import TrainConfig, train
from sft.trajectory import TRAJECTORY_FILE, TrajectoryCallback, read_trajectory, run_probe, world_probe
from theory.divergence import TreeLogProbs, kl


def _train(world, model0, out, callbacks=(), steps=6, **kw):
    tc = TrainConfig(method="ce", lr=3e-3, max_steps=steps, batch_size=8, seed=0, out=str(out), progress=False,
                     save_final=False, token_stats=False, warmup=0.0, **kw)
    return train(tc, copy.deepcopy(model0), SFTDataset(world.d2_train), pad_token_id=world.pad_id,
                 callbacks=list(callbacks))


def test_callback_leaves_training_unchanged_and_records_exact_values(smoke_world, pretrained, tmp_path):
    model0 = pretrained[0]
    seen = []

    def probe(model):  # the callback's contract: eval mode, no gradient
        seen.append((model.training, torch.is_grad_enabled()))
        return world_probe(smoke_world)(model)

    plain = _train(smoke_world, model0, tmp_path / "plain")
    res = _train(smoke_world, model0, tmp_path / "traj", [TrajectoryCallback(probe, every=4)])
    for (k, a), (_, b) in zip(plain.model.named_parameters(), res.model.named_parameters()):
        assert torch.equal(a, b), k  # evaluating changed neither the RNG stream nor the weights
    assert res.model.training and seen and all(s == (False, False) for s in seen)
    pts = read_trajectory(tmp_path / "traj")
    assert [p["step"] for p in pts] == [0, 4, 6]  # every 4 steps, the last step always
    assert pts[0]["domain_gain_bits"] == 0 and pts[0]["general_delta_bits_pooled"] == 0
    base, last = run_probe(world_probe(smoke_world), model0), run_probe(world_probe(smoke_world), res.model)
    assert pts[-1]["domain_gain_bits"] == pytest.approx(base["domain_bits"] - last["domain_bits"], abs=1e-9)
    assert pts[-1]["general_delta_bits_pooled"] == pytest.approx(
        last["general_bits_per_token"] - base["general_bits_per_token"], abs=1e-12)
    assert pts[-1]["domain_gain_bits"] > 0  # CE learned the domain
    # general_bits - H(P1) is the exact KL(P1 || q), computed independently here
    from sft.treeprobs import exact_tree_logprobs
    lp = exact_tree_logprobs(res.model, smoke_world.p1, bos_id=smoke_world.bos_id, eos_id=smoke_world.eos_id)
    ids, p = smoke_world.p1.leaves()
    assert pts[-1]["kl_p1_bits"] == pytest.approx(kl(smoke_world.p1, lp), abs=1e-9)
    assert pts[-1]["general_bits"] == pytest.approx(kl(smoke_world.p1, lp) - np.dot(p, np.log2(p)), abs=1e-9)
    assert all(p["eval_seconds"] >= 0 for p in pts) and pts[1]["step_seconds"] > 0


def test_resume_neither_duplicates_nor_loses_points(smoke_world, pretrained, tmp_path):
    model0 = pretrained[0]
    probe = world_probe(smoke_world)
    full = tmp_path / "full"
    _train(smoke_world, model0, full, [TrajectoryCallback(probe, every=2)], save_steps=3)
    want = read_trajectory(full)
    assert [p["step"] for p in want] == [0, 2, 4, 6]
    # a run killed after evaluating step 6 but before checkpoint-6 was complete; step 4 was
    # evaluated after the last complete checkpoint (3) too, and carries a stale value
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "checkpoint-6")
    stale = read_trajectory(killed)
    stale[2]["domain_bits"] = -1.0
    (killed / TRAJECTORY_FILE).write_text("".join(json.dumps(p) + "\n" for p in stale))
    _train(smoke_world, model0, killed, [TrajectoryCallback(probe, every=2)], save_steps=3,
           resume_from_checkpoint="last")
    got = read_trajectory(killed)
    assert [p["step"] for p in got] == [0, 2, 4, 6]  # no duplicate, none lost
    assert got[:2] == stale[:2]  # points up to the checkpoint are kept as written
    for a, b in zip(got[2:], want[2:]):  # those after it are evaluated again, equal to the full run's
        assert a["domain_bits"] == pytest.approx(b["domain_bits"], abs=1e-9)
        assert a["general_delta_bits_pooled"] == pytest.approx(b["general_delta_bits_pooled"], abs=1e-12)


def test_resume_without_a_base_point_is_refused(smoke_world, pretrained, tmp_path):
    out = tmp_path / "run"
    _train(smoke_world, pretrained[0], out, [TrajectoryCallback(world_probe(smoke_world), every=2)], steps=4,
           save_steps=2)
    (out / TRAJECTORY_FILE).unlink()
    shutil.rmtree(out / "checkpoint-4")
    with pytest.raises(ValueError, match="no step-0 \\(base\\) point"):
        _train(smoke_world, pretrained[0], out, [TrajectoryCallback(world_probe(smoke_world), every=2)], steps=4,
               save_steps=2, resume_from_checkpoint="last")


def test_plateau_stops_training_and_a_given_base_is_not_recomputed(smoke_world, pretrained, tmp_path):
    model0 = pretrained[0]
    base = run_probe(world_probe(smoke_world), model0)
    calls = []

    def probe(model):
        calls.append(1)
        return world_probe(smoke_world)(model)

    # rel_tol = 1: any improvement of at most 100% counts as none, so the first point after the base meets it
    cb = TrajectoryCallback(probe, every=2, base=base, stop_on=Plateau(patience=1, rel_tol=1.0))
    res = _train(smoke_world, model0, tmp_path / "run", [cb], steps=8)
    assert res.global_step == 2 and cb.plateau_step == 2 and len(calls) == 1
    pts = read_trajectory(tmp_path / "run")
    assert [p["step"] for p in pts] == [0, 2] and pts[0]["domain_bits"] == base["domain_bits"]


def test_probe_errors_name_the_step(smoke_world, pretrained, tmp_path):
    with pytest.raises(ValueError, match="step 0: no 'general_bits_per_token'"):
        _train(smoke_world, pretrained[0], tmp_path / "a", [TrajectoryCallback(lambda m: {"domain_bits": 1.0}, 2)])
    bad = {"domain_bits": 1.0, "general_bits_per_token": float("nan")}
    with pytest.raises(ValueError, match="step 0: general_bits_per_token = nan is not finite"):
        _train(smoke_world, pretrained[0], tmp_path / "b", [TrajectoryCallback(lambda m: bad, 2)])
    with pytest.raises(ValueError, match="every: 0"):
        TrajectoryCallback(lambda m: bad, 0)


def test_read_trajectory_names_file_line_and_field(tmp_path):
    (tmp_path / TRAJECTORY_FILE).write_text('{"step": 0, "domain_gain_bits": 0, "general_delta_bits_pooled": 0}\n'
                                            '{"step": 2, "domain_gain_bits": "x", "general_delta_bits_pooled": 0}\n')
    with pytest.raises(ValueError, match=r"trajectory.jsonl: line 2, field 'domain_gain_bits'"):
        read_trajectory(tmp_path)


def test_stop_on_is_refused_under_several_processes(tmp_path):
    from types import SimpleNamespace

    cb = TrajectoryCallback(lambda m: {"domain_bits": 1.0, "general_bits_per_token": 1.0}, 2, stop_on=Plateau())
    args = SimpleNamespace(output_dir=str(tmp_path), world_size=2)
    with pytest.raises(ValueError, match="runs in one process, not 2"):
        cb.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, global_step=0), None, model=None)

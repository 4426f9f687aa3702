"""The Trainer: optimizer and schedule, token statistics, NaN stop, LoRA, baselines, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from experiments.cli import main as cli
from sft.trainer import TrainConfig, train

from tinyworld import make_dataset, make_model, max_param_diff, params


def _cfg(tmp_path, **kw):
    base = dict(lr=1e-2, max_steps=4, batch_size=4, out=str(tmp_path / "run"), progress=False, logging_steps=1,
                save_final=False)
    return TrainConfig(**{**base, **kw})


class Capture(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.optimizer = optimizer


def test_adamw_betas_cosine_schedule_and_token_stats(tmp_path, dataset):
    cap = Capture()
    res = train(_cfg(tmp_path, method="talr"), make_model(), dataset, pad_token_id=256, callbacks=[cap])
    assert res.status == "completed" and res.global_step == 4
    assert type(cap.optimizer.optimizer if hasattr(cap.optimizer, "optimizer") else cap.optimizer).__name__ == "AdamW"
    g = cap.optimizer.param_groups[0]
    assert tuple(g["betas"]) == (0.9, 0.999)
    lrs = [h["learning_rate"] for h in res.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    lines = [json.loads(x) for x in res.token_stats_path.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    first = lines[0]
    for key in ("tau", "w_q0", "w_q50", "w_q100", "frac_p_gt_0.2", "frac_hard", "frac_floor", "n_tokens"):
        assert key in first
    assert first["tau"] > 0 and 0 < first["w_q50"] <= 1 and first["w_q0"] >= 0.01
    # 4 steps x 4 sequences = one epoch: every supervised token is counted exactly once
    assert sum(x["n_tokens"] for x in lines) == sum(sum(1 for l in ex["labels"][1:] if l != -100) for ex in dataset)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["method"] == "talr" and cfg["w_min"] == 0.01 and cfg["chunked_lm_head"] is True


class Poison(TrainerCallback):
    """Makes the loss of step 4 NaN."""

    def __init__(self, model):
        self.model = model

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 3:
            with torch.no_grad():
                self.model.model.norm.weight.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, dataset):
    model = make_model()
    res = train(_cfg(tmp_path, max_steps=6, save_steps=1, save_total_limit=None), model, dataset, pad_token_id=256,
                callbacks=[Poison(model)])
    assert res.status == "non_finite_loss" and "step 4" in res.message
    assert res.global_step == 3
    assert res.last_checkpoint.name == "checkpoint-3"
    assert not (tmp_path / "run" / "checkpoint-4").exists()
    assert all(torch.isfinite(p).all() for p in res.model.parameters())  # restored from checkpoint-3
    from safetensors.torch import load_file

    ck = load_file(str(res.last_checkpoint / "model.safetensors"))
    assert all(torch.equal(ck[k], v) for k, v in res.model.state_dict().items() if k in ck)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "non_finite_loss"


def test_lora_trains_only_the_adapter(tmp_path, dataset):
    model = make_model()
    base0 = params(model)
    res = train(_cfg(tmp_path, method="lora", save_final=True, lora_r=4), model, dataset, pad_token_id=256)
    trained = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in res.model.named_parameters() if "lora_" not in k}
    assert max_param_diff(base0, {k: trained[k] for k in base0}) == 0.0
    lora_b = [p for k, p in res.model.named_parameters() if "lora_B" in k]
    assert lora_b and max(float(p.detach().abs().max()) for p in lora_b) > 0  # B starts at zero
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


def test_flow_l2_kl_baselines_run_and_l2_pulls_towards_init(tmp_path, dataset):
    init = params(make_model())
    ce = params(train(_cfg(tmp_path / "ce"), make_model(), dataset, pad_token_id=256).model)
    l2 = params(train(_cfg(tmp_path / "l2", method="l2", l2_coeff=10.0), make_model(), dataset,
                      pad_token_id=256).model)
    dist = lambda a: sum(float((a[k] - init[k]).pow(2).sum()) for k in init)  # noqa: E731
    assert dist(l2) < dist(ce)
    res = train(_cfg(tmp_path / "flow", method="flow"), make_model(), dataset, pad_token_id=256)
    flow = json.loads((tmp_path / "flow" / "run" / "flow_weights.json").read_text())
    assert len(flow["weights"]) == len(dataset) and flow["tau"] > 0
    assert max_param_diff(params(res.model), ce) > 1e-6
    kl = train(_cfg(tmp_path / "kl", method="kl", kl_coeff=1.0), make_model(), dataset, pad_token_id=256)
    assert kl.status == "completed" and max_param_diff(params(kl.model), ce) > 1e-7


def test_cli_train_writes_config_stats_and_final_model(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) + "\n" for i in range(8)))
    out = tmp_path / "runs" / "cli"
    rc = cli(["train", "--model", "tiny:vocab=260,hidden=32", "--data", str(data), "--method", "dft", "--lr", "1e-3",
              "--epochs", "1", "--out", str(out), "--batch-size", "4", "--no-progress"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "dft" and cfg["data"] == str(data) and cfg["n_examples"] == 8
    assert len((out / "token_stats.jsonl").read_text().splitlines()) == 2
    assert (out / "final" / "model.safetensors").exists()
    assert json.loads((out / "result.json").read_text())["status"] == "completed"
    assert "completed after 2 steps" in capsys.readouterr().out


def test_cli_bad_data_names_line_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    out = tmp_path / "runs" / "bad"
    rc = cli(["train", "--model", "tiny", "--data", str(data), "--out", str(out), "--no-progress"])
    assert rc == 2
    assert f"{data}:2: field 'completion'" in capsys.readouterr().err
    assert not out.exists()

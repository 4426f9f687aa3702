"""Adding a method is one record: a toy weight w = p^power registered in `sft.methods` trains
(`sft.trainer`) and forecasts (`sft.forecast_run`) with no other change; at power = 1 it is DFT."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from sft.methods import METHODS, Method, Param, register, unregister


def _pow_weight(ell, *, power, **_):
    return (-ell * power).exp()  # w = p^power


@pytest.fixture
def toy():
    rec = register(Method("toy_pow", "w = p^power (test)", _pow_weight,
                          (Param("power", 1.0, "exponent of p", 0, 10, arg="power"),)))
    yield rec
    unregister("toy_pow")
    assert "toy_pow" not in METHODS


def test_a_registered_method_trains_and_forecasts(toy, smoke_world, pretrained, tmp_path):
    from sft.world_runs import general_sample
    from sft.data import PadCollator, SFTDataset
    from sft.forecast import ForecastConfig
    from sft.forecast_run import forecast_grid
    from sft.models import token_nll
    from sft.trainer import TrainConfig, build_trainer, train

    model0, _, _ = pretrained
    w = smoke_world
    data = SFTDataset(w.d2_train)
    # the trainer's loss is sum_t p_t ell_t / N (hand formula at power 1)
    cfg = TrainConfig(method="toy_pow", lr=1e-3, max_steps=3, batch_size=8, out=str(tmp_path / "run"),
                      progress=False, save_final=False, logging_steps=1)
    trainer = build_trainer(cfg, copy.deepcopy(model0), data, pad_token_id=w.pad_id)
    batch = PadCollator(w.pad_id)(list(w.d2_train[:4]))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        nll, _ = token_nll(trainer.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert float(loss) == pytest.approx(float((torch.exp(-nll) * nll).sum() / nll.numel()), rel=1e-6)
    res = train(cfg, copy.deepcopy(model0), data, pad_token_id=w.pad_id)
    assert res.status == "completed" and res.global_step == 3
    stats = [json.loads(ln) for ln in res.token_stats_path.read_text().splitlines()]
    assert [s["method"] for s in stats] == ["toy_pow"] * 3 and all(0 < s["w_q100"] <= 1 for s in stats)
    # the forecast: the same weight, so the same numbers as DFT's
    fc = ForecastConfig(methods=("ce", "dft", "toy_pow"), lrs=(1e-3, 3e-3), steps=10, batch=8, n_batches=2, n_general=32,
                        probe_steps=4, pad_token_id=w.pad_id)
    rows = forecast_grid(model0, w.d2_train, general_sample(w, 32), fc, progress=False)["rows"]
    by = {(r["method"], r["lr"]): r for r in rows}
    for lr in fc.lrs:
        for key in ("dL_P1_bits", "domain_gain_bits"):
            assert by["toy_pow", lr][key] == by["dft", lr][key]
    assert by["toy_pow", 3e-3]["domain_gain_bits"] > 0

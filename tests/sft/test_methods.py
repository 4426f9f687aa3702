"""The method registry (`sft.methods`): hand values of every method's token weight, the loss and
the forecast use the same weight, the records drive `TrainConfig` and the trainer."""
from __future__ import annotations

import math

import pytest
import torch

from sft import losses as L
from sft.config import TrainConfig
from sft.forecast import ForecastConfig, gradient_scale
from sft.methods import METHODS, POST_HOC, Method, Param, forecast_methods, get_method, register, unregister

# ell = -log p at p = 1/2, 1/10, 1e-5; TALR at tau = 2 (w = p^(1/2), floored at 0.01); clip at 0.2.
ELL = torch.tensor([math.log(2), math.log(10), 5 * math.log(10)], dtype=torch.float64)
TAU = 2.0
HAND = {  # one hand-valued row per registered method: adding a method adds a row here
    "ce": [1.0, 1.0, 1.0],
    "talr": [math.sqrt(0.5), math.sqrt(0.1), 0.01],  # sqrt(1e-5) = 0.00316 < w_min
    "dft": [0.5, 0.1, 1e-5],
    "clip": [1.0, 0.0, 0.0],
    "flow": [1.0, 1.0, 1.0],  # FLOW's weights are per sequence (sft.weighting), tokens get CE's
    "l2": [1.0, 1.0, 1.0],
    "kl": [1.0, 1.0, 1.0],
    "lora": [1.0, 1.0, 1.0],
}


def test_every_registered_method_has_hand_values():
    assert set(HAND) == set(METHODS)


@pytest.mark.parametrize("name", list(HAND))
def test_token_weight_hand_values(name):
    w, tau = L.token_weights(name, ELL, torch.zeros(3, dtype=torch.long), 1, tau=TAU)
    assert w.tolist() == pytest.approx(HAND[name], rel=1e-12)
    assert (tau is not None) == (name == "talr")


@pytest.mark.parametrize("name", list(METHODS))
def test_forecast_scale_uses_the_loss_weight(name):
    """gradient_scale = phi(ell) / phi(ell0), phi = w(p) (1 - p), with w the loss's own weights."""
    ell0 = torch.tensor([0.3, 1.0, 1.5], dtype=torch.float64)  # p0 > 0.2: clip keeps every group
    ell = torch.tensor([0.1, 0.6, 1.2], dtype=torch.float64)
    seq = torch.zeros(3, dtype=torch.long)

    def phi(e):
        w, _ = L.token_weights(name, e, seq, 1, tau=TAU)
        return w * (1 - torch.exp(-e))

    want = phi(ell) / phi(ell0)
    got = gradient_scale(name, ell, ell0, TAU)
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-12)


def test_forecast_scale_hand_values():
    ell0, ell = torch.tensor([math.log(2)], dtype=torch.float64), torch.tensor([math.log(10 / 9)], dtype=torch.float64)
    # p: 1/2 -> 9/10. CE: (1/10) / (1/2); DFT: (9/10 * 1/10) / (1/2 * 1/2); TALR tau = 2: sqrt(9/10) / sqrt(1/2) x CE's
    assert float(gradient_scale("ce", ell, ell0, TAU)) == pytest.approx(0.2, rel=1e-12)
    assert float(gradient_scale("dft", ell, ell0, TAU)) == pytest.approx(0.36, rel=1e-12)
    assert float(gradient_scale("talr", ell, ell0, TAU)) == pytest.approx(0.2 * math.sqrt(1.8), rel=1e-12)


def test_records_hold_what_the_trainer_and_the_forecast_dispatch_on():
    assert tuple(METHODS) == ("ce", "talr", "dft", "clip", "flow", "l2", "kl", "lora")
    assert [n for n, m in METHODS.items() if m.is_loss] == list(L.METHOD_NAMES) == ["ce", "talr", "dft", "clip"]
    assert get_method("l2").regularizer == "l2" and get_method("kl").regularizer == "kl"
    assert get_method("lora").lora and get_method("flow").sequence_weights == "flow"
    assert forecast_methods() == ForecastConfig().methods == ("ce", "talr", "dft", "flow", "l2", "lora")
    assert {n: m.replay_gradients for n, m in METHODS.items() if m.forecast} == {
        "ce": "ce", "talr": "talr", "dft": "dft", "flow": "flow", "l2": "ce", "lora": "ce"}
    assert "wise_ft" in POST_HOC and "wise_ft" not in METHODS  # a merge after training, not a method
    with pytest.raises(ValueError, match=r"method 'sgd': expected one of \('ce', 'talr'"):
        get_method("sgd")


def test_train_config_takes_defaults_help_and_ranges_from_the_records():
    import dataclasses

    cfg = TrainConfig()
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    for m in METHODS.values():
        for p in m.params:
            assert getattr(cfg, p.name) == p.default and helps[p.name] == p.help
    assert TrainConfig(method="talr", w_min=0.05).weight_options() == {"w_min": 0.05}
    assert TrainConfig(method="clip", clip_threshold=0.3).weight_options() == {"threshold": 0.3}
    assert TrainConfig(method="l2").weight_options() == {}
    for bad, msg in [(dict(w_min=1.5), r"w_min"), (dict(clip_threshold=1.0), "clip_threshold"),
                     (dict(lora_r=0), "lora_r"), (dict(tau_scope="global"), "tau_scope"), (dict(tau=0.0), "tau"),
                     (dict(method="sgd"), "method 'sgd'")]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**bad)


def test_register_refuses_bad_records_and_unknown_options():
    with pytest.raises(ValueError, match="already registered"):
        register(Method("ce", "again"))
    with pytest.raises(ValueError, match="gradients_of"):
        register(Method("toy_bad", "x", gradients_of="nope"))
    with pytest.raises(ValueError, match="name"):
        register(Method("bad name", "x"))
    assert "toy_bad" not in METHODS
    with pytest.raises(TypeError, match="unknown weight options"):
        L.token_weights("ce", ELL, torch.zeros(3, dtype=torch.long), 1, power=2.0)
    with pytest.raises(ValueError, match="token-weighted loss alone"):
        L.compute_loss_func("l2")


def test_a_registered_weight_option_reaches_the_weight():
    """A toy record w = p^power with its own hyper-parameter: default from the record, or passed."""
    toy = Method("toy_pow", "w = p^power", lambda ell, *, power, **_: (-ell * power).exp(),
                 (Param("power", 0.5, "exponent of p", 0, 10, arg="power"),))
    register(toy)
    try:
        seq = torch.zeros(3, dtype=torch.long)
        w, _ = L.token_weights("toy_pow", ELL, seq, 1)
        assert w.tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(0.1), math.sqrt(1e-5)], rel=1e-12)
        w, _ = L.token_weights("toy_pow", ELL, seq, 1, power=1.0)
        assert w.tolist() == pytest.approx(HAND["dft"], rel=1e-12)
        assert TrainConfig(method="toy_pow").method_record is toy
        with pytest.raises(ValueError, match="power"):
            toy.param("power").check(11.0)
    finally:
        unregister("toy_pow")
    assert "toy_pow" not in METHODS


def test_readme_adding_a_method_runs_as_written():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Adding a method\n", 1)[1].split("\n## ", 1)[0]
    record, row = re.findall(r"```py\n(.*?)```", section, re.S)
    ns: dict = {"HAND": dict(HAND), "math": math}
    try:
        exec(compile(record, "README.md", "exec"), ns)
        exec(compile(row, "README.md", "exec"), ns)
        w, _ = L.token_weights("pow", ELL, torch.zeros(3, dtype=torch.long), 1)
        assert w.tolist() == pytest.approx(ns["HAND"]["pow"], rel=1e-12)
        assert TrainConfig(method="pow").method_record.param("power").default == 0.5
        assert "pow" in ForecastConfig().methods
    finally:
        unregister("pow")

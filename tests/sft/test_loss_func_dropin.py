"""TALR as a drop-in for transformers and TRL users: `sft.losses.compute_loss_func` passed to
`transformers.Trainer` and to TRL's `SFTTrainer` trains exactly as `sft.trainer.train` (float32
would do; float64 here so the comparison is tight), and `train()` takes a `datasets.Dataset`."""
import warnings

import pytest

from sft.data import PadCollator
from sft.losses import compute_loss_func
from sft.models import byte_tokenizer, load_tokenizer
from sft.trainer import TrainConfig, train, training_args

from tinyworld import make_dataset, make_model, max_param_diff, params


def _cfg(out, method="talr"):
    return TrainConfig(method=method, lr=3e-3, max_steps=3, batch_size=4, out=str(out), progress=False,
                       save_final=False, token_stats=False, seed=7)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """3 TALR steps of `sft.trainer.train` (chunked loss, our collator, seed 7)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return params(train(_cfg(out), make_model(), make_dataset(), pad_token_id=256).model)


def test_transformers_trainer_with_compute_loss_func_equals_train(tmp_path, reference):
    from transformers import Trainer

    model = make_model()
    Trainer(model=model, args=training_args(_cfg(tmp_path / "x"), tmp_path / "hf"), train_dataset=make_dataset(),
            data_collator=PadCollator(256), compute_loss_func=compute_loss_func("talr")).train()
    assert max_param_diff(params(make_model()), reference) > 1e-4  # training moved the weights
    assert max_param_diff(params(model), reference) < 1e-9
    model_ce = make_model()
    Trainer(model=model_ce, args=training_args(_cfg(tmp_path / "y"), tmp_path / "hf_ce"), train_dataset=make_dataset(),
            data_collator=PadCollator(256), compute_loss_func=compute_loss_func("ce")).train()
    assert max_param_diff(params(model_ce), reference) > 1e-6  # a different loss would not match


def test_trl_sft_trainer_with_compute_loss_func_equals_train(tmp_path, reference):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ds = make_dataset()
    data = Dataset.from_dict({"input_ids": [ex["input_ids"] for ex in ds],
                              "completion_mask": [[int(lab != -100) for lab in ex["labels"]] for ex in ds]})
    args = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3, learning_rate=3e-3,
                     lr_scheduler_type="cosine", optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, seed=7,
                     report_to="none", save_strategy="no", logging_steps=1, completion_only_loss=True, max_length=256,
                     disable_tqdm=True, use_cpu=True, bf16=False, gradient_checkpointing=False,
                     dataloader_pin_memory=False)
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL marks compute_loss_func deprecated (still supported in 1.x)
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=byte_tokenizer(),
                   compute_loss_func=compute_loss_func("talr")).train()
    assert max_param_diff(params(model), reference) < 1e-9


def test_train_accepts_a_datasets_dataset_tokenized_or_raw(tmp_path, reference):
    from datasets import Dataset

    ds = make_dataset()
    tokenized = Dataset.from_dict({"input_ids": [ex["input_ids"] for ex in ds], "labels": [ex["labels"] for ex in ds]})
    res = train(_cfg(tmp_path / "a"), make_model(), tokenized, pad_token_id=256)
    assert max_param_diff(params(res.model), reference) < 1e-12
    raw = Dataset.from_dict({"prompt": ["1+1=", "2+2="] * 4, "completion": ["2", "4"] * 4})
    res = train(_cfg(tmp_path / "b", "ce"), make_model(), raw, tokenizer=byte_tokenizer())
    assert res.status == "completed" and res.global_step == 3 and res.log_history[-1]["epoch"] == 1.5


def test_compute_loss_func_rejects_unknown_method():
    with pytest.raises(ValueError, match="expected one of"):
        compute_loss_func("flow")


def test_load_tokenizer_tiny_is_the_byte_tokenizer():
    tok = load_tokenizer("tiny")
    assert len(tok) == 260 and tok.decode(tok("héllo")["input_ids"]) == "héllo"
    assert load_tokenizer("tiny:hidden=32").get_vocab() == byte_tokenizer().get_vocab()

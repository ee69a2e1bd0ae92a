"""LLaDA adapter (GSAI-ML/LLaDA-8B-Base, -Instruct, LLaDA-1.5): OLMo-style config and parameter names over
the shared core. Full bidirectional attention, no logit shift, RoPE rotated in float32.

Only what differs from the core lives here: config field names, the checkpoint's tensor names, and where the
mask / stop ids are found (config.json, generation_config.json, the tokenizer's special tokens).
"""
from __future__ import annotations

import re

from dllm.errors import UnsupportedModelError
from dllm.models.spec import ArchConfig, ModelSpec
from dllm.models.tokens import token_id

# The chat template closes every turn with this token; it ends an answer like EOS does.
_END_OF_TURN = "<|eot_id|>"
_MASK_TOKEN = "<|mdm_mask|>"

_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "q_proj.weight": "attn.q_proj.weight", "q_proj.bias": "attn.q_proj.bias",
    "k_proj.weight": "attn.k_proj.weight", "k_proj.bias": "attn.k_proj.bias",
    "v_proj.weight": "attn.v_proj.weight", "v_proj.bias": "attn.v_proj.bias",
    "attn_out.weight": "attn.o_proj.weight",
    "ff_norm.weight": "mlp_norm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",  # SiLU is applied to ff_proj: it is the gate
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "model.transformer.wte.weight": "embed.weight",
    "model.transformer.ln_f.weight": "norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(.+)$")

# config.json settings the core does not implement, with the value the core assumes.
_REQUIRED = {
    "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
    "alibi": False, "attention_layer_norm": False, "scale_logits": False, "input_emb_norm": False,
}


class LLaDAAdapter:
    family = "llada"
    model_types = ("llada",)
    architectures = ("LLaDAModelLM",)

    def arch_config(self, cfg: dict) -> ArchConfig:
        for key, want in _REQUIRED.items():
            if key in cfg and cfg[key] != want:
                raise UnsupportedModelError(
                    f"this LLaDA checkpoint sets {key}={cfg[key]!r}; dllm supports only {key}={want!r} "
                    "(the layout of LLaDA-8B and LLaDA-1.5)")
        d_model, n_heads = cfg["d_model"], cfg["n_heads"]
        n_kv = cfg.get("n_kv_heads") or (1 if cfg.get("multi_query_attention") else n_heads)
        hidden = cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * d_model
        return ArchConfig(
            vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],
            hidden_size=d_model, num_layers=cfg["n_layers"], num_heads=n_heads, num_kv_heads=n_kv,
            head_dim=d_model // n_heads, intermediate_size=hidden,
            rope_theta=float(cfg.get("rope_theta", 10000.0)), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=cfg.get("max_sequence_length", 4096),
            qkv_bias=bool(cfg.get("include_qkv_bias") or cfg.get("include_bias")),
            tie_word_embeddings=bool(cfg.get("weight_tying", False)),
            rope_full_precision=bool(cfg.get("rope_full_precision", True)),
        )

    def map_name(self, name: str) -> str | None:
        if name in _TOP_NAMES:
            return _TOP_NAMES[name]
        m = _BLOCK_RE.match(name)
        if m and m.group(2) in _BLOCK_NAMES:
            return f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
        return None

    def spec(self, cfg: dict, gen_cfg: dict, tokenizer) -> ModelSpec:
        mask_id = cfg.get("mask_token_id")
        if mask_id is None:
            mask_id = token_id(tokenizer, _MASK_TOKEN)
        if mask_id is None:
            raise UnsupportedModelError(
                f"cannot find the mask token: config.json has no mask_token_id and the tokenizer has no {_MASK_TOKEN}")
        eos = gen_cfg.get("eos_token_id", cfg.get("eos_token_id", getattr(tokenizer, "eos_token_id", None)))
        eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        eot = token_id(tokenizer, _END_OF_TURN)
        stop_ids = tuple(dict.fromkeys(i for i in [*eos_ids, eot] if i is not None))
        pad = cfg.get("pad_token_id", getattr(tokenizer, "pad_token_id", None))
        return ModelSpec(
            family=self.family, mask_id=int(mask_id), stop_ids=stop_ids,
            pad_id=int(pad if pad is not None else eos_ids[0]),
            eos_id=eos_ids[0], eot_id=eot, bos_id=gen_cfg.get("bos_token_id", getattr(tokenizer, "bos_token_id", None)),
            shift_logits=False, attention="full", max_length=cfg.get("max_sequence_length", 4096),
            defaults={"max_tokens": 128, "block_length": 32},
        )

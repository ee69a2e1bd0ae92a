"""What Dream (Qwen2 layout) and SDAR (Qwen3 layout) share: Hugging Face Qwen config fields and tensor names,
and reading ids from the checkpoint. Each family adapter adds only its own differences."""
from __future__ import annotations

import re

from dllm.errors import UnsupportedModelError
from dllm.models.spec import ArchConfig
from dllm.models.tokens import id_list, token_id  # noqa: F401  (re-exported for the adapters)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
for _p in ("q", "k", "v", "o"):
    for _kind in ("weight", "bias"):
        _LAYER_NAMES[f"self_attn.{_p}_proj.{_kind}"] = f"attn.{_p}_proj.{_kind}"
_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}


def map_qwen_name(name: str) -> str | None:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def qwen_arch(cfg: dict, family: str, *, qkv_bias: bool, qk_norm: bool, norm_weight_fp32: bool = False) -> ArchConfig:
    if cfg.get("rope_scaling"):
        raise UnsupportedModelError(f"this {family} checkpoint sets rope_scaling={cfg['rope_scaling']!r}; dllm implements plain RoPE only")
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError(f"this {family} checkpoint uses sliding-window attention, which dllm does not implement")
    heads = cfg["num_attention_heads"]
    return ArchConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, intermediate_size=cfg["intermediate_size"],
        rope_theta=float(cfg.get("rope_theta", 10000.0)), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768), qkv_bias=qkv_bias, qk_norm=qk_norm,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_full_precision=False,
        norm_weight_fp32=norm_weight_fp32)


def generation_defaults(gen_cfg: dict) -> dict:
    """Sampling defaults a checkpoint declares in generation_config.json (only the fields dllm reads)."""
    out = {}
    if gen_cfg.get("do_sample", True) and gen_cfg.get("temperature") is not None:
        out["temperature"] = float(gen_cfg["temperature"])
    for name in ("top_p", "top_k"):
        if gen_cfg.get(name) is not None:
            out[name] = gen_cfg[name]
    return out

"""SDAR adapter (JetLM/SDAR-1.7B/4B/8B-Chat and the -b8...-b64 block variants): the Qwen3 layout (per-head
q/k RMSNorm before RoPE, no biases) over the shared core, block-causal attention with blocks aligned to absolute
position 0 (bidirectional inside a block, causal across blocks), native block size from config.json."""
from __future__ import annotations

from dllm.errors import UnsupportedModelError
from dllm.models.qwen import generation_defaults, id_list, map_qwen_name, qwen_arch, token_id
from dllm.models.spec import ArchConfig, ModelSpec

_MASK_TOKEN = "<|MASK|>"


class SDARAdapter:
    family = "sdar"
    model_types = ("sdar",)
    architectures = ("SDARForCausalLM",)

    def arch_config(self, cfg: dict) -> ArchConfig:
        # SDAR's RMSNorm is flash-attn's fused rms_norm_fn, which scales by the weight in float32.
        return qwen_arch(cfg, self.family, qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm=True,
                         norm_weight_fp32=True)

    def map_name(self, name: str) -> str | None:
        return map_qwen_name(name)

    def spec(self, cfg: dict, gen_cfg: dict, tokenizer) -> ModelSpec:
        mask_id = cfg.get("mask_token_id")
        if mask_id is None:  # some copies of the config lack it; the tokenizer names it
            mask_id = token_id(tokenizer, getattr(tokenizer, "mask_token", None)) or token_id(tokenizer, _MASK_TOKEN)
        if mask_id is None:
            raise UnsupportedModelError(f"cannot find the mask token: config.json has no mask_token_id and the tokenizer has no {_MASK_TOKEN}")
        eos = id_list(gen_cfg.get("eos_token_id", cfg.get("eos_token_id")))
        pad = gen_cfg.get("pad_token_id", cfg.get("pad_token_id", eos[-1] if eos else None))
        block = int(cfg.get("block_size", 4))
        return ModelSpec(
            family=self.family, mask_id=int(mask_id), stop_ids=tuple(eos), pad_id=int(pad),
            eos_id=int(cfg["eos_token_id"]) if cfg.get("eos_token_id") is not None else None,
            bos_id=cfg.get("bos_token_id"), shift_logits=False, attention="block_causal", native_block_size=block,
            max_length=cfg.get("max_position_embeddings", 32768),
            defaults={"max_tokens": 128, "block_length": block, **generation_defaults(gen_cfg)})


class SDARMoeAdapter:
    """Recognised so that the error is precise: the MoE variants are not built yet."""

    family = "sdar_moe"
    model_types = ("sdar_moe",)
    architectures = ("SDARMoeForCausalLM",)

    def arch_config(self, cfg: dict) -> ArchConfig:
        raise UnsupportedModelError(
            "SDAR MoE checkpoints (SDARMoeForCausalLM, e.g. SDAR-30B-A3B) are not supported yet; the dense SDAR "
            "models (SDAR-1.7B/4B/8B-Chat) are")

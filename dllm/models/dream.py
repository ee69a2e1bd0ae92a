"""Dream adapter (Dream-org/Dream-v0-Base-7B, -Instruct-7B, Dream-Coder): the Qwen2 layout (q/k/v biases,
GQA) over the shared core, full bidirectional attention, and Dream's logit rule: the token at position i is
predicted from hidden state i - 1 (Dream was adapted from the autoregressive Qwen2.5)."""
from __future__ import annotations

from dllm.errors import UnsupportedModelError
from dllm.models.qwen import generation_defaults, id_list, map_qwen_name, qwen_arch, token_id
from dllm.models.spec import ArchConfig, ModelSpec

_MASK_TOKEN = "<|mask|>"


class DreamAdapter:
    family = "dream"
    model_types = ("dream",)
    architectures = ("DreamModel",)

    def arch_config(self, cfg: dict) -> ArchConfig:
        return qwen_arch(cfg, self.family, qkv_bias=True, qk_norm=False)

    def map_name(self, name: str) -> str | None:
        return map_qwen_name(name)

    def spec(self, cfg: dict, gen_cfg: dict, tokenizer) -> ModelSpec:
        mask_id = cfg.get("mask_token_id", gen_cfg.get("mask_token_id"))
        if mask_id is None:
            mask_id = token_id(tokenizer, _MASK_TOKEN)
        if mask_id is None:
            raise UnsupportedModelError(f"cannot find the mask token: config.json has no mask_token_id and the tokenizer has no {_MASK_TOKEN}")
        eos = id_list(gen_cfg.get("eos_token_id", cfg.get("eos_token_id")))
        pad = cfg.get("pad_token_id", gen_cfg.get("pad_token_id", eos[0] if eos else None))
        defaults = generation_defaults(gen_cfg)
        for name in ("alg", "alg_temp", "eps"):
            if gen_cfg.get(name) is not None:
                defaults[name] = gen_cfg[name]
        return ModelSpec(
            family=self.family, mask_id=int(mask_id), stop_ids=tuple(eos), pad_id=int(pad),
            eos_id=eos[0] if eos else None, bos_id=cfg.get("bos_token_id"), shift_logits=True, attention="full",
            max_length=cfg.get("max_position_embeddings", 131072), defaults={"max_tokens": 128, **defaults})

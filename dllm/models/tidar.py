"""TiDAR adapter (Think in Diffusion, Talk in Autoregression, arXiv 2511.08923): a causal LM in the Qwen2 layout
(q/k/v biases, GQA) over the shared core, continued-pretrained to also pre-draft the next tokens by one-step
diffusion. config.json marks it (`model_type` tidar) and names its draft length and block size.

Attention pattern of a TiDAR step (built by `decoding/tidar.py`, trained by `dllm.train.objectives.tidar`):
  prefix and drafts      causal (the AR half: the token at i is predicted from position i, as any causal LM);
  pre-draft blocks       `block_size` MASK tokens each, bidirectional inside the block, seeing the prefix and the
                         drafts they are conditioned on, invisible to every other block (the diffusion half: the
                         MASK at position i predicts the token at i).
"""
from __future__ import annotations

from dllm.errors import UnsupportedModelError
from dllm.models.qwen import generation_defaults, id_list, map_qwen_name, qwen_arch
from dllm.models.spec import ArchConfig, ModelSpec


class TiDARAdapter:
    family = "tidar"
    model_types = ("tidar",)
    architectures = ("TiDARForCausalLM",)

    def arch_config(self, cfg: dict) -> ArchConfig:
        return qwen_arch(cfg, self.family, qkv_bias=bool(cfg.get("attention_bias", True)), qk_norm=False)

    def map_name(self, name: str) -> str | None:
        return map_qwen_name(name)

    def spec(self, cfg: dict, gen_cfg: dict, tokenizer) -> ModelSpec:
        if cfg.get("mask_token_id") is None:
            raise UnsupportedModelError("this TiDAR checkpoint's config.json has no mask_token_id")
        draft, block = int(cfg.get("draft_length", 8)), int(cfg.get("block_size", 9))
        if not 1 <= draft < block:
            raise UnsupportedModelError(f"this TiDAR checkpoint has draft_length {draft} and block_size {block}; "
                                        "it needs 1 <= draft_length < block_size")
        eos = id_list(gen_cfg.get("eos_token_id", cfg.get("eos_token_id")))
        pad = cfg.get("pad_token_id", gen_cfg.get("pad_token_id", eos[0] if eos else None))
        return ModelSpec(
            family=self.family, mask_id=int(cfg["mask_token_id"]), stop_ids=tuple(eos), pad_id=int(pad),
            eos_id=eos[0] if eos else None, bos_id=cfg.get("bos_token_id"), shift_logits=True, attention="tidar",
            native_block_size=block, max_length=cfg.get("max_position_embeddings", 32768),
            defaults={"max_tokens": 128, "draft_length": draft, **generation_defaults(gen_cfg)})

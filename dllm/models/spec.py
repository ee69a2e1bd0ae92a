"""What the runtime needs to know about a checkpoint, normalised across families.

`ArchConfig` describes the transformer's shape (the core builds itself from it). `ModelSpec` carries the
facts the engine and the strategies use: mask id, stop ids, logit alignment, attention pattern and the
decoding defaults. Both are filled by a family adapter from the checkpoint's own files; nothing here holds
a token id of any real model.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool = False
    qk_norm: bool = False           # per-head RMSNorm on q and k before RoPE (Qwen3 / SDAR)
    tie_word_embeddings: bool = False
    rope_full_precision: bool = True  # rotate q/k in float32 (LLaDA's `rope_full_precision`)
    norm_weight_fp32: bool = False    # RMSNorm scales by its weight before casting back (SDAR's fused rms_norm_fn)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        attn += d * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
        attn += 2 * d if self.qk_norm else 0
        mlp = 3 * h * self.intermediate_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + head + self.num_layers * (attn + mlp + 2 * h) + h


@dataclass(frozen=True)
class ModelSpec:
    """Checkpoint facts for decoding. `stop_ids` end a row; `eos_id`/`eot_id` feed LLaDA's EOS/EoT flags."""

    family: str
    mask_id: int
    stop_ids: tuple[int, ...]
    pad_id: int
    eos_id: int | None = None
    eot_id: int | None = None
    bos_id: int | None = None
    shift_logits: bool = False      # Dream: the token at i is predicted from hidden state i-1
    attention: str = "full"         # "full" (LLaDA, Dream) | "block_causal" (SDAR)
    native_block_size: int | None = None
    max_length: int = 4096
    defaults: dict = field(default_factory=dict)  # SamplingParams field -> default for this checkpoint

    def __post_init__(self) -> None:
        if self.pad_id == self.mask_id:
            raise ValueError(
                f"the checkpoint's pad id equals its mask id ({self.mask_id}); set a different pad_token_id "
                "in config.json so that padding is not mistaken for positions to decode")

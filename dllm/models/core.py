"""The one transformer core shared by every family: RMSNorm, RoPE, SwiGLU MLP, MHA/GQA, optional qkv bias
and per-head q/k norm.

Parameter names are the core's own (`embed`, `layers.N.q_proj`, ...); family adapters translate checkpoint
names to these. The core is bidirectional by itself: which keys a query may see, and where keys/values are
stored between steps, is decided by the `AttentionPlan` passed to `forward` (see `dllm/attention.py`).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from dllm.attention import AttentionPlan, attend
from dllm.models.spec import ArchConfig


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, then scaled by the weight (HF
    LLaMA/Qwen order); with `weight_fp32` scaled first and cast after (flash-attn's rms_norm_fn, used by SDAR)."""

    def __init__(self, dim: int, eps: float, weight_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.weight_fp32 = eps, weight_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_fp32:
            return (self.weight.float() * x).to(dtype)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """NeoX / Hugging Face rotate-half RoPE, inv_freq = 1 / theta^(2i/d), angles computed in float32.

    Angles are computed from the positions of each forward (an outer product, as LLaDA's table is), so no
    table has to be sized ahead and nothing synchronises with the host.
    """

    def __init__(self, head_dim: int, theta: float, full_precision: bool):
        super().__init__()
        self.head_dim, self.theta, self.full_precision = head_dim, theta, full_precision

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, L] -> cos, sin [B, 1, L, D] in float32."""
        exponent = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponent)
        freqs = positions.float()[..., None] * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        return angles.cos(), angles.sin()

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.full_precision:
            x = x.float()
        else:
            cos, sin = cos.to(dtype), sin.to(dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_weight_fp32) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_weight_fp32) if cfg.qk_norm else None

    def forward(self, x, rotary: Rotary, rope: tuple, plan: AttentionPlan | None, layer: int) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotary.rotate(q.transpose(1, 2), *rope)  # [B, H, L, D]
        k = rotary.rotate(k.transpose(1, 2), *rope)  # [B, Hkv, L, D]
        if plan is None:
            out = attend(q, k, v, None)
        elif hasattr(plan, "attention"):     # a plan that inspects or reshapes attention (e.g. Elastic-Cache)
            out = plan.attention(layer, q, k, v)
        else:
            k, v = plan.kv(layer, k, v)
            out = attend(q, k, v, plan.attn_mask)  # [B, H, L, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        self.mlp = MLP(cfg)

    def forward(self, x, rotary, rope, plan, layer):
        x = x + self.attn(self.attn_norm(x), rotary, rope, plan, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Pre-norm decoder stack. `forward` returns logits only for `logits_range` of the fed positions."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_full_precision)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan | None = None,
                logits_range: tuple[int, int] | None = None, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [B, L] -> logits [B, L', V] for the fed positions in `logits_range` (a slice) or
        `logits_index` ([B, L'] indices into the fed positions), default all L.

        A plan with `layer_input(layer, x, positions)` may change, before each layer, which hidden states go
        through it (e.g. Elastic-Cache switching from a window to every position); it returns (x, positions)
        and the rotary angles follow the positions."""
        x = self.embed(input_ids)
        rope = self.rotary.angles(positions)
        layer_input = getattr(plan, "layer_input", None)
        for i, layer in enumerate(self.layers):
            if layer_input is not None:
                x, new_positions = layer_input(i, x, positions)
                if new_positions is not positions:
                    positions, rope = new_positions, self.rotary.angles(new_positions)
            x = layer(x, self.rotary, rope, plan, i)
        if layer_input is not None:
            x, _ = layer_input(len(self.layers), x, positions)
        if logits_range is not None:
            x = x[:, logits_range[0]:logits_range[1]]
        if logits_index is not None:
            x = x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))
        return self.lm_head(self.norm(x))

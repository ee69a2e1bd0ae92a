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

from dllm import ops
from dllm.attention import AttentionPlan, attend, head_major_queries
from dllm.models.spec import ArchConfig
from dllm.parallel import TPInfo, head_range, kv_head_range, split_range


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to the input dtype, then scaled by the weight (HF
    LLaMA/Qwen order); with `weight_fp32` scaled first and cast after (flash-attn's rms_norm_fn, used by SDAR)."""

    def __init__(self, dim: int, eps: float, weight_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.weight_fp32 = eps, weight_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.weight_fp32)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)) in one pass."""
        return ops.add_rms_norm(x, delta, self.weight, self.eps, self.weight_fp32)


class Rotary(nn.Module):
    """NeoX / Hugging Face rotate-half RoPE, inv_freq = 1 / theta^(2i/d), angles computed in float32.

    A forward rotates by rows of a cos/sin table: either the runner's precomputed table indexed by position
    (no per-step trigonometry, graph-friendly), or, for a caller that gives none, a table of the forward's own
    positions computed on the spot. Both give the same values: the same float32 outer product, then cos/sin.
    """

    def __init__(self, head_dim: int, theta: float, full_precision: bool):
        super().__init__()
        self.head_dim, self.theta, self.full_precision = head_dim, theta, full_precision

    def table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, D] float32 for positions 0..length-1."""
        return ops.rope_table(length, self.head_dim, self.theta, device)

    def inputs(self, positions: torch.Tensor, table: tuple | None) -> tuple:
        """(row index [B, L], cos table, sin table) for `ops.rope`."""
        if table is not None:
            return (positions, *table)
        b, n = positions.shape
        exponent = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float) / self.head_dim
        freqs = positions.reshape(-1).float()[:, None] * (1.0 / (self.theta ** exponent))
        angles = torch.cat((freqs, freqs), dim=-1)                                  # [B * L, D]
        rows = torch.arange(b * n, device=positions.device).view(b, n)
        return rows, angles.cos(), angles.sin()


class Attention(nn.Module):
    """Multi-head attention over this rank's heads (all of them without tensor parallelism); the output
    projection's partial sums are all-reduced across ranks."""

    def __init__(self, cfg: ArchConfig, tp: TPInfo = TPInfo()):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.tp = tp
        self.num_heads, self.num_kv_heads = head_range(cfg, tp)[1], kv_head_range(cfg, tp)[1]
        self.head_dim = d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.qkv_bias)
        self.qkv_proj: nn.Linear | None = None   # set by `fuse()`: one matmul instead of three
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_weight_fp32) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_weight_fp32) if cfg.qk_norm else None

    def fuse(self) -> None:
        if self.qkv_proj is None:
            self.qkv_proj = _fused_linear([self.q_proj, self.k_proj, self.v_proj])
            self.q_proj = self.k_proj = self.v_proj = None

    def project(self, x: torch.Tensor):
        b, n, _ = x.shape
        if self.qkv_proj is not None:
            d = self.head_dim
            q, k, v = self.qkv_proj(x).split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.view(b, n, self.num_heads, self.head_dim), k.view(b, n, self.num_kv_heads, self.head_dim),
                v.view(b, n, self.num_kv_heads, self.head_dim))

    def forward(self, x, rotary: Rotary, rope: tuple, plan: AttentionPlan | None, layer: int) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.project(x)                                  # [B, L, H|Hkv, D]
        norms = None
        if self.q_norm is not None:   # normed inside the rotary kernel
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.q_norm.weight_fp32)
        mask = getattr(plan, "attn_mask", None)
        head_major = head_major_queries(mask, self.num_heads // self.num_kv_heads)
        store = plan.store(layer) if hasattr(plan, "store") else None
        if store is not None:   # the plan's buffers take the fed K/V from the rotary kernel, attention reads them
            k_buffer, v_buffer, columns = store
            q = ops.rope_store(q, k, v, *rope, rotary.full_precision, norms, k_buffer, v_buffer, columns, head_major)
            out = attend(q.transpose(1, 2), k_buffer, v_buffer, mask)
            return self.tp.all_reduce(self.o_proj(out.transpose(1, 2).reshape(b, n, -1)))
        q, k = ops.rope(q, k, *rope, rotary.full_precision, norms, head_major)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H|Hkv, L, D] views
        if plan is None:
            out = attend(q, k, v, None)
        elif hasattr(plan, "attention"):     # a plan that inspects or reshapes attention (e.g. Elastic-Cache)
            out = plan.attention(layer, q, k, v)
        else:
            k, v = plan.kv(layer, k, v)
            out = attend(q, k, v, mask)  # [B, H, L, D]
        return self.tp.all_reduce(self.o_proj(out.transpose(1, 2).reshape(b, n, -1)))


class MLP(nn.Module):
    """SwiGLU over this rank's share of the intermediate features; the down projection is all-reduced."""

    def __init__(self, cfg: ArchConfig, tp: TPInfo = TPInfo()):
        super().__init__()
        inner = split_range(cfg.intermediate_size, tp)[1]
        self.tp = tp
        self.gate_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.gate_up_proj: nn.Linear | None = None   # set by `fuse()`
        self.down_proj = nn.Linear(inner, cfg.hidden_size, bias=False)

    def fuse(self) -> None:
        if self.gate_up_proj is None:
            self.gate_up_proj = _fused_linear([self.gate_proj, self.up_proj])
            self.gate_proj = self.up_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.tp.all_reduce(self.down_proj(ops.silu_mul(self.gate_up_proj(x))))
        return self.tp.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TPInfo = TPInfo()):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        self.attn = Attention(cfg, tp)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        self.mlp = MLP(cfg, tp)

    def forward(self, x, rotary, rope, plan, layer, delta=None):
        """The layer's output as (h, delta), whose sum it is: the residual add is left to the next norm, which
        does it in its own pass (`add_forward`). `delta`: the previous layer's, if not yet added to x."""
        x, normed = (x, self.attn_norm(x)) if delta is None else self.attn_norm.add_forward(x, delta)
        h, normed = self.mlp_norm.add_forward(x, self.attn(normed, rotary, rope, plan, layer))
        return h, self.mlp(normed)


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the parts' outputs concatenated (weights stacked on the output dimension)."""
    weight = torch.cat([p.weight for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


class VocabEmbedding(nn.Embedding):
    """Token embedding; under tensor parallelism each rank holds a slice of the vocabulary, looks up the ids in
    it (zeros for the others) and the ranks' rows are summed."""

    def __init__(self, cfg: ArchConfig, tp: TPInfo = TPInfo()):
        self.first, rows = split_range(cfg.vocab_size, tp)
        super().__init__(rows, cfg.hidden_size)
        self.tp = tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.first
        outside = (local < 0) | (local >= self.num_embeddings)
        x = super().forward(local.masked_fill(outside, 0)).masked_fill(outside[..., None], 0)
        return self.tp.all_reduce(x)


class Transformer(nn.Module):
    """Pre-norm decoder stack. `forward` returns logits only for `logits_range` of the fed positions (under
    tensor parallelism, this rank's slice of the vocabulary; the runner gathers them)."""

    def __init__(self, cfg: ArchConfig, tp: TPInfo = TPInfo()):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.embed = VocabEmbedding(cfg, tp)
        self.layers = nn.ModuleList(Block(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        self.lm_head = nn.Linear(cfg.hidden_size, split_range(cfg.vocab_size, tp)[1], bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_full_precision)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def fuse(self) -> "Transformer":
        """Fuse q/k/v and gate/up into one matmul each (inference; the checkpoint's names stay those of the parts
        until this is called, so loading, training and export are unaffected). Idempotent."""
        for layer in self.layers:
            layer.attn.fuse()
            layer.mlp.fuse()
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan | None = None,
                logits_range: tuple[int, int] | None = None, logits_index: torch.Tensor | None = None,
                rope_table: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids, positions [B, L] -> logits [B, L', V] for the fed positions in `logits_range` (a slice) or
        `logits_index` ([B, L'] indices into the fed positions), default all L. `rope_table`: cos, sin [P, D]
        covering every position fed (the runner's); None computes the angles of `positions` on the spot.

        A plan with `layer_input(layer, x, positions)` may change, before each layer, which hidden states go
        through it (e.g. Elastic-Cache switching from a window to every position); it returns (x, positions)
        and the rotary angles follow the positions."""
        x = self.embed(input_ids)
        rope = self.rotary.inputs(positions, rope_table)
        layer_input = getattr(plan, "layer_input", None)
        delta = None   # the last layer's output not yet added to x (the next norm adds it)
        for i, layer in enumerate(self.layers):
            if layer_input is not None:
                if delta is not None:
                    x, delta = x + delta, None
                x, new_positions = layer_input(i, x, positions)
                if new_positions is not positions:
                    positions, rope = new_positions, self.rotary.inputs(new_positions, rope_table)
            x, delta = layer(x, self.rotary, rope, plan, i, delta)
        if layer_input is not None:
            x, _ = layer_input(len(self.layers), x + delta, positions)
            delta = None
        parts = [x] if delta is None else [x, delta]
        if logits_range is not None:
            parts = [t[:, logits_range[0]:logits_range[1]] for t in parts]
        if logits_index is not None:
            parts = [t.gather(1, logits_index[..., None].expand(-1, -1, t.shape[-1])) for t in parts]
        normed = self.norm(parts[0]) if delta is None else self.norm.add_forward(*parts)[1]
        return self.lm_head(normed)

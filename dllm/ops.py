"""The transformer's pointwise operations, fused where it pays: RMSNorm (optionally with the residual add before
it), SiLU-and-multiply, and rotary embedding from a precomputed table.

Each op has one eager PyTorch definition (the reference; CPU always uses it) and, on CUDA with Triton installed,
one Triton kernel that does the same arithmetic in a single launch: at batch 1 a denoising step of an 8B model is
dominated by launch count, not bytes, and the eager RMSNorm alone is six kernels. The kernels keep the eager
rounding points (float32 inside, cast to the activation dtype where the eager code casts), so they differ from
the eager ops only by the order of a float32 reduction. `DLLM_DISABLE_TRITON=1` turns them off.

Shapes: x [..., D] with unit stride in the last dimension; rotary q/k [B, L, H, D] with a table [P, D].
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch; CPU machines run the eager definitions
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

# Tests set this to run the kernels on CPU tensors under TRITON_INTERPRET=1.
FORCE_TRITON = False


def use_triton(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether an op on x and its other operands takes the kernel: CUDA, every operand with unit stride in its
    last dimension, and no autograd (the kernels have no backward, so a forward that trains runs eager)."""
    if triton is None or os.environ.get("DLLM_DISABLE_TRITON") == "1":
        return False
    operands = (x, *others)
    if torch.is_grad_enabled() and any(t.requires_grad for t in operands):
        return False
    return (x.is_cuda or FORCE_TRITON) and all(t.stride(-1) == 1 for t in operands)


# ----------------------------------------------------------------------------------------------- RMSNorm

def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_fp32: bool) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, then scaled (HF LLaMA/Qwen order); with `weight_fp32`
    scaled in float32 first and cast after (flash-attn's rms_norm_fn, used by SDAR)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight_fp32:
        return (weight.float() * h).to(dtype)
    return weight * h.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_fp32: bool = False) -> torch.Tensor:
    if not use_triton(x, weight):
        return rms_norm_eager(x, weight, eps, weight_fp32)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_norm(x, None, weight, out, None, eps, weight_fp32)
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 weight_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)); the sum is rounded to x's dtype first, as the eager residual add is."""
    if not use_triton(x, delta, weight):
        h = x + delta
        return h, rms_norm_eager(h, weight, eps, weight_fp32)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_norm(x, delta, weight, out, total, eps, weight_fp32)
    return total, out


def _launch_norm(x, delta, weight, out, total, eps, weight_fp32):
    d = x.shape[-1]
    x2, o2 = x.reshape(-1, d), out.view(-1, d)
    n = x2.shape[0]
    if n == 0:
        return
    has_delta = delta is not None
    d2 = delta.reshape(-1, d) if has_delta else x2
    t2 = total.view(-1, d) if has_delta else o2
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(n,)](x2, d2, weight, o2, t2, x2.stride(0), d2.stride(0), d, eps,
                           HAS_DELTA=has_delta, WEIGHT_FP32=weight_fp32, BLOCK=block,
                           num_warps=4 if block <= 4096 else 8)


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, total_ptr, x_stride, d_stride, n_cols, eps,
                         HAS_DELTA: tl.constexpr, WEIGHT_FP32: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        keep = cols < n_cols
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * x_stride + cols, mask=keep, other=0.0)
        if HAS_DELTA:
            dx = tl.load(d_ptr + row * d_stride + cols, mask=keep, other=0.0)
            x = (x.to(tl.float32) + dx.to(tl.float32)).to(dtype)
            tl.store(total_ptr + row * n_cols + cols, x, mask=keep)
        h = x.to(tl.float32)
        mean = tl.sum(h * h, axis=0) / n_cols
        h = h * (1.0 / tl.sqrt(mean + eps))
        w = tl.load(w_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        if WEIGHT_FP32:
            y = (w * h).to(dtype)
        else:
            y = (w * h.to(dtype).to(tl.float32)).to(dtype)
        tl.store(out_ptr + row * n_cols + cols, y, mask=keep)


# ----------------------------------------------------------------------------------------------- SwiGLU

def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate, then up) -> silu(gate) * up, [..., I]."""
    if not use_triton(gate_up) or not gate_up.is_contiguous():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    i = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], i, dtype=gate_up.dtype, device=gate_up.device)
    n = out.numel()
    if n:
        block = 1024
        _silu_mul_kernel[(triton.cdiv(n, block),)](gate_up, out, n, i, BLOCK=block)
    return out


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, n, inner, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = idx < n
        row, col = idx // inner, idx % inner
        dtype = out_ptr.dtype.element_ty
        g = tl.load(x_ptr + row * 2 * inner + col, mask=keep, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * 2 * inner + inner + col, mask=keep, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        tl.store(out_ptr + idx, (s * u).to(dtype), mask=keep)


# ----------------------------------------------------------------------------------------------- RoPE

def rope_table(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, D] in float32 for positions 0..length-1 (NeoX rotate-half layout, inv_freq =
    1 / theta^(2i/D)), computed exactly as the per-forward angles were: float32 outer product, then cos/sin."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    freqs = torch.arange(length, device=device).float()[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def rope_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """x [B, L, H, D]; cos/sin [B, L, 1, D] float32. Rotated in float32 (`full_precision`, LLaDA) or in x's dtype
    with the table cast to it (HF Qwen2/Dream/SDAR)."""
    dtype = x.dtype
    if full_precision:
        x = x.float()
    else:
        cos, sin = cos.to(dtype), sin.to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(dtype)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         full_precision: bool, norms: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, L, H, D] and k [B, L, Hkv, D] by the table rows of `positions` [B, L]; contiguous outputs in
    the same layout. `norms` = (q weight, k weight, eps, weight_fp32): RMSNorm each head of q and k first (Qwen3's
    and SDAR's q/k norms), in the same kernel, so strided q/k views are neither copied nor launched on twice."""
    if not use_triton(q, k, *(norms[:2] if norms is not None else ())):
        if norms is not None:
            qw, kw, eps, weight_fp32 = norms
            q, k = rms_norm_eager(q, qw, eps, weight_fp32), rms_norm_eager(k, kw, eps, weight_fp32)
        c, s = cos[positions][:, :, None], sin[positions][:, :, None]
        return rope_eager(q, c, s, full_precision), rope_eager(k, c, s, full_precision)
    b, n, h, d = q.shape
    hkv = k.shape[2]
    q_out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(b, n, hkv, d, dtype=k.dtype, device=k.device)
    if b * n:
        pos = positions.reshape(-1)
        if not pos.is_contiguous():
            pos = pos.contiguous()
        qw, kw, eps, weight_fp32 = norms if norms is not None else (q, k, 0.0, False)
        _rope_kernel[(b * n, h + hkv)](q, k, q_out, k_out, pos, cos, sin, qw, kw, eps, n, h, q.stride(0),
                                       q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), HALF=d // 2,
                                       FULL_PRECISION=full_precision, NORM=norms is not None,
                                       WEIGHT_FP32=weight_fp32, enable_fp_fusion=False)
    return q_out, k_out


if triton is not None:
    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, eps, seq, n_heads,
                     qs0, qs1, qs2, ks0, ks1, ks2, HALF: tl.constexpr, FULL_PRECISION: tl.constexpr,
                     NORM: tl.constexpr, WEIGHT_FP32: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        b, t = token // seq, token % seq
        if head < n_heads:
            src = q_ptr + b * qs0 + t * qs1 + head * qs2
            dst = qo_ptr + (token * n_heads + head) * 2 * HALF
            w_ptr = qw_ptr
        else:
            n_kv = tl.num_programs(1) - n_heads
            src = k_ptr + b * ks0 + t * ks1 + (head - n_heads) * ks2
            dst = ko_ptr + (token * n_kv + head - n_heads) * 2 * HALF
            w_ptr = kw_ptr
        dtype = qo_ptr.dtype.element_ty
        i = tl.arange(0, HALF)
        p = tl.load(pos_ptr + token).to(tl.int64)
        c1 = tl.load(cos_ptr + p * 2 * HALF + i)
        c2 = tl.load(cos_ptr + p * 2 * HALF + HALF + i)
        s1 = tl.load(sin_ptr + p * 2 * HALF + i)
        s2 = tl.load(sin_ptr + p * 2 * HALF + HALF + i)
        x1 = tl.load(src + i).to(tl.float32)
        x2 = tl.load(src + HALF + i).to(tl.float32)
        if NORM:            # the head's RMSNorm first, rounded as `_rms_norm_kernel` rounds it
            mean = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF)
            r = 1.0 / tl.sqrt(mean + eps)
            w1 = tl.load(w_ptr + i).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + i).to(tl.float32)
            if WEIGHT_FP32:
                x1 = (w1 * (x1 * r)).to(dtype).to(tl.float32)
                x2 = (w2 * (x2 * r)).to(dtype).to(tl.float32)
            else:
                x1 = (w1 * (x1 * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
                x2 = (w2 * (x2 * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        if FULL_PRECISION:  # float32 throughout, one cast at the end
            y1 = x1 * c1 + (-x2) * s1
            y2 = x2 * c2 + x1 * s2
        else:               # every product and the sum rounded to the activation dtype, as eager bf16 ops do
            c1, c2 = c1.to(dtype).to(tl.float32), c2.to(dtype).to(tl.float32)
            s1, s2 = s1.to(dtype).to(tl.float32), s2.to(dtype).to(tl.float32)
            y1 = (x1 * c1).to(dtype).to(tl.float32) + ((-x2) * s1).to(dtype).to(tl.float32)
            y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        tl.store(dst + i, y1.to(dtype))
        tl.store(dst + HALF + i, y2.to(dtype))

"""The transformer's pointwise operations, fused where it pays: RMSNorm (optionally with the residual add before
it), SiLU-and-multiply, and rotary embedding from a precomputed table.

Each op has one eager PyTorch definition (the reference; CPU always uses it) and, on CUDA with Triton installed,
one Triton kernel that does the same arithmetic in a single launch: at batch 1 a denoising step of an 8B model is
dominated by launch count, not bytes, and the eager RMSNorm alone is six kernels. The kernels keep the eager
rounding points (float32 inside, cast to the activation dtype where the eager code casts), so they differ from
the eager ops only by the order of a float32 reduction. `DLLM_DISABLE_TRITON=1` turns them off.

Shapes: x [..., D] with unit stride in the last dimension; rotary q/k [B, L, H, D] with a table [P, D]; K/V
buffers [B, Hkv, T, D] (`rope_store` writes the fed keys and values into them in the rotary kernel).
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
         full_precision: bool, norms: tuple | None = None, head_major: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, L, H, D] and k [B, L, Hkv, D] by the table rows of `positions` [B, L]. `norms` = (q weight,
    k weight, eps, weight_fp32): RMSNorm each head of q and k first (Qwen3's and SDAR's q/k norms), in the same
    kernel, so strided q/k views are neither copied nor launched on twice.

    The outputs have the inputs' shapes, contiguous; with `head_major` the kernel stores them [B, H, L, D]
    contiguous instead (returned as transposed views: the layout `attention.attend` wants for grouped heads
    under a mask, see `attention.head_major_queries`). The eager definition always returns them contiguous."""
    if not use_triton(q, k, *(norms[:2] if norms is not None else ())):
        return _rope_eager_norms(q, k, positions, cos, sin, full_precision, norms)
    q_out, k_out = _empty_like(q, head_major), _empty_like(k, head_major)
    _launch_rope(q, k, None, q_out, k_out, None, None, positions, cos, sin, full_precision, norms)
    return q_out, k_out


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, full_precision: bool, norms: tuple | None, k_buffer: torch.Tensor,
               v_buffer: torch.Tensor, columns: torch.Tensor, head_major: bool = False) -> torch.Tensor:
    """`rope`, with the rotated keys and the values [B, L, Hkv, D] written straight into K/V buffers
    [B, Hkv, T, D] at `columns` [B, L] (a token's column in its row's buffer) rather than returned: one kernel
    where the rotation and the two scatters into the cache were three. Returns q as `rope` does. (Fed tokens of a
    row given one column, as padding slots are, leave some one's key and some one's value there, not necessarily
    the same token's: such a column must be one nothing reads, as the scratch column is. Columns are not
    bounds-checked: they come from the runner's plans.)"""
    if not use_triton(q, k, v, k_buffer, v_buffer, *(norms[:2] if norms is not None else ())):
        q, k = _rope_eager_norms(q, k, positions, cos, sin, full_precision, norms)
        store_kv(k_buffer, v_buffer, columns, k.transpose(1, 2), v.transpose(1, 2))
        return q
    q_out = _empty_like(q, head_major)
    _launch_rope(q, k, v, q_out, k_buffer.transpose(1, 2), v_buffer.transpose(1, 2), columns, positions, cos, sin,
                 full_precision, norms)
    return q_out


def _empty_like(x: torch.Tensor, head_major: bool) -> torch.Tensor:
    """An uninitialised [B, L, H, D] tensor like x, contiguous or a view of [B, H, L, D] storage."""
    b, n, h, d = x.shape
    if head_major:
        return torch.empty(b, h, n, d, dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(b, n, h, d, dtype=x.dtype, device=x.device)


def store_kv(k_buffer: torch.Tensor, v_buffer: torch.Tensor, columns: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k/v [B, Hkv, L, D] into the buffers [B, Hkv, T, D] at `columns` [B, L]."""
    where = columns[:, None, :, None].expand(-1, k_buffer.shape[1], -1, k_buffer.shape[3])
    k_buffer.scatter_(2, where, k)
    v_buffer.scatter_(2, where, v)


def _rope_eager_norms(q, k, positions, cos, sin, full_precision, norms):
    if norms is not None:
        qw, kw, eps, weight_fp32 = norms
        q, k = rms_norm_eager(q, qw, eps, weight_fp32), rms_norm_eager(k, kw, eps, weight_fp32)
    c, s = cos[positions][:, :, None], sin[positions][:, :, None]
    return rope_eager(q, c, s, full_precision), rope_eager(k, c, s, full_precision)


def _launch_rope(q, k, v, q_out, k_out, v_out, columns, positions, cos, sin, full_precision, norms):
    """Outputs are [B, L|T, H|Hkv, D] with unit last stride: q_out at the token's own column, k_out (and v_out)
    at `columns` [B, L] (None: the token's own column)."""
    b, n, h, d = q.shape
    hkv = k.shape[2]
    tokens = b * n
    if tokens == 0:
        return
    pos = positions.reshape(-1)
    if not pos.is_contiguous():
        pos = pos.contiguous()
    qw, kw, eps, weight_fp32 = norms if norms is not None else (q, k, 0.0, False)
    # a program rotates a group of heads of one token: groups big enough to amortise the token's table reads,
    # small enough that a few tokens still fill the GPU (~264 programs: two per SM of an H100/H200)
    group = 1
    while group < 16 and tokens * triton.cdiv(h, group * 2) >= 264:
        group *= 2
    store = v is not None
    cols = columns if store else pos            # unused without a store
    vv, vo = (v, v_out) if store else (k, k_out)
    grid = (tokens, triton.cdiv(h, group) + triton.cdiv(hkv, group))
    _rope_kernel[grid](q, k, vv, q_out, k_out, vo, cols, pos, cos, sin, qw, kw, eps, n, h, hkv, triton.cdiv(h, group),
                       *_strides3(q), *_strides3(k), *_strides3(vv), *_strides3(q_out), *_strides3(k_out),
                       *_strides3(vo), cols.stride(0), cols.stride(-1) if store else 0,
                       HALF=d // 2, GROUP=group, FULL_PRECISION=full_precision, NORM=norms is not None,
                       WEIGHT_FP32=weight_fp32, STORE=store, enable_fp_fusion=False,
                       num_warps=1 if group * d <= 256 else 2 if group * d <= 1024 else 4)


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


if triton is not None:
    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, vo_ptr, col_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
                     eps, seq, n_heads, n_kv, q_groups, qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2, qos0, qos1, qos2,
                     kos0, kos1, kos2, vos0, vos1, vos2, cs0, cs1, HALF: tl.constexpr, GROUP: tl.constexpr,
                     FULL_PRECISION: tl.constexpr, NORM: tl.constexpr, WEIGHT_FP32: tl.constexpr,
                     STORE: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        group = tl.program_id(1)
        b, t = token // seq, token % seq
        i = tl.arange(0, HALF)[None, :]
        if group < q_groups:                     # query heads
            heads = (group * GROUP + tl.arange(0, GROUP)[:, None]).to(tl.int64)
            keep = heads < n_heads
            src = q_ptr + b * qs0 + t * qs1 + heads * qs2
            dst = qo_ptr + b * qos0 + t * qos1 + heads * qos2
            w_ptr = qw_ptr
        else:                                    # key heads: at the token's column of its row's buffer
            heads = ((group - q_groups) * GROUP + tl.arange(0, GROUP)[:, None]).to(tl.int64)
            keep = heads < n_kv
            if STORE:
                col = tl.load(col_ptr + b * cs0 + t * cs1).to(tl.int64)
            else:
                col = t
            src = k_ptr + b * ks0 + t * ks1 + heads * ks2
            dst = ko_ptr + b * kos0 + col * kos1 + heads * kos2
            w_ptr = kw_ptr
            if STORE:                            # the values go along unchanged
                j = tl.arange(0, 2 * HALF)[None, :]
                val = tl.load(v_ptr + b * vs0 + t * vs1 + heads * vs2 + j, mask=keep)
                tl.store(vo_ptr + b * vos0 + col * vos1 + heads * vos2 + j, val, mask=keep)
        dtype = qo_ptr.dtype.element_ty
        p = tl.load(pos_ptr + token).to(tl.int64)
        c1 = tl.load(cos_ptr + p * 2 * HALF + i)
        c2 = tl.load(cos_ptr + p * 2 * HALF + HALF + i)
        s1 = tl.load(sin_ptr + p * 2 * HALF + i)
        s2 = tl.load(sin_ptr + p * 2 * HALF + HALF + i)
        x1 = tl.load(src + i, mask=keep, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + i, mask=keep, other=0.0).to(tl.float32)
        if NORM:            # each head's RMSNorm first, rounded as `_rms_norm_kernel` rounds it
            mean = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1))[:, None] / (2 * HALF)
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
        tl.store(dst + i, y1.to(dtype), mask=keep)
        tl.store(dst + HALF + i, y2.to(dtype), mask=keep)

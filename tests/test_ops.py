"""The fused Triton kernels of `dllm/ops.py` against their eager definitions, run on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, in a subprocess: the variable must be set before Triton is imported). On a GPU
the same kernels are compiled; tests/test_gpu.py checks them there.

The interpreter emulates bfloat16 by truncating float32 (the GPU rounds to nearest even), so bit-exactness is
asserted in float32 and closeness in bfloat16."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import torch
    from dllm import ops
    ops.FORCE_TRITON = True
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype):
        return (torch.randn(*shape, generator=g) * 3).to(dtype)

    def same(a, b, dtype):
        if dtype == torch.float32:
            assert torch.equal(a, b)
        else:
            close(a, b, dtype)

    def close(a, b, dtype):
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < tol, err

    for dtype in (torch.float32, torch.bfloat16):
        for weight_fp32 in (False, True):
            x, w = rand(3, 5, 48, dtype=dtype), rand(48, dtype=dtype)
            close(ops.rms_norm(x, w, 1e-6, weight_fp32), ops.rms_norm_eager(x, w, 1e-6, weight_fp32), dtype)
            d = rand(3, 5, 48, dtype=dtype)
            total, normed = ops.add_rms_norm(x, d, w, 1e-6, weight_fp32)
            same(total, x + d, dtype)
            close(normed, ops.rms_norm_eager(x + d, w, 1e-6, weight_fp32), dtype)
            strided = rand(4, 7, 2, 32, dtype=dtype)[:, :, 1]          # rows with a stride, as q/k norms see
            close(ops.rms_norm(strided, w[:32], 1e-6, weight_fp32),
                  ops.rms_norm_eager(strided, w[:32], 1e-6, weight_fp32), dtype)
        gu = rand(2, 3, 2 * 40, dtype=dtype)
        gate, up = gu.chunk(2, -1)
        close(ops.silu_mul(gu), torch.nn.functional.silu(gate) * up, dtype)
        cos, sin = ops.rope_table(64, 16, 10000.0, torch.device("cpu"))
        qkv = rand(2, 9, 6 + 2 + 2, 16, dtype=dtype)                      # q, k, v heads side by side
        q, k = qkv[:, :, :6], qkv[:, :, 6:8]
        pos = torch.randint(0, 64, (2, 9), generator=g)
        for full in (True, False):
            qr, kr = ops.rope(q, k, pos, cos, sin, full)
            c, s = cos[pos][:, :, None], sin[pos][:, :, None]
            want_q, want_k = ops.rope_eager(q, c, s, full), ops.rope_eager(k, c, s, full)
            assert qr.is_contiguous() and kr.is_contiguous()
            same(qr, want_q, dtype)
            same(kr, want_k, dtype)
            hq, hk = ops.rope(q, k, pos, cos, sin, full, None, True)       # stored head-major
            assert hq.transpose(1, 2).is_contiguous() and hk.transpose(1, 2).is_contiguous()
            same(hq, want_q, dtype)
            same(hk, want_k, dtype)
            # enough tokens that a program rotates a group of heads (16 here, most of them past the 6 or 2 there are)
            long_qkv, long_pos = rand(2, 140, 10, 16, dtype=dtype), torch.randint(0, 64, (2, 140), generator=g)
            lc, ls = cos[long_pos][:, :, None], sin[long_pos][:, :, None]
            lq, lk = ops.rope(long_qkv[:, :, :6], long_qkv[:, :, 6:8], long_pos, cos, sin, full)
            same(lq, ops.rope_eager(long_qkv[:, :, :6], lc, ls, full), dtype)
            same(lk, ops.rope_eager(long_qkv[:, :, 6:8], lc, ls, full), dtype)
            # rope_store: the rotated keys and the values written into K/V buffers at per-row columns
            v = qkv[:, :, 8:]
            columns = torch.stack([torch.randperm(20, generator=g)[:9] for _ in range(2)])
            for norms in (None, (rand(16, dtype=dtype), rand(16, dtype=dtype), 1e-6, False)):
                kb, vb = rand(2, 2, 20, 16, dtype=dtype), rand(2, 2, 20, 16, dtype=dtype)
                want_kb, want_vb = kb.clone(), vb.clone()
                want_q, want_k = ops.rope(q, k, pos, cos, sin, full, norms)
                ops.store_kv(want_kb, want_vb, columns, want_k.transpose(1, 2), v.transpose(1, 2))
                for head_major in (False, True):
                    got_q = ops.rope_store(q, k, v, pos, cos, sin, full, norms, kb, vb, columns, head_major)
                    assert (got_q.transpose(1, 2) if head_major else got_q).is_contiguous()
                    same(got_q, want_q, dtype)
                    same(kb, want_kb, dtype)
                    assert torch.equal(vb, want_vb)
            for weight_fp32 in (False, True):                          # q/k norms (Qwen3, SDAR) in the same kernel
                qw, kw = rand(16, dtype=dtype), rand(16, dtype=dtype)
                qr, kr = ops.rope(q, k, pos, cos, sin, full, (qw, kw, 1e-6, weight_fp32))
                # against the two kernels it replaces (the interpreter's truncating bf16 compounds over the
                # norm's and the rotation's roundings, so bf16 is compared kernel to kernel), and the eager ops
                want_q, want_k = ops.rope(ops.rms_norm(q, qw, 1e-6, weight_fp32),
                                          ops.rms_norm(k, kw, 1e-6, weight_fp32), pos, cos, sin, full)
                close(qr, want_q, dtype)
                close(kr, want_k, dtype)
                if dtype == torch.float32:
                    close(qr, ops.rope_eager(ops.rms_norm_eager(q, qw, 1e-6, weight_fp32), c, s, full), dtype)
                    close(kr, ops.rope_eager(ops.rms_norm_eager(k, kw, 1e-6, weight_fp32), c, s, full), dtype)

    # The kernels have no backward: a forward that trains takes the eager ops, so gradients reach every operand.
    x, w = torch.randn(3, 48, requires_grad=True), torch.randn(48, requires_grad=True)
    gu = torch.randn(3, 80, requires_grad=True)
    q, k = torch.randn(1, 3, 2, 16, requires_grad=True), torch.randn(1, 3, 1, 16, requires_grad=True)
    qr, kr = ops.rope(q, k, torch.arange(3)[None], cos, sin, True)
    qw = torch.randn(16, requires_grad=True)
    qn, _ = ops.rope(q.detach(), k.detach(), torch.arange(3)[None], cos, sin, True, (qw, qw, 1e-6, False))
    loss = ops.rms_norm(x, w, 1e-6).sum() + ops.add_rms_norm(x, x * 2, w, 1e-6)[1].sum() + ops.silu_mul(gu).sum()
    (loss + qr.sum() + kr.sum() + qn.sum()).backward()
    assert all(t.grad is not None for t in (x, w, gu, q, k, qw))
    with torch.no_grad():
        assert ops.use_triton(x)                      # inference still takes the kernels
    print("ok")
''')


def test_kernels_match_eager_ops():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]

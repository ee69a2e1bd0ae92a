"""Masked attention with grouped K/V heads on the GPU: the ways `dllm.attention.attend` can run one layer's
attention under a boolean mask, timed on LLaDA/SDAR-8B head shapes.

  expand   K/V heads repeated to the query heads (`repeat_interleave`), then SDPA with the mask
  grouped  the query heads of one K/V head stacked along the query axis, SDPA on the K/V as stored
  nomask   SDPA with no mask and `enable_gqa` (flash), the floor a mask-free forward gets
  flex     FlexAttention (compiled) with `enable_gqa` and a block mask built once from the boolean mask

Masks: `key` = [B, 1, 1, Lk] (keys past the read end hidden), `rows` = [B, 1, Lq, Lk] (block-causal).

    python benchmarks/attention_gqa.py

Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats=50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    h, hkv, d = 32, 8, 128
    g = h // hkv
    rows = []
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as exc:  # pragma: no cover - reported, the other columns still run
        print(f"FlexAttention unavailable: {exc}")
        flex = None
    for b, lq, lk in [(1, 4, 512), (8, 4, 512), (32, 4, 512), (64, 4, 512), (1, 32, 768), (8, 32, 768),
                      (32, 32, 768), (64, 32, 768), (8, 256, 768), (1, 128, 512)]:
        q = torch.randn(b, lq, h, d, device=dev, dtype=dt).transpose(1, 2)
        k = torch.randn(b, hkv, lk, d, device=dev, dtype=dt)
        v = torch.randn(b, hkv, lk, d, device=dev, dtype=dt)
        read = lk - 100
        for kind in ("key", "rows"):
            if kind == "key":
                mask = torch.zeros(b, 1, 1, lk, dtype=torch.bool, device=dev)
                mask[..., :read] = True
            else:
                mask = torch.zeros(b, 1, lq, lk, dtype=torch.bool, device=dev)
                mask[..., :read - lq] = True
                mask[..., read - lq:read] = torch.ones(lq, lq, dtype=torch.bool, device=dev)
            expand = lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                            attn_mask=mask)  # noqa: E731
            gm = mask if mask.shape[2] == 1 else mask.unsqueeze(2).expand(-1, -1, g, -1, -1).reshape(b, 1, g * lq, lk)
            grouped = lambda: F.scaled_dot_product_attention(q.reshape(b, hkv, g * lq, d), k, v,
                                                             attn_mask=gm).reshape(b, h, lq, d)  # noqa: E731
            nomask = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            flex_ms, flex_err = None, None
            if flex is not None:
                try:
                    dense = mask
                    if kind == "key":
                        mod = lambda bb, hh, qi, ki: dense[bb, 0, 0, ki]  # noqa: E731
                    else:
                        mod = lambda bb, hh, qi, ki: dense[bb, 0, qi, ki]  # noqa: E731
                    bm = create_block_mask(mod, b, None, lq, lk, device=dev)
                    run_flex = lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)  # noqa: E731
                    flex_err = (run_flex().float() - expand().float()).abs().max().item()
                    flex_ms = round(timed(run_flex), 4)
                except Exception as exc:  # pragma: no cover
                    print(f"flex failed for b{b} lq{lq} {kind}: {type(exc).__name__}: {str(exc)[:200]}")
            ref = expand()
            err = (grouped().float() - ref.float()).abs().max().item()
            row = {"batch": b, "lq": lq, "lk": lk, "mask": kind, "expand_ms": round(timed(expand), 4),
                   "grouped_ms": round(timed(grouped), 4), "nomask_ms": round(timed(nomask), 4),
                   "max_abs_diff": err, "flex_ms": flex_ms, "flex_max_abs_diff": flex_err}
            rows.append(row)
            print(f"b{b:<3d} lq {lq:<4d} lk {lk:<4d} {kind:4s}  expand {row['expand_ms']:.4f}  grouped "
                  f"{row['grouped_ms']:.4f}  nomask {row['nomask_ms']:.4f}  flex {flex_ms} ms   diff {err:.2e}", flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": [h, hkv, d],
                      "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())

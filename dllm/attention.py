"""Attention: the one call every layer makes, and the contract between the model and a KV cache.

The model never decides which keys a query sees. Each forward receives an `AttentionPlan` (built by a cache
policy, see `cache/base.py`) that, per layer, stores the freshly computed keys/values where the policy wants
them and returns the keys/values to attend to, plus a boolean mask. This module knows nothing about any
policy; it only runs scaled dot-product attention.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionPlan(Protocol):
    """Per-forward answer to "which K/V does each layer attend to".

    `attn_mask`: bool, broadcastable to [B, H, Lq, Lk], True = may attend; None = attend to everything; or the
    same made once a forward by `prepare_mask` for this model's query heads (additive, stacked for grouped heads).
    `kv(layer, k, v)`: k, v are the fed tokens' post-RoPE keys/values [B, Hkv, Lq, D]; returns the keys and
    values to attend to, [B, Hkv, Lk, D].
    """

    attn_mask: torch.Tensor | None

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    # Optional, looked up with hasattr/getattr by the model:
    #   store(layer) -> (k_buffer, v_buffer, columns) or None: instead of kv(), the model writes the fed keys and
    #       values into the buffers [B, Hkv, T, D] at `columns` [B, Lq] (in the rotary kernel) and attends to
    #       the whole buffers;
    #   attention(layer, q, k, v) -> out [B, H, Lq, D]: replaces kv() + attend() (a plan that needs the attention
    #       weights, or computes keys for some layers only);
    #   layer_input(layer, x, positions) -> (x, positions): called before each layer and once after the last
    #       (layer = num_layers); may change which positions' hidden states go through the next layer.


# How masked attention reads grouped K/V heads: "grouped" (query heads stacked, K/V read as stored) or "expand"
# (K/V heads repeated first); `benchmarks/attention_gqa.py` times both, `benchmarks/step_time.py --masked-gqa` too.
MASKED_GQA = "grouped"


def head_major_queries(mask: torch.Tensor | None, groups: int) -> bool:
    """Whether `attend` reads the queries as [B, H, Lq, D] contiguous (grouped heads under a mask: the query
    heads of a group are stacked along the query axis, a view of head-major storage and a copy of any other);
    elsewhere token-major queries ([B, Lq, H, D] storage) make the output token-major too, as the output
    projection reads it."""
    return mask is not None and groups > 1 and MASKED_GQA == "grouped"


def prepare_mask(mask: torch.Tensor | None, groups: int, lq: int, dtype: torch.dtype) -> torch.Tensor | None:
    """`mask` (bool, as `attend` takes it) in the form `attend` hands to SDPA for queries of `groups` x `lq`
    rows: additive, as SDPA turns a boolean mask into before its kernels, and, for grouped heads, repeated over
    the stacked query rows. A forward prepares it once for all its layers (`ModelRunner._plan`)
    instead of every layer converting and copying it again; `attend` takes a floating-point mask as prepared.

    Hidden keys get -inf, except for half-precision CUDA tensors, whose masked attention runs in cuDNN: there
    they get -65504, the finite value PyTorch has long given cuDNN for a boolean mask (its workaround for cuDNN's
    handling of -inf). For a query that sees any key the two weigh a hidden key exactly the same (exp underflows
    to 0, also across a leading tile of hidden keys); no query of ours sees none (a pad attends to itself)."""
    if mask is None:
        return None
    if groups > 1 and MASKED_GQA == "grouped":
        mask = _stacked(mask, groups, lq)
    hidden = -65504.0 if mask.is_cuda and dtype in (torch.float16, torch.bfloat16) else -torch.inf
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, hidden)


def _stacked(mask: torch.Tensor, groups: int, lq: int) -> torch.Tensor:
    """[B, 1, Lq, Lk] -> [B, 1, G * Lq, Lk], row g * Lq + i = query i of group member g (a per-key mask of one
    query row [B, 1, 1, Lk] broadcasts as it is)."""
    if mask.shape[2] == 1:
        return mask
    return mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, groups * lq, -1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D], mask bool [B|1, 1, Lq|1, Lk] (or `prepare_mask`'s) -> [B, H, Lq, D].

    PyTorch SDPA picks the kernel by device, dtype and mask. With no mask every key is visible and the flash
    kernel runs, reading grouped K/V heads in place (`enable_gqa`, no copy). With a mask the memory-efficient
    kernel runs, which has no grouped-head support; rather than expanding K/V heads (a copy of every layer's
    keys and values, which dominates a large batch's in-block step), the query heads that share a K/V head are
    stacked along the query axis: q [B, Hkv, G * Lq, D] against k/v [B, Hkv, Lk, D]. Each query row's softmax
    is over the same keys as before, so the result is the same attention; only the mask is repeated (G x
    [Lq, Lk] booleans, nothing when it is a per-key mask of one query row).
    """
    groups = q.shape[1] // k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=groups > 1)
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if MASKED_GQA == "expand":
        return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1),
                                              v.repeat_interleave(groups, dim=1), attn_mask=mask)
    b, h, lq, d = q.shape
    hkv = k.shape[1]
    if mask.dtype == torch.bool:   # (a prepared mask is stacked already)
        mask = _stacked(mask, groups, lq)
    out = F.scaled_dot_product_attention(q.reshape(b, hkv, groups * lq, d), k, v, attn_mask=mask)
    return out.reshape(b, h, lq, d)


def key_padding_mask(key_valid: torch.Tensor | None) -> torch.Tensor | None:
    """[B, Lk] bool (True = real token) -> [B, 1, 1, Lk] attention mask, or None when nothing is padded."""
    if key_valid is None:
        return None
    return key_valid[:, None, None, :]

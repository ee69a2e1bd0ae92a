"""`dllm.attention`: grouped K/V heads under a mask, and the mask a forward prepares once for all its layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dllm.attention import attend, head_major_queries, prepare_mask


def _reference(q, k, v, mask):
    """K/V heads repeated for their query heads, boolean mask as given."""
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          attn_mask=mask)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("per_query", [False, True])
def test_prepared_masks_attend_as_the_boolean_mask_does(heads, kv_heads, per_query):
    g = torch.Generator().manual_seed(0)
    b, lq, lk, d = 3, 5, 11, 16
    q = torch.randn(b, lq, heads, d, generator=g).transpose(1, 2)   # token-major storage, as the model's
    k, v = (torch.randn(b, kv_heads, lk, d, generator=g) for _ in range(2))
    mask = torch.rand(b, 1, lq if per_query else 1, lk, generator=g) > 0.4
    mask[..., 0] = True                                              # no query without a visible key
    want = _reference(q, k, v, mask)
    got = attend(q, k, v, mask)
    prepared = prepare_mask(mask, heads // kv_heads, lq, q.dtype)
    assert prepared.dtype == q.dtype and set(prepared.unique().tolist()) <= {0.0, -torch.inf}
    if head_major_queries(mask, heads // kv_heads):                  # the layout the model then stores q in
        q = q.contiguous()
    got_prepared = attend(q, k, v, prepared)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_prepared, got)

"""Fast-dLLM factor-based parallel decoding (arXiv 2505.22618 §3.3; NVlabs/Fast-dLLM
`get_transfer_index_dynamic`): with the block's masked confidences sorted, c(1) >= c(2) >= ..., commit the top
n for the largest n with (n + 1)(1 - c(n)) < factor, at least one.

As in the authors' code: the cut is the first 0-based rank i whose confidence falls below 1 - f / (i + 2)
(rank 0 always passes), and when that first failure is the last masked position, or nothing fails, every
masked position is committed."""
from __future__ import annotations

import torch

from dllm.decoding.base import Strategy, chosen_probability
from dllm.decoding.sampling import ranks

DEFAULT_FACTOR = 1.0


class FactorStrategy(Strategy):
    name = "factor"
    options = ("factor",)

    def choose(self, x0, probs, masked, generators) -> torch.Tensor:
        confidence = chosen_probability(x0, probs, masked)
        factor = self.params.factor if self.params.factor is not None else DEFAULT_FACTOR
        m = masked.sum(-1, keepdim=True)                                              # [B, 1]
        ordered = torch.sort(confidence, dim=-1, descending=True).values              # [B, Lb]
        i = torch.arange(confidence.shape[-1], device=confidence.device)[None, :]
        bound = (1 - factor / (i.double() + 2)).to(ordered.dtype).masked_fill(i == 0, -1.0)
        fail = (ordered < bound) & (i < m)
        first_fail = torch.where(fail.any(-1, keepdim=True), fail.int().argmax(-1, keepdim=True), m)
        cut = torch.where(first_fail >= m - 1, m, first_fail)
        return ranks(confidence) < cut

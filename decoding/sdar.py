"""SDAR's block sampler (JetAstra/SDAR `block_diffusion_generate`). Each block gets `steps` denoising steps
(SDAR's `denoising_steps`) with a fixed quota per step from the block length (n // s, the first n % s steps one
more); `remasking` picks the positions:
  sequential              the quota, leftmost masked positions first
  low_confidence_static   the quota, most confident first
  low_confidence_dynamic  every position with confidence > threshold (default 0.85) when that is at least the
                          quota, else the quota, most confident first (default)
  entropy_bounded         EB-Sampler (Ben-Hamu et al., arXiv 2505.24857): positions sorted by the entropy of
                          their predictive distribution, the largest prefix U with sum(H_U) - max(H_U) <= gamma
                          (`entropy_bound`, default 0.35), at least one. The authors' branch sums the entropy of
                          the chosen tokens' scalar probabilities over the block and never defines its commit
                          mask; this is the paper's rule.
Positions are only ever chosen among the masked ones: the authors' top-k can pick already-final positions when
the quota exceeds the masks left (e.g. the prompt's tail in the first block), overwriting them.
"""
from __future__ import annotations

import torch

from dllm.decoding.base import Strategy, chosen_probability
from dllm.decoding.sampling import ranks

DEFAULT_THRESHOLD = 0.85
DEFAULT_ENTROPY_BOUND = 0.35
REMASKING = ("low_confidence_dynamic", "low_confidence_static", "sequential", "entropy_bounded")


class SDARReference(Strategy):
    name = "reference"
    options = ("steps", "remasking", "threshold", "entropy_bound")
    families = ("sdar",)
    steps_mode = "per_block"
    remasking = REMASKING

    def max_forwards(self, block_length: int) -> int:
        return max(block_length, self.params.steps) + 1

    def begin_block(self, masked: torch.Tensor) -> None:
        super().begin_block(masked)
        n, s = self.params.block_length, self.params.steps
        self.quota = [n // s + (1 if j < n % s else 0) for j in range(s)]

    def choose(self, x0, probs, masked, generators) -> torch.Tensor:
        rule = self.params.remasking or "low_confidence_dynamic"
        if rule == "entropy_bounded":
            return self._entropy_bounded(probs, masked)
        q = self.quota[min(self.step_index, len(self.quota) - 1)]
        if rule == "sequential":
            order = torch.cumsum(masked.long(), dim=-1)                # 1-based rank among masked, left to right
            return masked & (order <= q)
        confidence = chosen_probability(x0, probs, masked)
        top = ranks(confidence) < q
        if rule == "low_confidence_static":
            return top
        threshold = self.params.threshold if self.params.threshold is not None else DEFAULT_THRESHOLD
        high = confidence > threshold
        return torch.where(high.sum(-1, keepdim=True) >= q, high, top)

    def _entropy_bounded(self, probs, masked) -> torch.Tensor:
        gamma = self.params.entropy_bound if self.params.entropy_bound is not None else DEFAULT_ENTROPY_BOUND
        p = probs.clamp_min(1e-12)
        entropy = (-(p * p.log()).sum(-1)).masked_fill(~masked, torch.inf)   # [B, Lb]
        ordered, order = torch.sort(entropy, dim=-1, stable=True)
        finite = torch.isfinite(ordered)
        ordered = ordered.masked_fill(~finite, 0.0)
        within = (torch.cumsum(ordered, -1) - torch.cummax(ordered, -1).values <= gamma) & finite
        k = within.sum(-1, keepdim=True).clamp(min=1)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return rank < k

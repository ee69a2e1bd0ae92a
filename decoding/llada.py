"""The reference LLaDA sampler (ML-GSAI/LLaDA `generate`): `steps` forwards split evenly over the blocks; at
each step a row commits a fixed quota of its most confident (or random) masked positions. The quota follows
LLaDA's linear schedule: a block with n masks over s steps commits n // s a step, the first n % s steps one
more (`get_num_transfer_tokens`)."""
from __future__ import annotations

import torch

from dllm.decoding.base import Strategy, chosen_probability
from dllm.decoding.sampling import rand_like_rows, ranks


def transfer_quota(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's `get_num_transfer_tokens`: masked [B, Lb] -> per-step quota [B, steps] (n // steps a step, the
    first n % steps steps one more)."""
    n = masked.sum(-1, keepdim=True)                                   # [B, 1]
    extra = torch.arange(steps, device=masked.device)[None, :] < n % steps
    return n // steps + extra.long()


class LLaDAReference(Strategy):
    name = "reference"
    options = ("steps", "remasking")
    families = ("llada",)
    steps_mode = "total"
    remasking = ("low_confidence", "random")
    confidence_dtype = None  # LLaDA takes the softmax in the logits' dtype

    def max_forwards(self, block_length: int) -> int:
        return max(block_length, self._steps_per_block())

    def _steps_per_block(self) -> int:
        return self.params.steps // (self.params.max_tokens // self.params.block_length)

    def begin_block(self, masked: torch.Tensor) -> None:
        super().begin_block(masked)
        self.quota = transfer_quota(masked, self._steps_per_block())

    def choose(self, x0, probs, masked, generators) -> torch.Tensor:
        if self.params.remasking == "random":
            confidence = rand_like_rows(tuple(masked.shape), generators, torch.float64, masked.device, self.active)
            confidence = confidence.masked_fill(~masked, -torch.inf)
        else:
            confidence = chosen_probability(x0, probs, masked)
        j = min(self.step_index, self.quota.shape[1] - 1)
        return ranks(confidence) < self.quota[:, j:j + 1]

    def select_rows(self, keep: torch.Tensor) -> None:
        self.quota = self.quota[keep]

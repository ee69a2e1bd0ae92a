"""The reference LLaDA sampler (ML-GSAI/LLaDA `generate`): `steps` forwards split evenly over the blocks; at
each step a row commits a fixed quota of its most confident (or random) masked positions. The quota follows
LLaDA's linear schedule: a block with n masks over s steps commits n // s a step, the first n % s steps one
more (`get_num_transfer_tokens`)."""
from __future__ import annotations

import torch

from decoding.base import Strategy
from decoding.sampling import ranks


class ReferenceStrategy(Strategy):
    name = "reference"
    uses_steps = True
    confidence_dtype = None  # LLaDA takes the softmax in the logits' dtype

    def begin_block(self, masked: torch.Tensor) -> None:
        super().begin_block(masked)
        num_blocks = self.params.max_tokens // self.params.block_length
        steps = self.params.steps // num_blocks
        n = masked.sum(-1, keepdim=True)                                   # [B, 1]
        extra = torch.arange(steps, device=masked.device)[None, :] < n % steps
        self.quota = n // steps + extra.long()                            # [B, steps]

    def choose(self, confidence: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        j = min(self.step_index, self.quota.shape[1] - 1)
        return ranks(confidence) < self.quota[:, j:j + 1]

    def select_rows(self, keep: torch.Tensor) -> None:
        self.quota = self.quota[keep]

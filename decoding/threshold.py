"""Fast-dLLM confidence-threshold parallel decoding (arXiv 2505.22618, Alg. 1; NVlabs/Fast-dLLM
`get_transfer_index` with `threshold`): commit every masked position of the block whose confidence is at least
the threshold, and always the most confident one, so each step makes progress. Default threshold 0.9 (§4.1)."""
from __future__ import annotations

import torch

from decoding.base import Strategy

DEFAULT_THRESHOLD = 0.9


class ThresholdStrategy(Strategy):
    name = "threshold"

    def choose(self, confidence: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        threshold = self.params.threshold if self.params.threshold is not None else DEFAULT_THRESHOLD
        commit = confidence >= threshold
        best = torch.zeros_like(commit).scatter_(-1, confidence.argmax(-1, keepdim=True), True)
        return commit | best

"""Fast-dLLM confidence-threshold parallel decoding (arXiv 2505.22618, Alg. 1; NVlabs/Fast-dLLM
`get_transfer_index` with `threshold`, and the same rule in its cached Dream path): commit every masked position
of the block whose confidence is at least the threshold, and always the most confident one, so each step makes
progress. Default threshold 0.9 (§4.1). Confidence is the probability of the proposed token under the family's
own proposal (LLaDA: float64 softmax; Dream: its `sample_tokens`)."""
from __future__ import annotations

import torch

from dllm.decoding.base import Strategy, chosen_probability

DEFAULT_THRESHOLD = 0.9


class ThresholdStrategy(Strategy):
    name = "threshold"
    options = ("threshold",)

    def choose(self, x0, probs, masked, generators) -> torch.Tensor:
        threshold = self.params.threshold if self.params.threshold is not None else DEFAULT_THRESHOLD
        confidence = chosen_probability(x0, probs, masked)
        best = torch.zeros_like(masked).scatter_(-1, confidence.argmax(-1, keepdim=True), True)
        return (confidence >= threshold) | best

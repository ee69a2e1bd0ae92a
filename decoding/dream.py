"""Dream's sampler (Dream-org `diffusion_generate` / `_sample`, and the same schedule in Fast-dLLM's cached
Dream path): a linear schedule t = 1 -> eps over the block's steps; at step i with t = ts[i], s = ts[i+1] a row
commits k = int(n (1 - s/t)) of its n masked positions (all of them at the last step), chosen by `alg`:
  origin        each masked position independently with probability 1 - s/t (random even at T = 0)
  maskgit_plus  top-k by the probability of the proposed token
  topk_margin   top-k by top-1 minus top-2 probability
  entropy       top-k by negative entropy, sum p log(p + 1e-10)
and with `alg_temp` > 0 the k positions are drawn from softmax(confidence / alg_temp) instead.

With one block spanning the generation (Dream's default) this is `diffusion_generate`, whose selection is global
over the canvas. Dream's k uses the batch's mean mask count; rows of one batch always hold equal counts here,
and the per-row count keeps a row independent of its neighbours.
"""
from __future__ import annotations

import torch

from dllm.decoding.base import Strategy, chosen_probability
from dllm.decoding.sampling import rand_like_rows, ranks

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


class DreamReference(Strategy):
    name = "reference"
    options = ("steps", "alg", "alg_temp", "eps")
    families = ("dream",)
    steps_mode = "total"

    def _steps_per_block(self) -> int:
        return self.params.steps // (self.params.max_tokens // self.params.block_length)

    def max_forwards(self, block_length: int) -> int:
        return self._steps_per_block() + 1

    def begin_block(self, masked: torch.Tensor) -> None:
        super().begin_block(masked)
        eps = self.params.eps if self.params.eps is not None else 1e-3
        self.timesteps = torch.linspace(1, eps, self._steps_per_block() + 1, device=masked.device)

    def choose(self, x0, probs, masked, generators) -> torch.Tensor:
        i, last = self.step_index, self._steps_per_block() - 1
        if i > last:  # only after a forced first-token step ran past the schedule
            return masked
        t, s = self.timesteps[i], self.timesteps[i + 1]
        alg = self.params.alg or "origin"
        if alg == "origin":
            p_transfer = 1 - s / t if i < last else 1.0
            return self._draw_positions(masked, generators) < p_transfer
        n = masked.sum(-1)                                                     # [B]
        k = (n.float() * (1 - s / t)).long() if i < last else n
        confidence = self._confidence(x0, probs, masked, alg)
        if self.params.alg_temp:
            return self._sample_positions(confidence, k, generators)
        return ranks(confidence) < k[:, None]

    @staticmethod
    def _confidence(x0, probs, masked, alg):
        if alg == "maskgit_plus":
            return chosen_probability(x0, probs, masked)
        if alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            return (top2[..., 0] - top2[..., 1]).masked_fill(~masked, -torch.inf)
        return (probs * torch.log(probs + 1e-10)).sum(-1).masked_fill(~masked, -torch.inf)

    @staticmethod
    def _draw_positions(masked, generators) -> torch.Tensor:
        """Uniform draws for the masked positions, in position order (Dream draws one per masked position);
        +inf elsewhere so they never transfer."""
        draws = torch.full(masked.shape, torch.inf, device=masked.device)
        for b, g in enumerate(generators):
            n = int(masked[b].sum())
            draws[b, masked[b]] = torch.rand(n, device=masked.device, generator=g)
        return draws

    def _sample_positions(self, confidence, k, generators) -> torch.Tensor:
        weights = torch.softmax(confidence.double() / self.params.alg_temp, dim=-1)
        commit = torch.zeros_like(confidence, dtype=torch.bool)
        for b, g in enumerate(generators):
            if int(k[b]) > 0:
                commit[b, torch.multinomial(weights[b], int(k[b]), generator=g)] = True
        return commit

"""Shared primitives of the LLaDA-family samplers: Gumbel-max sampling in float64 and per-position confidence.

Shapes: logits [B, L, V] for the current block; `generators` holds one optional torch.Generator per row so
that a seeded row draws the same noise whatever else is in its batch.
"""
from __future__ import annotations

import torch


def rand_like_rows(shape: tuple, generators: list, dtype: torch.dtype, device: torch.device,
                   active: list[bool] | None = None) -> torch.Tensor:
    """Uniform [0, 1) noise of `shape` = (B, ...), row b drawn from generators[b] (or the global generator).
    Rows marked inactive (nothing left to decode in the block) draw nothing, so a seeded row consumes its
    generator exactly as it would alone, whatever its batch neighbours still have to do."""
    if all(g is None for g in generators):
        return torch.rand(shape, dtype=dtype, device=device)
    return torch.stack([torch.rand(shape[1:], dtype=dtype, device=device, generator=g)
                        if active is None or active[b] else torch.zeros(shape[1:], dtype=dtype, device=device)
                        for b, g in enumerate(generators)])


def sample_tokens(logits: torch.Tensor, temperature: float, generators: list,
                  active: list[bool] | None = None) -> torch.Tensor:
    """Gumbel-max: argmax(exp(l) / (-log u)^T) in float64 (LLaDA `add_gumbel_noise`), written in log space
    as argmax(l - T log(-log u)) so large logits cannot overflow; plain argmax at T = 0."""
    if temperature == 0:
        return logits.argmax(-1)
    noise = rand_like_rows(tuple(logits.shape), generators, torch.float64, logits.device, active).clamp_min(1e-300)
    return (logits.double() - temperature * torch.log(-torch.log(noise))).argmax(-1)


def token_confidence(logits: torch.Tensor, x0: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """softmax(logits)[x0], the untempered probability of the chosen token, computed in `dtype` (None = the
    logits' own dtype, as LLaDA's reference sampler does; Fast-dLLM uses float64)."""
    probs = torch.softmax(logits if dtype is None else logits.to(dtype), dim=-1)
    return probs.gather(-1, x0[..., None]).squeeze(-1)


def ranks(confidence: torch.Tensor) -> torch.Tensor:
    """Rank of each position by descending confidence within its row (0 = most confident; ties: lower index
    first, so the result does not depend on the sort kernel)."""
    order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank

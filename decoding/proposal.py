"""Token proposals: each family's own way of turning a step's logits into candidate tokens x0 and the
distribution their confidence is read from. A strategy asks the proposal of the model's family, so the same
selection rule (say, Fast-dLLM's threshold) samples as LLaDA, Dream or SDAR do.

All take logits [B, L, V] of the current block and return (x0 [B, L], probs [B, L, V]). The MASK token is never
proposed (sampling it would leave a position masked forever; the published samplers can do so): where a draw
lands on it, the most probable other token is taken instead, so draws and confidences stay those of the
published samplers everywhere else.
"""
from __future__ import annotations

import torch

from dllm.decoding.sampling import rand_like_rows, sample_tokens


def _forbid(logits: torch.Tensor, ids: torch.Tensor, value: float = -torch.inf) -> torch.Tensor:
    return logits.index_fill(-1, ids, value)


def multinomial_rows(probs: torch.Tensor, generators: list, active: list[bool] | None = None) -> torch.Tensor:
    """One draw per position from probs [B, L, V]; row b uses generators[b] (or the global generator); inactive
    rows draw nothing (see `rand_like_rows`)."""
    if all(g is None for g in generators):
        return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:-1])
    return torch.stack([torch.multinomial(p, 1, generator=g).squeeze(-1) if active is None or active[b]
                        else p.argmax(-1) for b, (p, g) in enumerate(zip(probs, generators))])


def _draw(probs: torch.Tensor, temperature: float, generators: list, mask: torch.Tensor, active) -> torch.Tensor:
    x0 = multinomial_rows(probs, generators, active) if temperature > 0 else probs.argmax(-1)
    top2 = probs.topk(2, dim=-1).indices                                           # [B, L, 2]
    best_other = torch.where(top2[..., 0] == mask, top2[..., 1], top2[..., 0])
    return torch.where(x0 == mask, best_other, x0)


def llada_proposal(logits, params, generators, ids, confidence_dtype, active=None):
    """LLaDA (ML-GSAI/LLaDA `generate`): float64 Gumbel-max sampling, confidence from the untempered softmax
    in `confidence_dtype` (None = the logits' dtype). `logits_eos_inf` removes EOS before sampling;
    `confidence_eos_eot_inf` gives EOS/EoT zero probability after sampling (LLaDA's chained assignment reaches
    EOS only at temperature 0; here the documented meaning holds at every temperature)."""
    if params.logits_eos_inf and ids.eos is not None:
        logits = _forbid(logits, ids.eos)
    x0 = sample_tokens(_forbid(logits, ids.mask), params.temperature, generators, active)
    if params.confidence_eos_eot_inf and ids.eos_eot is not None:
        logits = _forbid(logits, ids.eos_eot)
    probs = torch.softmax(logits if confidence_dtype is None else logits.to(confidence_dtype), dim=-1)
    return x0, probs


def dream_proposal(logits, params, generators, ids, confidence_dtype=None, active=None):
    """Dream (`generation_utils.sample_tokens`): logits / T when T > 0, then top-p, then top-k (removed entries
    set to the dtype's minimum), softmax; x0 drawn from it at T > 0, else its argmax."""
    t = params.temperature
    if t > 0:
        logits = logits / t
    if params.top_p is not None and params.top_p < 1:
        logits = _top_p(logits, params.top_p, torch.finfo(logits.dtype).min)
    if params.top_k:
        logits = _top_k(logits, params.top_k, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    return _draw(probs, t, generators, ids.mask, active), probs


def sdar_proposal(logits, params, generators, ids, confidence_dtype=None, active=None):
    """SDAR (`sample_with_temperature_topk_topp`): logits / T unless T is 1, then top-k, then top-p (removed
    entries -inf), softmax, one multinomial draw per block position. T = 0 (which the authors' code cannot run)
    is greedy: the argmax of the filtered logits, confidence from their softmax at T = 1."""
    probs = sdar_distribution(logits, params)
    return _draw(probs, params.temperature, generators, ids.mask, active), probs


def sdar_distribution(logits: torch.Tensor, params) -> torch.Tensor:
    """SDAR's sampling distribution: logits / T unless T is 0 or 1, then top-k, then top-p (removed entries
    -inf), softmax over the last dimension."""
    t = params.temperature
    if t not in (0, 1):
        logits = logits / t
    if params.top_k:
        logits = _top_k(logits, params.top_k, -torch.inf)
    if params.top_p is not None and params.top_p < 1:
        logits = _top_p(logits, params.top_p, -torch.inf)
    return torch.softmax(logits, dim=-1)


def _top_k(logits: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    kth = torch.topk(logits, min(k, logits.shape[-1])).values[..., -1:]
    return logits.masked_fill(logits < kth, fill)


def _top_p(logits: torch.Tensor, p: float, fill: float) -> torch.Tensor:
    """Keep the smallest prefix of the sorted distribution whose mass reaches p (the first token always)."""
    ordered, order = torch.sort(logits, descending=True)
    remove = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1) > p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), fill)


PROPOSALS = {"llada": llada_proposal, "dream": dream_proposal, "sdar": sdar_proposal}
__all__ = ["PROPOSALS", "multinomial_rows", "rand_like_rows", "sdar_distribution"]

"""The training objectives, one per family, all on the shared core (`dllm.models.core.Transformer`).

- `masked_diffusion` (LLaDA, arXiv 2502.09992 Eq. 3 / SFT Eq. 5): t ~ U(0, 1) per example, each response token
  masked with probability t (the prompt never), cross-entropy on masked tokens weighted by 1/t, summed and
  divided by the response length (padding included, as LLaDA's SFT pads with EOS).
- `shifted`: the same with Dream's logit rule (the token at i is predicted from hidden state i - 1).
- `block_diffusion` (SDAR / BD3-LM): the sequence is cut into blocks from position 0; the noisy copy x_t and
  the clean copy x_0 are fed together; a noisy block attends to itself and to the clean blocks before it,
  a clean block to the clean blocks up to itself; the loss is on the masked response tokens of x_t.
- `causal_lm`: next-token cross-entropy on the response (the AR baseline, later FreeCache's guide).
- `tidar` (TiDAR, arXiv 2511.08923): the clean sequence (causal, next-token loss) and a copy in which every token
  is MASK ("full mask"), fed together; the MASK copy is cut into blocks of `block_size` from position 0, and a
  MASK block attends to the clean tokens before it and to itself (bidirectional inside the block); the MASK at
  position i predicts the token at i. L = (alpha * L_AR + L_diff) / (1 + alpha), each term a mean over the
  response tokens (equal term counts, as the paper's full-mask objective gives), alpha = 1 by default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dllm.train.data import Batch

EPS = 1e-3  # smallest masking probability (LLaDA's eps)


class _MaskPlan:
    """A fixed attention mask for a training forward (no cache)."""

    def __init__(self, mask: torch.Tensor | None):
        self.attn_mask = mask

    def kv(self, layer, k, v):
        return k, v


def _response_mask(batch: Batch) -> torch.Tensor:
    cols = torch.arange(batch.ids.shape[1], device=batch.ids.device)[None, :]
    return cols >= batch.prompt_len[:, None]                               # [B, L]


def _noise(batch: Batch, mask_id: int, generator=None):
    b, n = batch.ids.shape
    t = (1 - EPS) * torch.rand(b, device=batch.ids.device, generator=generator) + EPS     # [B]
    masked = (torch.rand(b, n, device=batch.ids.device, generator=generator) < t[:, None]) & _response_mask(batch)
    return batch.ids.masked_fill(masked, mask_id), masked, t


def _weighted_ce(logits, targets, masked, t, batch: Batch) -> torch.Tensor:
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")       # [B, L]
    per_example = (ce * masked / t[:, None]).sum(1) / (batch.ids.shape[1] - batch.prompt_len).clamp(min=1)
    return per_example.mean()


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)


def masked_diffusion(model, batch: Batch, mask_id: int, shift: bool = False, **_) -> torch.Tensor:
    noisy, masked, t = _noise(batch, mask_id)
    logits = model(noisy, _positions(noisy), _MaskPlan(None))
    if shift:  # prediction for position i comes from position i - 1 (positions >= 1; the prompt is never masked)
        return _weighted_ce(logits[:, :-1], batch.ids[:, 1:], masked[:, 1:], t, batch)
    return _weighted_ce(logits, batch.ids, masked, t, batch)


def shifted(model, batch: Batch, mask_id: int, **_) -> torch.Tensor:
    return masked_diffusion(model, batch, mask_id, shift=True)


def block_diffusion(model, batch: Batch, mask_id: int, block_size: int = 4, **_) -> torch.Tensor:
    noisy, masked, t = _noise(batch, mask_id)
    n = batch.ids.shape[1]
    blk = torch.arange(n, device=batch.ids.device) // block_size
    noisy_to_noisy = blk[:, None] == blk[None, :]
    noisy_to_clean = blk[None, :] < blk[:, None]
    clean_to_clean = blk[None, :] <= blk[:, None]
    top = torch.cat([noisy_to_noisy, noisy_to_clean], dim=1)
    bottom = torch.cat([torch.zeros_like(clean_to_clean), clean_to_clean], dim=1)
    mask = torch.cat([top, bottom], dim=0)[None, None]                                    # [1, 1, 2L, 2L]
    ids = torch.cat([noisy, batch.ids], dim=1)
    positions = torch.cat([_positions(batch.ids), _positions(batch.ids)], dim=1)
    logits = model(ids, positions, _MaskPlan(mask), logits_range=(0, n))
    return _weighted_ce(logits, batch.ids, masked, t, batch)


def causal_lm(model, batch: Batch, mask_id: int = 0, **_) -> torch.Tensor:
    n = batch.ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=batch.ids.device).tril()[None, None]
    logits = model(batch.ids, _positions(batch.ids), _MaskPlan(causal))
    targets = batch.ids[:, 1:]
    keep = _response_mask(batch)[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return (ce * keep).sum() / keep.sum()


def tidar_mask(n: int, block_size: int, device=None) -> torch.Tensor:
    """The training mask [2n, 2n] over [clean x_0..x_{n-1}, MASK_0..MASK_{n-1}] (True = may attend): clean rows
    causal over the clean half; MASK rows see the clean tokens before their block and their own block."""
    pos = torch.arange(n, device=device)
    blk = pos // block_size
    clean_to_clean = pos[None, :] <= pos[:, None]
    mask_to_clean = pos[None, :] < (blk * block_size)[:, None]
    mask_to_mask = blk[:, None] == blk[None, :]
    top = torch.cat([clean_to_clean, torch.zeros_like(clean_to_clean)], dim=1)
    bottom = torch.cat([mask_to_clean, mask_to_mask], dim=1)
    return torch.cat([top, bottom], dim=0)


def tidar(model, batch: Batch, mask_id: int, block_size: int = 9, alpha: float = 1.0, **_) -> torch.Tensor:
    n = batch.ids.shape[1]
    ids = torch.cat([batch.ids, torch.full_like(batch.ids, mask_id)], dim=1)
    positions = torch.cat([_positions(batch.ids), _positions(batch.ids)], dim=1)
    logits = model(ids, positions, _MaskPlan(tidar_mask(n, block_size, batch.ids.device)[None, None]))
    response = _response_mask(batch)
    keep_ar = response[:, 1:]
    ce_ar = F.cross_entropy(logits[:, :n - 1].float().transpose(1, 2), batch.ids[:, 1:], reduction="none")
    ce_diff = F.cross_entropy(logits[:, n:].float().transpose(1, 2), batch.ids, reduction="none")
    loss_ar = (ce_ar * keep_ar).sum() / keep_ar.sum()
    loss_diff = (ce_diff * response).sum() / response.sum()
    return (alpha * loss_ar + loss_diff) / (1 + alpha)


OBJECTIVES = {"llada": masked_diffusion, "dream": shifted, "sdar": block_diffusion, "ar": causal_lm, "tidar": tidar}

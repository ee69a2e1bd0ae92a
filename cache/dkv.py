"""dKV-Cache (Ma et al., NeurIPS 2025; horseee/dKV-Cache @ 49a76fc): cache the keys/values of decoded tokens, one
step after they are decoded ("delayed caching"), and recompute everything every `refresh_interval` steps.

Each step is one forward over the positions the rule feeds; every other position's K/V come from the buffers,
where they were written by the last forward that fed them. Variants (`variant=`):

- `decode` (LLaDA and Dream). LLaDA counts steps per block (i = the forward's index in its block): steps 0 and 1
  and every i % N == 0 are full forwards; any other step feeds the positions that were MASK before the previous
  step, i.e. the MASKs left plus the tokens decoded by the previous step, whose K/V therefore enter the cache one
  step late. Dream counts steps over the whole run (its dKV code has no blocks; parity holds with one block),
  refreshes when i % N == 0, and, because Dream's logit at q comes from position q - 1, caches the position left
  of each decoded token instead of the token's own: a position p is cacheable once p + 1 is decoded (the authors'
  `shift_type="un"`; the last column counts as cacheable from the first step on, as theirs does).
- `prefill` (Dream in the authors' code; the LLaDA analogue is derived): step 0 is full; every later step feeds the
  generation region (Dream: from the last prompt position, which predicts the first generated token) and reuses
  the prompt's K/V from step 0, never refreshed.
- `pd`: prefill + decode: refresh steps feed the generation region only, the prompt's K/V stay from step 0.

Defaults follow the paper: `refresh_interval` 8 for LLaDA and 4 for Dream (the authors' code defaults disable the
cache). Not built: dKV-Cache-Greedy, which needs the positions the sampler will commit at the next step (it fixes
a random order per block in advance); our strategies decide those only from the next forward's logits.
Full-attention models only (SDAR keeps its exact `block` cache).
"""
from __future__ import annotations

import torch

from cache.base import CachePolicy, ForwardPlan, IndexedPlan
from dllm.errors import InvalidParameterError

VARIANTS = ("decode", "prefill", "pd")
DEFAULT_REFRESH = {"llada": 8, "dream": 4}


class DKVCache(CachePolicy):
    name = "dkv"
    attentions = ("full",)
    supports_cfg = False
    scratch_column = True
    options = {"variant": "decode", "refresh_interval": 0}   # 0 = the paper's value for the model family

    def allocate(self, batch, length, arch, spec, dtype, device) -> None:
        variant, interval = self.opts["variant"], self.opts["refresh_interval"]
        if variant not in VARIANTS:
            raise InvalidParameterError(f"dkv variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if interval < 0:
            raise InvalidParameterError(f"dkv refresh_interval must be >= 1 (or 0 for the default), got {interval}")
        super().allocate(batch, length, arch, spec, dtype, device)
        self.variant = variant
        self.interval = interval or DEFAULT_REFRESH.get(spec.family, 8)
        self.mask_id = spec.mask_id
        self.per_block = not spec.shift_logits   # LLaDA counts steps per block, Dream over the run
        self.calls = 0
        self.previous: torch.Tensor | None = None   # MASK map at the start of the previous step
        self.initial: torch.Tensor | None = None    # MASK map at the start of the run

    def select_rows(self, keep: torch.Tensor) -> None:
        super().select_rows(keep)
        if self.previous is not None:
            self.previous = self.previous[keep]
        if self.initial is not None:
            self.initial = self.initial[keep]

    def plan(self, start, end, step, mask) -> ForwardPlan:
        masked = self.canvas.tokens == self.mask_id                        # [B, L], before this step's forward
        if self.initial is None:
            self.initial = masked
        i = step if self.per_block else self.calls
        previous, self.previous = self.previous, masked
        self.calls += 1
        if self.calls == 1:
            return self.full(mask)
        region = self.canvas.gen_start - int(self.shift_logits)             # first column the prefill variants feed
        refresh = i % self.interval == 0 or (self.per_block and i == 1)
        if self.variant == "prefill" or (self.variant == "pd" and refresh):
            return self.window(region, self.length, mask)
        if refresh:
            return self.full(mask)
        return self._cached_step(self._fed(previous), start, end, mask)

    def _fed(self, previous: torch.Tensor) -> torch.Tensor:
        """Columns recomputed at a cached step: not yet cacheable before the previous step."""
        if not self.shift_logits:
            return previous
        fed = torch.zeros_like(previous)
        fed[:, :-1] = previous[:, 1:]          # p is cacheable once p + 1 is decoded
        if self.calls == 2:                    # first cached step: the last column was MASK at the start
            fed[:, -1] = self.initial[:, -1]
        if self.variant == "pd":               # the prompt's K/V are never recomputed after step 0
            fed[:, :self.canvas.gen_start - 1] = False
        return fed

    def _cached_step(self, fed: torch.Tensor, start: int, end: int, mask) -> IndexedPlan:
        counts = fed.sum(1)
        n = int(counts.max())
        index = torch.argsort((~fed).to(torch.int8), dim=1, stable=True)[:, :n]   # fed columns first, in order
        slots = torch.arange(n, device=fed.device).expand_as(index)
        valid = slots < counts[:, None]
        all_valid = bool(valid.all())
        b = fed.shape[0]
        slot_of = torch.zeros(b, self.length + 1, dtype=torch.long, device=fed.device)
        slot_of.scatter_(1, index.masked_fill(~valid, self.length), slots)
        shift = int(self.shift_logits)
        cols = torch.arange(start - shift, end - shift, device=fed.device).clamp(min=0)
        keys = mask(0, self.length, self.length)
        keys = torch.ones(b, 1, 1, self.length, dtype=torch.bool, device=fed.device) if keys is None else keys
        keys = torch.cat([keys, torch.zeros_like(keys[..., :1])], dim=-1)     # the scratch column is never seen
        return IndexedPlan(index, None if all_valid else valid, slot_of[:, cols], self.buffers, keys)

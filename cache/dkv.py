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

- `greedy` (LLaDA only, as in the authors' code; the reference sampler with `remasking="random"`): the unmasking
  order of each block is drawn once at its start (`torch.rand` over the canvas from the row's own generator,
  seeded by `seed`; the authors draw one [B, L] tensor, which equals this for one row), so the positions of the
  next step are known in advance. Step i % N == 0 is full; any other
  step feeds only the positions committed at the previous step (their one-step delay), those to be committed now,
  and `window_size` nearby MASKs (alternating left and right of each, possibly in later blocks); every other
  position, the other MASKs included, keeps stale K/V. The policy makes the sampler commit exactly the drawn
  positions (`commit_mask`), as the authors' loop commits `order[acc[i]:acc[i + 1]]`.

Defaults follow the paper: `refresh_interval` 8 for LLaDA and 4 for Dream with `decode`, 2 with `greedy` (the
authors' code defaults disable the cache). Full-attention models only (SDAR keeps its exact `block` cache).
"""
from __future__ import annotations

import torch

from dllm.cache.base import CachePolicy, ForwardPlan, IndexedPlan
from dllm.decoding.llada import transfer_quota
from dllm.errors import InvalidParameterError

VARIANTS = ("decode", "prefill", "pd", "greedy")
FEED_GRAIN = 16
DEFAULT_REFRESH = {"llada": 8, "dream": 4}


class DKVCache(CachePolicy):
    name = "dkv"
    attentions = ("full",)
    supports_cfg = False
    supports_remask = False   # its cached set is tied to the decode order; not defined for remasking
    scratch_column = True
    options = {"variant": "decode", "refresh_interval": 0,   # 0 = the paper's value for the family and variant
               "window_size": 0, "seed": 0}                 # greedy only

    def allocate(self, batch, length, arch, spec, dtype, device) -> None:
        variant, interval = self.opts["variant"], self.opts["refresh_interval"]
        if variant not in VARIANTS:
            raise InvalidParameterError(f"dkv variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if interval < 0:
            raise InvalidParameterError(f"dkv refresh_interval must be >= 1 (or 0 for the default), got {interval}")
        if variant == "greedy" and spec.family != "llada":
            raise InvalidParameterError("dkv variant 'greedy' exists for LLaDA models only; use variant 'decode'")
        super().allocate(batch, length, arch, spec, dtype, device)
        self.variant = variant
        self.interval = interval or (2 if variant == "greedy" else DEFAULT_REFRESH.get(spec.family, 8))
        # greedy: one generator per row, so a row draws the same orders in a batch as alone (given the same canvas
        # width; with left padding to a longer prompt the draw covers more columns and differs)
        self.generators = [torch.Generator(device=device).manual_seed(self.opts["seed"]) for _ in range(batch)]
        self.order = self.acc = self.next_fed = None   # greedy: the current block's plan (host lists)
        self.key_mask = None                           # cached steps' key mask, scratch column included
        self.mask_id = spec.mask_id
        self.per_block = not spec.shift_logits   # LLaDA counts steps per block, Dream over the run
        self.calls = 0
        self.previous: torch.Tensor | None = None   # MASK map at the start of the previous step
        self.initial: torch.Tensor | None = None    # MASK map at the start of the run

    def on_truncate(self) -> None:
        self.key_mask = None

    def select_rows(self, keep: torch.Tensor) -> None:
        super().select_rows(keep)
        self.key_mask = None
        if self.previous is not None:
            self.previous = self.previous[keep]
        if self.initial is not None:
            self.initial = self.initial[keep]
        if self.variant == "greedy":
            rows = keep.tolist()
            self.generators = [self.generators[r] for r in rows]
            if self.order is not None:
                self.order, self.acc = [self.order[r] for r in rows], [self.acc[r] for r in rows]
            if self.next_fed is not None:
                self.next_fed = [self.next_fed[r] for r in rows]

    def plan(self, start, end, step, mask) -> ForwardPlan:
        if self.variant == "greedy":
            return self._greedy(start, end, step, mask)
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

    def _greedy(self, start: int, end: int, step: int, mask) -> ForwardPlan:
        masked = self.canvas.tokens == self.mask_id
        b, steps = masked.shape[0], self._steps_per_block()
        if step == 0:                      # the block's unmasking order and per-step quotas, fixed in advance
            quota = transfer_quota(masked[:, start:end], steps)   # the sampler's own schedule, [B, steps]
            if self.interval > 1 and bool((quota == 0).any()):
                raise InvalidParameterError("dkv variant 'greedy' needs at least one token a step: use at most "
                                            "as many steps per block as the block has positions")
            score = torch.cat([torch.rand((1, self.length), generator=g, device=masked.device) for g in self.generators])
            score[:, :start] = -torch.inf
            score[:, end:] = -torch.inf
            # kept on the host: every step slices them per row
            self.acc = torch.cat([torch.zeros_like(quota[:, :1]), quota.cumsum(1)], 1).tolist()
            self.order = score.sort(dim=1, descending=True).indices.tolist()
            self.next_fed = None
        acc, order = self.acc, self.order
        now = [order[r][acc[r][step]:acc[r][step + 1]] for r in range(b)]
        commit = torch.zeros(b, end - start, dtype=torch.bool, device=masked.device)
        for r, cols in enumerate(now):
            commit[r, [c - start for c in cols]] = True
        if step % self.interval == 0:
            plan = self.full(mask)
        else:
            fed = torch.zeros_like(masked)
            for r, cols in enumerate(self.next_fed):
                fed[r, cols] = True
            plan = self._cached_step(fed, start, end, mask)
        plan.commit_mask = commit
        # what the next step feeds: this step's commits, the next step's, and a window of MASKs around the latter
        # (MASKs as before this step's commit, as the authors' loop has them)
        if step + 1 < steps:
            window = self.opts["window_size"]
            mask_rows = masked.tolist() if window else None
            self.next_fed = []
            for r in range(b):
                upcoming = order[r][acc[r][step + 1]:acc[r][step + 2]]
                marked = set(now[r]) | set(upcoming)
                if window:
                    _window(marked, upcoming, mask_rows[r], window)
                self.next_fed.append(sorted(marked))
        return plan

    def _steps_per_block(self) -> int:
        steps = getattr(self.params, "steps", None)
        if steps is None or getattr(self.params, "remasking", None) != "random":
            raise InvalidParameterError("dkv variant 'greedy' fixes a random unmasking order per block, as the "
                                        "authors' code: use the reference strategy with remasking='random'")
        return steps // self.canvas.num_blocks

    def _cached_step(self, fed: torch.Tensor, start: int, end: int, mask) -> IndexedPlan:
        counts = fed.sum(1)
        # fed widths rounded up to a multiple of FEED_GRAIN (padding slots write the scratch column): a few
        # forward shapes instead of one per count, so the runner's graphs are reused
        n = min(-(-int(counts.max()) // FEED_GRAIN) * FEED_GRAIN, fed.shape[1])
        index = torch.argsort((~fed).to(torch.int8), dim=1, stable=True)[:, :n]   # fed columns first, in order
        slots = torch.arange(n, device=fed.device).expand_as(index)
        valid = slots < counts[:, None]
        all_valid = bool(valid.all())
        b = fed.shape[0]
        slot_of = torch.zeros(b, self.length + 1, dtype=torch.long, device=fed.device)
        slot_of.scatter_(1, index.masked_fill(~valid, self.length), slots)
        shift = int(self.shift_logits)
        cols = torch.arange(start - shift, end - shift, device=fed.device).clamp(min=0)
        if self.key_mask is None:   # changes only when rows leave the batch
            keys = mask(0, self.length, self.length)
            keys = torch.ones(b, 1, 1, self.length, dtype=torch.bool, device=fed.device) if keys is None else keys
            extra = self.buffers.k[0].shape[2] - self.length        # scratch columns: unseen
            self.key_mask = torch.cat([keys, keys.new_zeros(*keys.shape[:-1], extra)], dim=-1)
        return IndexedPlan(index, None if all_valid else valid, slot_of[:, cols], self.buffers, self.key_mask)


def _window(marked: set, upcoming: list[int], masked_row: list[bool], size: int) -> None:
    """Add to `marked` up to `size` MASK positions around each upcoming position, alternating left and right one
    step at a time (the authors' `find_window_tokens`, including its stop test `right > n`)."""
    n = len(masked_row)
    for pos in upcoming:
        left, right, found, left_turn = pos - 1, pos + 1, 0, True
        while found < size:
            if left_turn:
                if left >= 0 and left not in marked and masked_row[left]:
                    marked.add(left)
                    found += 1
                left -= 1
            else:
                if right < n and right not in marked and masked_row[right]:
                    marked.add(right)
                    found += 1
                right += 1
            left_turn = not left_turn
            if left < 0 and right > n:
                break

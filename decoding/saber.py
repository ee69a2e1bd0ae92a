"""Saber (arXiv 2510.18165; zhaoyMa/Saber): adaptive acceleration with backtracking remasking.

Each step, one forward over the whole canvas; every generated position up to the current block's end E gets the
probability c of its current argmax (committed positions too).
- Commit: every masked position whose c exceeds tau, the mean confidence at which the tokens committed so far
  were committed (tau = 1 before the first commit, so the first step commits the top n); at least the top n.
- Backtrack: unless the window left of E is now full, re-mask r committed positions, chosen by the family's rule
  below, r growing with the number just committed.

LLaDA (`decoding.py::generate_with_saber`; `mu` = 8 at 2f061e2e, `mu` = 2 at c4caa28d, the default here):
  c is softmax(logits)[argmax] in the logits' dtype (bf16 on GPU). tau averages `final`, the confidence of each
  generated position left of E at its latest commit; `final` is never cleared, so re-masked positions still count.
  The re-mask key is the drop of c since the previous forward (delta = c - c_prev; +inf where either is not finite,
  so positions that just entered the window, whose c_prev was -inf, cannot be re-masked on that step); the r
  committed positions left of E with the most negative delta are re-masked, including positions of earlier blocks
  and positions committed in this very step. r = max(n // 2, ceil(fix / mu)), at most fix - 1, fix = max(n, #commits).
Dream (`Dream/generation_utils.py::DreamGenerationMixin._sample`; one block, like `diffusion_generate`):
  c = max of a float32 softmax (after temperature, top-p, top-k; Dream's `sample_tokens`), cast back to the logits'
  dtype. tau averages `first`, the confidence of each position at its first-ever commit. The re-mask key is the
  probability of the current token under this step's logits (softmax in the logits' dtype, after the commits); the
  r committed generated positions with the lowest one are re-masked, r = max(1, min(ceil(new / mu), new - 1)),
  new = #commits, `mu` = 8 (the authors' constant). No re-mask while at most one generated position is committed.

Comparisons follow the authors' dtypes: tau (a float32 mean) is compared in the confidence's dtype, as torch does
for a 0-dim tensor or a Python float against a bf16 tensor.

Ties (frequent in bf16) break as the authors' `torch.topk` breaks them: it runs on each row laid out as their canvas
(LLaDA: prompt + generation, -inf/+inf outside the candidates; Dream: the candidates gathered in position order).
Where their top-n picks an entry outside the candidates (fewer than n masks left in the window: the -inf tail, an
unspecified prompt, committed or later-block position) only the masked ones are committed; with n = 2 and
block_length >= 2 this never happens, as each step leaves either no mask or at least two in the window. Likewise
only positions with a finite key are re-masked (with n = 2 there are always enough). Dream with several blocks (an
extension; the authors' Dream code has no blocks) commits and re-masks left of the block's end only.

Text is final only when the row is complete: any committed generated position left of E may be re-masked, so
streaming yields a row's text once, at its end, and a committed stop token ends a row only then.
Needs the logits of every generated position each step: cache `none` only (every step re-masks, so a cache that
reuses K/V would have to refresh at every forward anyway).
"""
from __future__ import annotations

import torch

from dllm.decoding.base import StepEdits, Strategy
from dllm.errors import InvalidParameterError


class _Saber(Strategy):
    name = "saber"
    logits_span = "generation"
    remasks = True
    engine_options = {"mu": 2, "n": 2}

    @classmethod
    def prepare(cls, options: dict, loaded) -> dict:
        opts = cls.resolve_engine_options(options)
        for key in ("n", "mu"):
            if opts[key] < 1:
                raise InvalidParameterError(f"saber option {key}={opts[key]} must be an integer >= 1 "
                                            f"(default {cls.engine_options[key]})")
        return opts

    def max_forwards(self, block_length: int) -> int:
        return block_length + 1   # each forward that leaves masks in the window nets at least one token

    def final_limit(self) -> list[int]:
        return [self.canvas.gen_start] * self.canvas.batch_size

    def select_rows(self, keep: torch.Tensor) -> None:
        for name in self._row_state:
            value = getattr(self, name, None)
            if isinstance(value, list):
                setattr(self, name, [value[i] for i in keep.tolist()])
            elif value is not None:
                setattr(self, name, value[keep])

    def step(self, logits, masked, generators, first_only=False):
        self.active = None if all(g is None for g in generators) else masked.any(-1).tolist()
        x0, commit, remask = self.decide(logits, masked, generators)
        self.step_index += 1
        return StepEdits(x0, commit, remask)


def _topk_canvas(values, ks, largest, offsets, width, fill) -> torch.Tensor:
    """[B, S] bool: per row, `torch.topk` (k = ks[b]) over the row laid out as the authors' canvas (prompt of
    offsets[b] columns, then `width` generated ones, `fill` outside the span), so that ties break exactly as theirs do
    on the same device; picks outside the span (the authors' unspecified -inf/+inf tail) are dropped."""
    b, s = values.shape
    out = torch.zeros((b, s), dtype=torch.bool, device=values.device)
    for r, k in enumerate(ks):
        if k <= 0:
            continue
        row = torch.full((offsets[r] + width,), fill, dtype=values.dtype, device=values.device)
        row[offsets[r]:offsets[r] + s] = values[r]
        idx = torch.topk(row, k=k, largest=largest).indices - offsets[r]
        out[r, idx[(idx >= 0) & (idx < s)]] = True
    return out


def _topk_compact(values, eligible, ks, largest) -> torch.Tensor:
    """[B, S] bool: per row, `torch.topk` (k = min(ks[b], #eligible)) over the eligible values in position order
    (the authors' Dream gathers them so), mapped back to positions."""
    out = torch.zeros_like(eligible)
    for r, k in enumerate(ks):
        pos = eligible[r].nonzero().squeeze(-1)
        k = min(k, pos.numel())
        if k <= 0:
            continue
        vals = values[r, pos]
        out[r, pos[torch.topk(vals if largest else -vals, k=k).indices]] = True
    return out


class SaberLLaDA(_Saber):
    families = ("llada",)
    _row_state = ("final", "last", "offsets")

    def decide(self, logits, masked, generators):
        b, s = masked.shape
        g = self.params.max_tokens
        if not hasattr(self, "final"):
            self.final = torch.full((b, g), -torch.inf, dtype=torch.float32, device=masked.device)
            self.last = None
        n, mu = self.state["n"], self.state["mu"]
        x0, probs = self.propose(logits, self.params, generators, self.token_ids(logits.device), None, self.active)
        c = probs.gather(-1, x0[..., None]).squeeze(-1)                      # [B, S] in the logits' dtype
        if self.last is None:   # float32 zeros, as the authors' (the first step's delta is then float32)
            self.last = torch.zeros((b, g), dtype=torch.float32, device=c.device)
            self.offsets = self.canvas.positions[:, self.canvas.gen_start].tolist()   # prompt lengths
        c_full = torch.full((b, g), -torch.inf, dtype=c.dtype, device=c.device)
        c_full[:, :s] = c
        delta = c_full - self.last
        delta = torch.where(torch.isfinite(delta), delta, torch.full_like(delta, torch.inf))[:, :s]
        live = masked.any(-1)                                                 # rows with work left in the window
        self.last = torch.where(live[:, None], c_full, self.last.to(c.dtype))
        cand = c.masked_fill(~masked, -torch.inf)
        # tau: mean of the latest commit confidences left of E (float32), compared in c's dtype
        window = self.final[:, :s]
        seen = window > -torch.inf
        count = seen.sum(-1)
        tau = torch.stack([window[r][seen[r]].mean() if count[r] > 0 else torch.ones((), device=c.device)
                           for r in range(b)]).to(c.dtype)
        above = cand > tau[:, None]
        few = above.sum(-1) < n
        top = _topk_canvas(cand, [n if f else 0 for f in few.tolist()], True, self.offsets, g, -torch.inf)
        commit = torch.where(few[:, None], top, above) & masked
        fix = torch.clamp(above.sum(-1), min=n)
        self.final[:, :s] = torch.where(commit, c.float(), self.final[:, :s])
        still = masked & ~commit
        r = torch.minimum(torch.clamp((fix + mu - 1) // mu, min=n // 2), fix - 1).clamp(min=0)
        r = torch.where(still.any(-1), r, torch.zeros_like(r))
        committed = ~still
        key = delta.masked_fill(~committed, torch.inf)
        remask = _topk_canvas(key, r.tolist(), False, self.offsets, g, torch.inf) & committed & torch.isfinite(delta)
        return x0, commit, remask


class SaberDream(_Saber):
    families = ("dream",)
    engine_options = {"mu": 8, "n": 2}
    _row_state = ("first",)

    @classmethod
    def prepare(cls, options: dict, loaded) -> dict:
        opts = super().prepare(options, loaded)
        if opts["n"] < 2:   # Dream re-masks at least one token a step: with one commit a step it could stall
            raise InvalidParameterError(f"saber option n={opts['n']} must be >= 2 on Dream models (it re-masks at "
                                        "least one token a step)")
        return opts

    def decide(self, logits, masked, generators):
        b, s = masked.shape
        if not hasattr(self, "first"):
            self.first = torch.full((b, self.params.max_tokens), torch.nan, dtype=torch.float32,
                                    device=masked.device)
        n, mu = self.state["n"], self.state["mu"]
        x0, probs = self.propose(logits.float(), self.params, generators, self.token_ids(logits.device), None,
                                 self.active)
        c = probs.gather(-1, x0[..., None]).squeeze(-1).to(logits.dtype)    # sample_tokens: fp32, cast back
        cand = c.masked_fill(~masked, -torch.inf)
        recorded = ~torch.isnan(self.first)
        tau = torch.stack([self.first[r][recorded[r]].mean() if recorded[r].any() else torch.ones((), device=c.device)
                           for r in range(b)]).to(c.dtype)
        above = (cand > tau[:, None]) & masked
        few = above.sum(-1) < n
        top = _topk_compact(cand, masked, [n if f else 0 for f in few.tolist()], largest=True)
        commit = torch.where(few[:, None], top, above) & masked
        first = self.first[:, :s]
        self.first[:, :s] = torch.where(commit & torch.isnan(first), c.float(), first)
        still = masked & ~commit
        tokens = torch.where(commit, x0, self.canvas.tokens[:, self.canvas.gen_start:self.canvas.gen_start + s])
        p_now = torch.softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)   # logits' dtype
        new = commit.sum(-1)
        r = torch.clamp(torch.minimum((new + mu - 1) // mu, new - 1), min=1)
        committed = ~still
        r = torch.where(still.any(-1) & (committed.sum(-1) > 1), r, torch.zeros_like(r))
        remask = _topk_compact(p_now, committed, r.tolist(), largest=False)
        return x0, commit, remask

"""S2D2: training-free self-speculation for block-diffusion models (Han et al., arXiv 2603.25702; the SDAR path
of phymhan/S2D2 `SDAR/generate_ssd_policy.py::block_diffusion_generate`).

Each step of a block:
1. draft: the normal block forward gives x0 and its confidence p at every block position (SDAR's sampler);
2. route (`s2d2_router.py`): whether to verify the first run of masked positions (the span);
3. verify: one forward of 2L tokens through `ctx.forward` = [block with its masks filled by x0 | L MASKs] at the
   block's positions, attending to the cached prefix (read-only) and, among themselves, by `verify_visibility`:
   draft copy r sees draft copies 0..r; MASK copy r sees draft copies 0..r-1 and itself. The MASK copy of
   position i therefore predicts token i from the prefix and the drafts before it: the model at block size 1
   (autoregressive). Speculative acceptance over the span: r_i = min(1, (q_i(x0_i) / p_i)^gamma), one uniform
   draw per span position (one call), accept the prefix before the first rejection j; position j is committed
   too, with a token from normalise(max(0, q_j - p_j)) (`allow_resample`, else x0_j);
4. optional extra commits (`ssd_ratio_threshold`, `always_check_high_confidence`), then SDAR's remasking rule
   fills the step's quota when fewer tokens were committed (a step without verification is exactly SDAR's).
`cache_ver` computes the prompt and every finished block causally (the cache then holds what the autoregressive
verifier expects); `draft_ver` computes the block's decoded prefix causally in draft forwards (the rows stay
causal for the rest of the block, as in the authors' in-place mask edit). Both act through `attention`, the
mask every forward of the run is planned with, so every cache computes them.

Random draws per row and step, in the authors' order: draft multinomial (T > 0), acceptance uniforms, residual
multinomial. At T = 0 the acceptance test is still random (the authors' choice); a request without a seed then
draws from a generator seeded with 0, so greedy decoding is deterministic.
"""
from __future__ import annotations

import torch

from dllm.decoding.proposal import sdar_distribution
from dllm.decoding.s2d2_options import resolve, request_defaults
from dllm.decoding.s2d2_router import RowRouter
from dllm.decoding.sdar import DEFAULT_ENTROPY_BOUND, DEFAULT_THRESHOLD, SDARReference
from dllm.decoding.sampling import ranks


def verify_visibility(length: int, device=None) -> torch.Tensor:
    """[2L, 2L] bool (query, key) among the verification forward's own tokens: [drafts | MASK copies]."""
    vis = torch.zeros(2 * length, 2 * length, dtype=torch.bool, device=device)
    ones = torch.ones(length, length, dtype=torch.bool, device=device)
    vis[:length, :length] = torch.tril(ones)
    vis[length:, :length] = torch.tril(ones, diagonal=-1)
    vis[length:, length:] = torch.eye(length, dtype=torch.bool, device=device)
    return vis


def first_span(masked: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the first maximal run of masked positions of each row."""
    idx = torch.arange(masked.shape[1], device=masked.device).expand_as(masked)
    start = torch.where(masked.any(-1), masked.long().argmax(-1), masked.shape[1])[:, None]
    breaks = ~masked & (idx >= start)
    stop = torch.where(breaks.any(-1), breaks.long().argmax(-1), masked.shape[1])[:, None]
    return (idx >= start) & (idx < stop)


class _Row:
    """One request's S2D2 state: router, acceptance generator, counts for its metrics."""

    def __init__(self, opts: dict, generator):
        self.router, self.generator = RowRouter(opts), generator
        self.unmasked = 0                      # tokens this strategy decoded in the current block
        self.verify_calls = self.accepted = self.resampled = self.skipped = 0


class S2D2Strategy(SDARReference):
    """SDAR's sampler (options, quotas, forward budget) with speculative verification in `step`."""

    name = "s2d2"
    caches = ("none", "block", "prefix", "dual")   # exact on block-causal models; the others approximate K/V

    @classmethod
    def resolve_engine_options(cls, options: dict) -> dict:
        return resolve(options)

    @classmethod
    def request_defaults(cls, params, state: dict):
        return request_defaults(params, state)

    def __init__(self, params, spec):
        super().__init__(params, spec)
        self.rows: list[_Row] | None = None
        self.causal: torch.Tensor | None = None     # [B, T] bool: query columns attending causally

    def scratch_width(self, block_length: int) -> int:
        return 2 * block_length

    # ------------------------------------------------------------------ attention of every forward

    def attention(self, mask_fn):
        """The run's mask function with `causal` rows: a causal row keeps its block-causal keys up to itself."""
        def mask(q_start, q_end, k_end, k_start=0):
            base = mask_fn(q_start, q_end, k_end, k_start)
            if self.causal is None:
                return base
            cols = torch.arange(max(q_end, k_end), device=self.causal.device)
            causal = cols[k_start:k_end][None, :] <= cols[q_start:q_end][:, None]               # [Lq, Lk]
            rows = self.causal[:, q_start:q_end, None]                                          # [B, Lq, 1]
            return base & (causal[None] | ~rows)[:, None]
        return mask

    def begin_block(self, masked: torch.Tensor) -> None:
        super().begin_block(masked)                 # SDAR's quotas
        opts = self.state
        if (opts["cache_ver"] or opts["draft_ver"]) and self.causal is None:
            self.causal = torch.zeros_like(self.canvas.tokens, dtype=torch.bool)
        if opts["cache_ver"]:                      # the prompt's full blocks and every finished block
            self.causal[:, :self.block_start] = True
        self._draft_rows(masked)
        for row in self.rows or []:
            row.unmasked = 0

    def _draft_rows(self, masked: torch.Tensor) -> None:
        """draft_ver: the block's positions before its first MASK become causal rows (and stay so)."""
        if not self.state["draft_ver"]:
            return
        has = masked.any(-1)
        first = torch.where(has, masked.long().argmax(-1), 0)                                   # [B]
        cols = torch.arange(masked.shape[1], device=masked.device)
        self.causal[:, self.block_start:self.block_start + masked.shape[1]] |= cols[None, :] < first[:, None]

    def select_rows(self, keep: torch.Tensor) -> None:
        if self.rows is not None:
            self.rows = [self.rows[i] for i in keep.tolist()]
        if self.causal is not None:
            self.causal = self.causal[keep]

    def row_stats(self, row: int) -> dict:
        r = self.rows[row] if self.rows is not None else None
        if r is None:
            return {}
        return {"verify_calls": r.verify_calls, "accepted_tokens": r.accepted, "resampled_tokens": r.resampled,
                "accepted_per_verify": r.accepted / r.verify_calls if r.verify_calls else 0.0,
                "router_verify": r.verify_calls, "router_skip": r.skipped}

    # ------------------------------------------------------------------ the step

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The authors' `_probs_from_logits`: softmax of the raw logits at T = 0, else SDAR's transforms."""
        return torch.softmax(logits, -1) if self.params.temperature == 0 else sdar_distribution(logits, self.params)

    def step(self, logits, masked, generators, first_only=False):
        if self.rows is None:
            self.rows = [_Row(self.state, g if g is not None or self.params.temperature > 0
                              else torch.Generator(device=logits.device).manual_seed(0)) for g in generators]
        logits = logits.float()
        active = masked.any(-1).tolist()
        x0, probs = self.propose(logits, self.params, generators, self.token_ids(logits.device),
                                 None, None if all(g is None for g in generators) else active)
        if self.params.temperature == 0:          # greedy draft: confidence from the raw softmax
            probs = torch.softmax(logits, -1)
        p = probs.gather(-1, x0[..., None]).squeeze(-1)                                        # [B, L]
        span = first_span(masked)
        quota = self.quota[min(self.step_index, len(self.quota) - 1)]
        min_k = masked.sum(-1).clamp(max=quota)
        threshold = self.params.threshold if self.params.threshold is not None else DEFAULT_THRESHOLD
        high = masked & (p > threshold)
        verify = self._route(logits, masked, span, p, high, active)
        tokens, commit = x0.clone(), torch.zeros_like(masked)
        if any(verify):
            self._verify(logits, x0, p, masked, span, verify, tokens, commit)
        if self.state["always_check_high_confidence"]:
            commit |= high
        decoded = commit.sum(-1)
        commit |= self._fallback(x0, p, masked & ~commit, (min_k - decoded).clamp(min=0), threshold)
        counts = commit.sum(-1).tolist()
        for b, row in enumerate(self.rows):
            if active[b]:
                row.router.reward_step(counts[b], verify[b])
                row.unmasked += counts[b]
        if self.state["draft_ver"]:
            self._draft_rows(masked & ~commit)
        self.step_index += 1
        return tokens, commit

    def _route(self, logits, masked, span, p, high, active) -> list[bool]:
        verify = [False] * len(active)
        num_masked, num_high = masked.sum(-1).tolist(), high.sum(-1).tolist()
        ucb_masked = self.state["do_verify_policy"] == "contextual_bandit_ucb" \
            and self.state["ucb_entropy_source"] == "masked"
        for b, row in enumerate(self.rows):
            if not active[b]:
                continue
            sp = span[b]
            verify[b] = row.router.decide(self._probs, logits[b][sp], logits[b][masked[b]] if ucb_masked else None,
                                          p[b][sp].clamp(0.0, 1.0), num_masked[b], num_high[b], row.unmasked,
                                          self.params.block_length)
            row.skipped += not verify[b]
        return verify

    def _verify(self, logits, x0, p, masked, span, verify, tokens, commit) -> None:
        """One 2L forward for the batch (rows that skip ride along uncharged); acceptance per verifying row."""
        c, start, length = self.canvas, self.block_start, masked.shape[1]
        first = torch.where(masked, x0, c.tokens[:, start:start + length])
        ids = torch.cat([first, torch.full_like(first, self.spec.mask_id)], 1)                  # [B, 2L]
        pos = c.positions[:, start:start + length].repeat(1, 2)
        vis = verify_visibility(length, ids.device).expand(ids.shape[0], -1, -1)
        q_logits = self.ctx.forward(ids, pos, vis, start, rows=verify)[:, length:].float()       # [B, L, V]
        gamma = self.state["ssd_ratio_tempering_factor"]
        for b, row in enumerate(self.rows):
            if verify[b]:
                self._accept(b, row, logits[b], q_logits[b], x0[b], p[b], masked[b], span[b], gamma, tokens, commit)

    def _ratios(self, q_probs, x0, p, gamma):
        q_sel = q_probs.gather(-1, x0[:, None]).squeeze(-1).clamp_min(0.0)
        ratio = q_sel / p.clamp_min(1e-12)
        return (ratio ** gamma if gamma != 1.0 else ratio).clamp(max=1.0)

    def _accept(self, b, row, logits, q_logits, x0, p, masked, span, gamma, tokens, commit) -> None:
        idx = span.nonzero().flatten()
        q_probs = self._probs(q_logits[idx])                                                    # [S, V]
        ratios = self._ratios(q_probs, x0[idx], p[idx], gamma)
        accept = torch.rand(ratios.shape, dtype=ratios.dtype, device=ratios.device, generator=row.generator) < ratios
        rejected = (~accept).nonzero().flatten().tolist()
        j = rejected[0] if rejected else len(idx)
        commit[b, idx[:j + 1]] = True            # the accepted prefix, and the first rejected position
        row.verify_calls += 1
        row.accepted += j
        if rejected and self.state["allow_resample"]:
            tokens[b, idx[j]] = self._residual(q_probs[j], self._probs(logits[idx[j]][None])[0], row.generator)
            row.resampled += 1
        thr = self.state["ssd_ratio_threshold"]
        if thr >= 0:
            if self.state["ssd_threshold_all_spans"]:
                rest = (masked & ~commit[b]).nonzero().flatten()
                commit[b, rest[self._ratios(self._probs(q_logits[rest]), x0[rest], p[rest], gamma) >= thr]] = True
            else:
                commit[b, idx[j + 1:][ratios[j + 1:] >= thr]] = True

    def _residual(self, q: torch.Tensor, p: torch.Tensor, generator) -> int:
        """A draw from normalise(max(0, q - p)), or from q when that has no mass; never the MASK token (the
        authors' draw can return it: then the most probable other token of the same distribution)."""
        delta = (q - p).clamp_min(0.0)
        z = float(delta.sum())
        dist = q.clamp_min(0) if z <= 0.0 or not bool(torch.isfinite(delta).all()) else delta / z
        token = int(torch.multinomial(dist, 1, generator=generator))
        if token == self.spec.mask_id:
            top2 = dist.topk(2).indices.tolist()
            token = top2[1] if top2[0] == token else top2[0]
        return token

    def _fallback(self, x0, p, remaining, k_left, threshold) -> torch.Tensor:
        """SDAR's remasking rule over the positions still masked, for `k_left` [B] more tokens."""
        rule = self.params.remasking or "low_confidence_dynamic"
        need = k_left[:, None]
        if rule == "sequential":
            return remaining & (torch.cumsum(remaining.long(), -1) <= need)
        if rule == "entropy_bounded":
            return self._entropy_bounded(p, remaining, k_left)
        confidence = p.masked_fill(~remaining, -torch.inf)
        top = remaining & (ranks(confidence) < need)
        if rule == "low_confidence_static":
            return top
        high = remaining & (confidence > threshold)
        return torch.where((high.sum(-1, keepdim=True) >= need) & (need > 0), high, top)

    def _entropy_bounded(self, p, remaining, k_left) -> torch.Tensor:
        """The S2D2 code's `entropy_bounded`: one scalar per row, E = -sum p log p over the draft confidences
        of the whole block; with m positions remaining, k = #{j <= m : j * E < bound} clamped to
        [1, min(m, k_left)] leftmost remaining positions (every remaining position ties on E)."""
        bound = self.params.entropy_bound if self.params.entropy_bound is not None else DEFAULT_ENTROPY_BOUND
        q = p.clamp_min(1e-12)
        e = -(q * q.log()).sum(-1)                                                               # [B]
        m = remaining.sum(-1)
        cum = torch.cumsum(e[:, None].expand_as(p), -1)                                           # j * E, j = 1..L
        cols = torch.arange(p.shape[1], device=p.device)
        k = ((cum < bound) & (cols[None] < m[:, None])).sum(-1)
        k = torch.minimum(torch.maximum(k, torch.ones_like(k)), torch.minimum(m, k_left))
        return remaining & (torch.cumsum(remaining.long(), -1) <= k[:, None]) & (k_left[:, None] > 0)

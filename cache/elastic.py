"""Elastic-Cache (arXiv 2510.14973, "Attention Is All You Need for KV Cache in Diffusion LLMs"), as the authors'
code does it (yxu-dev/Elastic-Cache @ 46c0bc3: `llada/generate.py::generate_with_elastic_cache`, the patched
`LLaDABlock.attention`, Dream's `generation_utils_elastic._sample`; docs/notes/elastic.md has the exact rule).

State, per layer l and per canvas column (all N = prompt + generation positions of a row): the layer's INPUT
hidden state X[l] and the post-RoPE q, k, v (Q[l], K[l], V[l]).

- The run's first forward is a full forward that fills everything.
- Every later forward feeds, per row, `track ++ newly decoded ++ window queries`:
  - track: the union over layers of each layer's `track_num` most-attended non-MASK columns (attention
    received from the window queries in the previous forward);
  - newly decoded: the columns committed since the row's last forward;
  - window queries: the first `window_length` still-masked columns (all masked columns when
    `block_caching=False`), one column to the left on shifted-logit models (Dream).
  Rows are padded to a common width with padding slots that write to a scratch column nobody attends to.
- Layers run "cached" on the fed rows: write the fed rows' X/q/k/v, attend with the fed queries over every
  column's (partly stale) K/V, and test drift: the cosine, across heads, between the track rows' attention
  from the cached q/K (before this forward's writes) and the fresh one, averaged over track rows and keys.
  From the first layer l with similarity < gamma the row switches: layers l+1.. recompute every column, starting
  from X[l+1] (fresh at the fed columns, stale elsewhere), and overwrite X/q/k/v.
- Logits come from the window queries; only the window's columns may be committed (`commit_mask`).

Per-row independence in a batch: the batch computes in "fed space" ([B, n] fed slots) until the first layer
where some row switches, then in "column space" ([B, T], every column) for all rows; rows that have not switched
keep their cached values at unfed columns (they write X/q/k/v only at their fed columns and their outputs are
read only there), so every row gets what it gets alone. The switch decision costs one small device-to-host
transfer per fed-space layer ([B] drift flags, reduced to one bool); column-space layers sync nothing.

Blocks and windows: the authors decode the whole generation as one region (no blocks). Parity with their code
holds with `block_length = max_tokens`. With smaller blocks the window is clipped to the current block (the
first `window_length` masks of the block: blocks are left to right, so these are the first masks overall);
the first forward of the run is the only full one (block starts are ordinary steps), and rows with no mask
left in the block idle (feed nothing, keep their state) until every row has finished it.

EOS: as the authors do, the first time a stop token is committed (the runtime's stop set: the checkpoint's
stop ids unless `ignore_eos`, plus `stop_token_ids`; the authors use a single `eos_id`), every mask after the
leftmost stop committed in that step is abandoned: it leaves the window, the queries and the "still masked"
set (so it may become a track token), exactly once per row. The engine ends the row when nothing before its
first stop token is masked.

Accounting: `kv_computations` per row per forward = (fed slots, a Dream column fed twice counted twice) x (layers
before the switch) + (the row's columns N) x (layers from the switch on); the first forward counts N x L; an
idle row 0. The authors' "fraction of layers recomputed" F = Σ (L − s) / (L · nfe) over the row's forwards
(s = start_reset; the first forward counted as L + 1, their accounting) is kept per row in `layers_recomputed`
/ `forwards` and in the `trace` records, and reaches `RequestMetrics.cache_stats["layers_recomputed_fraction"]`. For one unpadded row the
engine's kv_fraction = kv_computations / (nfe · N · L) = F − 1 / (L · nfe) + Σ fed · s / (N · L · nfe).

Deviations from the authors' code: the attention weights (drift test, statistic, fed-space attention) are
computed in float32 whatever the model dtype (LLaDA's published path takes the softmax in bf16); EOS is the
runtime's stop set rather than one `eos_id`; when every column happens to be fed, rows are read by mode (as
the oracle does), not by shape; GQA keys are repeated for the drift test (as the oracle does; LLaDA's code
would fail to broadcast); rows are independent in a batch with left padding (theirs is batch 1).

Test hooks (class attributes, not options): `force_drift` = {step: layer} or callable(step) -> layer | None
(step = the row's own forward count, 0 = the full one; layer -1 recomputes every layer), as the oracle's;
`trace` = a list that receives one record per row and forward.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from dllm.cache.base import CachePolicy, ForwardPlan
from dllm.attention import attend
from dllm.errors import InvalidParameterError

_NO_FORCE = -2


def _rep(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _softmax_rows(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) in float32 over the visible keys: q [B, H, m, D], k [B, H, K, D], key_mask [B, 1, 1, K]."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~key_mask, -torch.inf), dim=-1)


class ElasticCache(CachePolicy):
    name = "elastic"
    needs_buffers = False         # owns its per-layer X/Q/K/V buffers
    attentions = ("full",)
    supports_cfg = False
    supports_remask = False   # its cached set is tied to the decode order; not defined for remasking
    tensor_parallel = False   # the drift test compares attention across every head of a layer
    options: ClassVar[dict] = {"window_length": 16, "gamma": 0.9, "track_num": 1, "block_caching": True}

    force_drift = None            # test hook, see the module docstring
    trace: list | None = None     # test hook, see the module docstring

    @classmethod
    def resolve_options(cls, options: dict) -> dict:
        opts = super().resolve_options(options)
        for key in ("window_length", "track_num"):
            if opts[key] < 1:
                raise InvalidParameterError(f"cache option {key} must be >= 1, got {opts[key]}")
        if not math.isfinite(opts["gamma"]):
            raise InvalidParameterError(f"cache option gamma must be a finite number, got {opts['gamma']}")
        return opts

    def allocate(self, batch, length, arch, spec, dtype, device) -> None:
        super().allocate(batch, length, arch, spec, dtype, device)
        self.mask_id = spec.mask_id
        self.L, self.H, self.Hkv, self.D = arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim
        C = length + 1            # the last column is the scratch column of padding slots
        self.X = [torch.zeros(batch, C, arch.hidden_size, dtype=dtype, device=device) for _ in range(self.L)]
        self.Q = [torch.zeros(batch, self.H, C, self.D, dtype=dtype, device=device) for _ in range(self.L)]
        self.K = [torch.zeros(batch, self.Hkv, C, self.D, dtype=dtype, device=device) for _ in range(self.L)]
        self.V = [torch.zeros(batch, self.Hkv, C, self.D, dtype=dtype, device=device) for _ in range(self.L)]
        self.track = torch.zeros(batch, length, dtype=torch.bool, device=device)       # next forward's track set
        self.seen_mask = torch.ones(batch, length, dtype=torch.bool, device=device)    # MASK at the last forward
        self.cutoff = torch.full((batch,), length, dtype=torch.long, device=device)    # first EOS (length: none)
        self.layers_recomputed = torch.zeros(batch, dtype=torch.long, device=device)   # the authors' count
        self.forwards = torch.zeros(batch, dtype=torch.long, device=device)
        self.steps = [0] * batch                                                       # per-row forwards (host)
        self.row_ids = list(range(batch))                                              # for the trace records
        self.started = False

    def row_stats(self, row: int) -> dict:
        """The authors' "fraction of layers recomputed" for this request: sum over its forwards of the layers
        recomputed on every position, over layers x forwards (their accounting: the first forward counts L + 1)."""
        forwards = int(self.forwards[row])
        return {"layers_recomputed_fraction": int(self.layers_recomputed[row]) / (self.L * forwards) if forwards else 0.0}

    def select_rows(self, keep: torch.Tensor) -> None:
        for name in ("X", "Q", "K", "V"):
            setattr(self, name, [t[keep] for t in getattr(self, name)])
        for name in ("track", "seen_mask", "cutoff", "layers_recomputed", "forwards"):
            setattr(self, name, getattr(self, name)[keep])
        rows = keep.tolist()
        self.steps = [self.steps[i] for i in rows]
        self.row_ids = [self.row_ids[i] for i in rows]

    def _forced(self, step: int):
        hook = type(self).force_drift
        if hook is None:
            return None
        return hook(step) if callable(hook) else hook.get(step)

    def plan(self, start, end, step, mask) -> ForwardPlan:
        c = self.canvas
        tokens = c.tokens
        B, T = tokens.shape
        dev = tokens.device
        cols = torch.arange(T, device=dev)
        shift = int(self.shift_logits)
        is_mask = tokens == self.mask_id
        first = not self.started
        self.started = True
        if first:
            new = torch.zeros_like(is_mask)
        else:
            new = self.seen_mask & ~is_mask                          # committed since the row's last forward
            if self.stop_ids is not None and self.stop_ids.numel():
                stop = new & torch.isin(tokens, self.stop_ids)
                where = cols.expand(B, T).masked_fill(~stop, T).min(1).values
                self.cutoff = torch.where(self.cutoff == T, where, self.cutoff)   # once per row
        live = is_mask & (cols[None, :] <= self.cutoff[:, None])        # masks not abandoned after an EOS
        in_block = (cols >= start) & (cols < end)
        cand = live & in_block
        win = cand & (cand.cumsum(1) <= self.opts["window_length"])    # the window: may be committed
        active = win.any(1)
        qsrc = win if self.opts["block_caching"] else live             # masks whose queries are fed
        qsel = torch.zeros_like(qsrc)                                   # the query columns (shifted: one left)
        qsel[:, :T - shift] = qsrc[:, shift:]
        qsel &= active[:, None]
        if first:
            track = torch.zeros_like(is_mask)
            fed_new = torch.ones_like(is_mask)
        else:
            track = self.track & active[:, None]
            fed_new = new & active[:, None]
        counts = torch.stack([track.sum(1), fed_new.sum(1), qsel.sum(1), active.long()])   # [4, B]
        n_t, n_new, n_q, act = counts.tolist()                                               # one transfer
        mt, mq = max(n_t), max(n_q)

        if first:
            index = cols.expand(B, T)
            write = index
            wslot = None
        else:
            big = 3 * T
            keys = torch.cat([torch.where(track, cols, big), torch.where(fed_new, T + cols, big),
                              torch.where(qsel, 2 * T + cols, big)], 1).sort(1).values
            n = max(1, max(a + b + q for a, b, q in zip(n_t, n_new, n_q)))
            keys = keys[:, :n]
            valid = keys < big
            index = torch.where(valid, keys % T, 0)
            write = torch.where(valid, index, T)
            base = (counts[0] + counts[1])[:, None]
            wslot = base + torch.arange(mq, device=dev)[None, :]
        qcols = torch.where(qsel, cols, T).sort(1).values[:, :mq]    # query columns, ascending, T = padding
        qvalid = qcols < T
        if wslot is None:
            wslot = qcols.clamp(max=T - 1)
        wslot = wslot.masked_fill(~qvalid, 0)
        # the fed slot whose output gives each window column's logits (shifted: the query one column left)
        qrank = qsrc.cumsum(1) - 1
        block_win = win[:, start:end]
        if first:
            src = (cols[start:end] - shift).expand(B, -1)
        else:
            src = base + qrank[:, start:end]
        logits_index = torch.where(block_win, src, 0)

        steps = [self.steps[r] if act[r] else None for r in range(B)]
        forced = [self._forced(s) if s is not None and s > 0 else None for s in steps]
        for r in range(B):
            self.steps[r] += act[r]
        self.seen_mask = torch.where(active[:, None], is_mask, self.seen_mask)
        return _ElasticPlan(self, first=first, index=index, write=write, logits_index=logits_index,
                            commit_mask=block_win, active=active, track_cols=track, qsel=qsel, new=fed_new,
                            live=live, win=win, n_t=counts[0], n_fed=counts[:3].sum(0), mt=mt, mq=mq,
                            wslot=wslot, qcols=qcols.clamp(max=T - 1), qvalid=qvalid, forced=forced,
                            steps=steps)


class _ElasticPlan(ForwardPlan):
    """One Elastic-Cache forward: the model calls `layer_input` before each layer (and after the last) and
    `attention` inside each layer; see the module docstring."""

    def __init__(self, pol: ElasticCache, *, first, index, write, logits_index, commit_mask, active, track_cols,
                 qsel, new, live, win, n_t, n_fed, mt, mq, wslot, qcols, qvalid, forced, steps):
        super().__init__(0, 0, None, None, 0, False, index, logits_index, None, commit_mask)
        self.pol, self.first = pol, first
        self.write, self.active, self.new, self.qsel, self.live, self.win = write, active, new, qsel, live, win
        self.track_mask = track_cols
        B, T = pol.canvas.tokens.shape
        self.B, self.T, self.L = B, T, pol.L
        dev = index.device
        self.n_t, self.n_fed, self.mt, self.mq = n_t, n_fed, mt, mq
        self.wslot, self.qcols, self.qvalid = wslot, qcols, qvalid
        ar = torch.arange(mt, device=dev)
        self.tvalid = ar[None, :] < n_t[:, None]                                   # [B, mt]
        self.tcols = index[:, :mt].masked_fill(~self.tvalid, 0) if not first else index[:, :0]
        key_valid = pol.canvas.key_valid
        self.keys_T = torch.ones(B, T, dtype=torch.bool, device=dev) if key_valid is None else key_valid
        self.ncols = self.keys_T.sum(1)                                            # the row's own N
        self.kmask_T = self.keys_T[:, None, None, :]
        self.kmask_C = torch.cat([self.keys_T, torch.zeros(B, 1, dtype=torch.bool, device=dev)], 1)[:, None, None, :]
        self.fedmask = torch.zeros(B, T + 1, dtype=torch.bool, device=dev).scatter_(1, write, True)[:, :T]
        self.steps = steps
        f = torch.tensor([_NO_FORCE if x is None else x for x in forced], dtype=torch.long, device=dev)
        self.forced = f
        L = self.L
        if first:
            self.sr = torch.full((B,), -1, dtype=torch.long, device=dev)
            self.drift_layer = torch.full((B,), _NO_FORCE, dtype=torch.long, device=dev)
            self.column, self.switch_at = True, None
        else:
            self.sr = torch.where(f == -1, 0, L)
            self.drift_layer = torch.where(f == -1, -1, _NO_FORCE)
            restart = any(x == -1 for x in forced)
            self.column, self.switch_at = False, (0 if restart else None)
        self.tops: list[torch.Tensor] = []
        self.sims: list[torch.Tensor] = []

    # ------------------------------------------------------------------ hooks called by the model

    def layer_input(self, layer: int, x: torch.Tensor, positions: torch.Tensor):
        pol, T = self.pol, self.T
        if layer == self.L:                                   # after the last layer: the fed slots, in order
            if self.column and not self.first:
                x = x.gather(1, self.index[..., None].expand(-1, -1, x.shape[-1]))
            self._finish()
            return x, positions
        X = pol.X[layer]
        if not self.column:
            X.scatter_(1, self.write[..., None].expand(-1, -1, x.shape[-1]), x)
            if self.switch_at != layer:
                return x, positions
            self.column = True                                # some row recomputes every column from here
            return X[:, :T].clone(), pol.canvas.positions
        # column space: columns whose hidden state is this forward's own (all for rows already in full mode,
        # the fed ones otherwise); elsewhere the cached layer input (the stale state a switching row reads)
        own = (layer > self.sr)[:, None] | self.fedmask
        x = torch.where(own[..., None], x, X[:, :T])
        X[:, :T] = x
        return x, positions

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pol, H, T = self.pol, self.pol.H, self.T
        Q, K, V = pol.Q[layer], pol.K[layer], pol.V[layer]
        cached = layer < self.sr                               # [B]: this layer runs cached for the row
        past = None
        if not self.first and self.mt:                         # what the cache believed (before the writes)
            tq = Q.gather(2, self.tcols[:, None, :, None].expand(-1, H, -1, Q.shape[-1]))
            kk = K if not self.column else K[:, :, :T]
            past = _softmax_rows(tq, _rep(kk, H), self.kmask_C if not self.column else self.kmask_T)
        if not self.column:                                    # fed space: every row cached
            w = self.write[:, None, :, None]
            K.scatter_(2, w.expand(-1, K.shape[1], -1, K.shape[3]), k)
            V.scatter_(2, w.expand(-1, V.shape[1], -1, V.shape[3]), v)
            Q.scatter_(2, w.expand(-1, H, -1, Q.shape[3]), q)
            out = attend(q, K, V, self.kmask_C)
            # attention weights only for the rows that need them: the track slots (first) and the window queries
            Kr = _rep(K, H)
            cur = _softmax_rows(q[:, :, :self.mt], Kr, self.kmask_C)
            rows = _softmax_rows(q.gather(2, self.wslot[:, None, :, None].expand(-1, H, -1, q.shape[3])), Kr,
                                 self.kmask_C)
            keys = self.kmask_C[:, 0, 0]
        else:                                                  # column space: write per row, attend all columns
            write = (~cached)[:, None] | self.fedmask           # [B, T]
            wm = write[:, None, :, None]
            K[:, :, :T] = torch.where(wm, k, K[:, :, :T])
            V[:, :, :T] = torch.where(wm, v, V[:, :, :T])
            Q[:, :, :T] = torch.where(wm, q, Q[:, :, :T])
            Kt, Vt = K[:, :, :T], V[:, :, :T]
            out = attend(q, Kt, Vt, None if self.pol.canvas.key_valid is None else self.kmask_T)
            Kr = _rep(Kt, H)
            cur = None
            if past is not None:
                cur = _softmax_rows(q.gather(2, self.tcols[:, None, :, None].expand(-1, H, -1, q.shape[3])),
                                    Kr, self.kmask_T)
            rows = _softmax_rows(q.gather(2, self.qcols[:, None, :, None].expand(-1, H, -1, q.shape[3])),
                                 Kr, self.kmask_T)
            keys = self.keys_T
        if not self.first:                                     # drift test of the rows still cached
            if past is not None:
                cos = F.cosine_similarity(past, cur, dim=1)                            # [B, mt, keys]
                ok = self.tvalid[:, :, None] & keys[:, None, :]
                sim = torch.where(ok, cos, 0.0).sum((1, 2)) / (self.n_t * self.ncols)  # nan when no track
            else:
                sim = torch.full((self.B,), torch.nan, device=q.device)
            drift = cached & self.active & ((sim < pol.opts["gamma"]) | (self.forced == layer))
            self.sr = torch.where(drift, layer + 1, self.sr)
            self.drift_layer = torch.where(drift, layer, self.drift_layer)
            if pol.trace is not None:
                self.sims.append(torch.where(cached, sim, torch.nan))
            if not self.column and layer < self.L - 1 and bool(drift.any()):   # one small transfer per layer
                self.switch_at = layer + 1
        elif pol.trace is not None:
            self.sims.append(torch.full((self.B,), torch.nan, device=q.device))
        # the most-attended statistic: attention received from the window queries, MASK columns excluded
        score = torch.where(self.qvalid[:, None, :, None], rows, 0.0).sum((1, 2))[:, :T]
        score = score.masked_fill(self.live, 0.0).masked_fill(~self.keys_T, -torch.inf)
        self.tops.append(score.topk(pol.opts["track_num"], dim=1).indices)
        return out

    # ------------------------------------------------------------------ after the forward

    def _finish(self) -> None:
        pol, L, B, T = self.pol, self.L, self.B, self.T
        active = self.active
        track = torch.zeros(B, T, dtype=torch.bool, device=active.device).scatter_(1, torch.cat(self.tops, 1), True)
        pol.track = torch.where(active[:, None], track, pol.track)
        if self.first:
            kv = self.ncols * L
            recomputed = torch.full_like(self.sr, L + 1)      # the authors count start_reset = -1 as L + 1
        else:
            sr = self.sr.clamp(max=L)
            kv = self.n_fed * sr + self.ncols * (L - sr)
            recomputed = L - sr
        zero = torch.zeros_like(kv)
        self.kv_computations = torch.where(active, kv, zero)
        pol.layers_recomputed += torch.where(active, recomputed, zero)
        pol.forwards += active.long()
        if pol.trace is not None:
            self._record(recomputed)

    def _record(self, recomputed) -> None:
        L = self.L
        sr, kv, rec = self.sr.tolist(), self.kv_computations.tolist(), recomputed.tolist()
        drifts = self.drift_layer.tolist()
        sims = torch.stack(self.sims, 1).tolist() if self.sims else [[None] * L for _ in range(self.B)]
        index, n_fed = self.index.tolist(), self.n_fed.tolist()
        masks = {name: getattr(self, attr).tolist() for name, attr in
                 (("track", "track_mask"), ("new", "new"), ("queries", "qsel"), ("window", "win"))}
        for r in range(self.B):
            if self.steps[r] is None:
                continue
            s = sr[r]
            drift = None if drifts[r] == _NO_FORCE else drifts[r]
            full = list(range(max(s, 0), L))
            self.pol.trace.append({
                "row": self.pol.row_ids[r], "step": self.steps[r], "fed": index[r][:n_fed[r]],
                **{name: [c for c, m in enumerate(val[r]) if m] for name, val in masks.items()},
                "drift_layer": drift, "full_layers": full, "layers_recomputed": rec[r], "kv": kv[r],
                "sims": [None if x is None or math.isnan(x) else x for x in sims[r]]})

"""The TiDAR decoding loop (and plain AR decoding of the same model): a run over a batch of requests with their
own prompt lengths, accepting different numbers of drafts per row, through the model runner with explicit
boolean masks and an exact K/V cache. See `decoding/tidar.py` for one step's layout.

K/V storage per row, columns = positions: [0, length) the cached committed tokens; a step writes its causal rows
(the pending token and the drafts) at their own positions, so that the accepted ones are already in place and
accepting j drafts is `length += j + 1`; the MASK rows of the branches go to scratch columns after the longest
sequence, rewritten every step. A key column is visible to a query only through the step's mask, built from the
lengths, so stale K/V past `length` (rejected drafts) is never read.

The run has the engine's run interface: `events(marks)`, `drop(request_ids)`, `close()`.
"""
from __future__ import annotations

import time

import torch

from dllm.decoding.tidar import sample_rows, uniform_rows, verify_greedy, verify_sample
from dllm.outputs import CompletionOutput, RequestMetrics, RequestOutput, StreamEvent


class _Plan:
    """The runner's gathered-columns plan: fed K/V written at `write` [B, W], keys = the whole buffer under
    `attn_mask` [B, 1, W, K]."""

    def __init__(self, buffers, write: torch.Tensor, attn_mask: torch.Tensor):
        self.buffers, self.write, self.attn_mask = buffers, write, attn_mask
        self.index = write   # marks the plan as gathered (the runner reads write and attn_mask)


class _Row:
    def __init__(self, request, generator):
        self.request, self.generator = request, generator
        self.token_ids: list[int] = []
        self.nfe = 0
        self.kv_per_step: list[int] = []   # token x layer K/V computed by each forward it was in
        self.drafted = 0
        self.accepted = 0
        self.emitted_tokens = 0
        self.emitted_text = ""
        self.finish: str | None = None


class TiDARRun:
    def __init__(self, engine, requests, stream: bool = True, pool_rows: int = 0):
        self.engine, self.spec, self.stream = engine, engine.spec, stream
        self.params = p = requests[0].params
        self.k = engine.strategy_state["draft_length"]
        self.bonus = engine.strategy_state.get("bonus_token", True)
        self.device = engine.device
        self.rows = [_Row(r, None if r.params.seed is None else
                          torch.Generator(device=self.device).manual_seed(r.params.seed)) for r in requests]
        self.prompts = [list(r.prompt_token_ids) for r in requests]
        self.temperature = float(p.temperature or 0.0)
        stops = sorted(set(() if p.ignore_eos else self.spec.stop_ids) | set(p.stop_token_ids))
        self.stop_ids = torch.tensor(stops or [-1], dtype=torch.long, device=self.device)
        longest = max(len(x) for x in self.prompts) + p.max_tokens + self.k + 1
        self.scratch = longest                                  # first column of the MASK rows
        self.width = longest + (self.k + 1) ** 2 * (self.k > 0)
        engine.runner.prepare(max(len(requests), pool_rows), self.width)
        self.buffers = engine.runner.kv_buffers(len(requests), self.width)
        self.closed = False
        self.num_layers = engine.loaded.arch.num_layers
        self.start_time = time.perf_counter()
        self.pending: torch.Tensor | None = None   # [B] the last committed token (K/V not cached yet)
        self.length: torch.Tensor | None = None    # [B] cached columns (= the pending token's position)
        self.drafts: torch.Tensor | None = None    # [B, k] drafts for positions length+1..length+k
        self.q: torch.Tensor | None = None         # [B, k, V] their distributions (sampling only)
        self.last_ar_logits = None   # [B, k+1, V] of the last step (tests compare them with an uncached forward)

    # ------------------------------------------------------------------ the engine's run interface

    def events(self, marks: bool = False):
        try:
            yield from self._events(marks)
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.engine.runner.release(self.buffers)

    def drop(self, request_ids: set[str]) -> None:
        keep = [i for i, row in enumerate(self.rows) if row.request.request_id not in request_ids]
        if len(keep) < len(self.rows):
            self._select_rows(keep)

    # ------------------------------------------------------------------ the loop

    def _events(self, marks: bool):
        self._prefill()
        yield from self._emit()
        while self.rows:
            if marks:
                yield None
            self._step()
            yield from self._emit()

    def _prefill(self) -> None:
        """The prompt (causal; rows right-padded, padding never visible to a real query) + one branch after it: the
        first token and the first drafts; no draft to verify."""
        b, dev = len(self.rows), self.device
        lens = torch.tensor([len(x) for x in self.prompts], device=dev)
        ids = torch.full((b, int(lens.max())), self.spec.pad_id, dtype=torch.long, device=dev)
        for i, x in enumerate(self.prompts):
            ids[i, :len(x)] = torch.tensor(x, device=dev)
        self.length = lens                                          # the prompt's K/V is cached by this forward
        self.drafts = torch.zeros(b, 0, dtype=torch.long, device=dev)
        cols = torch.arange(ids.shape[1], device=dev).expand(b, -1)
        self._forward_and_commit(ids, cols, (lens - 1)[:, None], lens - 1, int(self.k > 0))

    def _step(self) -> None:
        """[pending token, drafts] (causal) + k+1 branches: verify, commit, take the next drafts."""
        b, k, dev = len(self.rows), self.k, self.device
        ids = torch.cat([self.pending[:, None], self.drafts], 1)                       # [B, k+1]
        pos = self.length[:, None] + torch.arange(k + 1, device=dev)                    # t at n = length
        self._forward_and_commit(ids, pos, torch.arange(k + 1, device=dev).expand(b, -1), self.length,
                                 (k + 1) * (k > 0))

    def _forward_and_commit(self, ids, pos, ar_index, last, num_branches: int) -> None:
        """One forward over the causal rows `ids` at `pos` (their K/V written at their positions) and
        `num_branches` branches after `last`; the AR logits come from rows `ar_index` [B, A]."""
        b, k = ids.shape[0], self.k
        visible = _keys(self.width, self.device)[None, None, :] <= pos[:, :, None]     # [B, W, K] causal
        if num_branches:
            br = self._branches(last, num_branches)
            ids, visible = torch.cat([ids, br.ids], 1), torch.cat([visible, br.mask], 1)
            ar_index = torch.cat([ar_index, pos.shape[1] + br.logit_rows], 1)
            pos, write = torch.cat([pos, br.positions], 1), torch.cat([pos, br.write], 1)
        else:
            write = pos
        logits = self._forward(ids, pos, write, visible, ar_index)
        num_ar = ar_index.shape[1] - num_branches * (k + 1)
        ar_logits = self.last_ar_logits = logits[:, :num_ar]                          # [B, A, V]
        verifying = self.drafts.shape[1] > 0
        zeros = torch.zeros(b, dtype=torch.long, device=self.device)
        if not verifying:
            accepted, token = zeros, self._sample(ar_logits[:, -1])
        elif self.temperature == 0:
            accepted, token = verify_greedy(self.drafts, ar_logits)
        else:
            gens = [r.generator for r in self.rows]
            p = torch.softmax(ar_logits.double() / self.temperature, -1)
            accepted, token = verify_sample(self.drafts, self.q, p, uniform_rows(b, k, gens, self.device), gens)
        # without the bonus token a fully accepted row commits its k drafts only; d_k becomes the pending token
        # (fed again, its K/V recomputed) and the next drafts start one position earlier in the branch
        bonus = (accepted < k) | self.bonus if verifying else torch.ones_like(accepted, dtype=torch.bool)
        self._commit(self.drafts, accepted, token, bonus)
        if num_branches:
            self._take_drafts(logits[:, num_ar:].view(b, num_branches, k + 1, -1), accepted, bonus)

    def _branches(self, last: torch.Tensor, count: int) -> "_Branches":
        """`count` branches of k+1 MASK rows; branch j at positions last+j+1.., seeing keys [0, last + j] and its
        own scratch columns."""
        b, size, dev = last.shape[0], self.k + 1, self.device
        j = torch.arange(count, device=dev).repeat_interleave(size)                    # [count * size]
        r = torch.arange(size, device=dev).repeat(count)
        positions = last[:, None] + j + 1 + r                                           # [B, count * size]
        write = (self.scratch + torch.arange(count * size, device=dev)).expand(b, -1)
        keys = _keys(self.width, dev)
        sees_prefix = keys[None, None, :] <= (last[:, None] + j)[:, :, None]            # [B, count * size, K]
        first = (self.scratch + j * size)[:, None]
        own = (keys[None, :] >= first) & (keys[None, :] < first + size)                 # [count * size, K]
        ids = torch.full_like(positions, self.spec.mask_id)
        rows = torch.arange(count, device=dev)[:, None] * size + torch.arange(size, device=dev)
        return _Branches(ids, positions, write, sees_prefix | own[None], rows.reshape(1, -1).expand(b, -1))

    def _forward(self, ids, positions, write, visible, logits_index) -> torch.Tensor:
        for row in self.rows:
            row.nfe += 1
            row.kv_per_step.append(ids.shape[1] * self.num_layers)
        plan = _Plan(self.buffers, write, visible[:, None])
        return self.engine.runner.forward(ids, positions, plan, logits_index)   # valid until the next forward

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.double() / self.temperature, -1)
        return sample_rows(probs, [r.generator for r in self.rows])

    def _take_drafts(self, pre: torch.Tensor, accepted: torch.Tensor, after_token: torch.Tensor) -> None:
        """pre [B, branches, k+1, V]: the drafts (and, sampling, their distributions) of branch `accepted`: its rows
        1..k when the AR token was committed (row 0 sits at its position), else rows 0..k-1."""
        rows = torch.arange(pre.shape[0], device=self.device)
        first = after_token.long()[:, None] + torch.arange(self.k, device=self.device)   # [B, k]
        chosen = pre[rows, accepted].gather(1, first[..., None].expand(-1, -1, pre.shape[-1]))   # [B, k, V]
        if self.temperature == 0:
            self.drafts = chosen.argmax(-1)
            return
        self.q = torch.softmax(chosen.double() / self.temperature, -1)
        b, k, v = self.q.shape
        self.drafts = sample_rows(self.q.reshape(b * k, v), [g for g in (r.generator for r in self.rows)
                                                             for _ in range(k)]).view(b, k)

    def _commit(self, drafts: torch.Tensor, accepted: torch.Tensor, token: torch.Tensor,
                take_token: torch.Tensor) -> None:
        """Rows take drafts[:accepted] and, where `take_token`, `token`; the last committed token becomes the pending
        one. After a step the old pending token and the committed tokens before the new pending one are cached
        (the prefill's prompt was counted when it was fed)."""
        counts = accepted + take_token.long()
        if self.pending is not None:
            self.length = self.length + counts
        new = torch.cat([drafts, token[:, None]], 1)
        new.scatter_(1, accepted[:, None], token[:, None])          # not committed where take_token is False
        self.pending = new.gather(1, (counts - 1)[:, None])[:, 0]
        counts, num_accepted, new_list = counts.tolist(), accepted.tolist(), new.tolist()
        stop = set(self.stop_ids.tolist())
        for i, row in enumerate(self.rows):
            row.drafted += drafts.shape[1]
            row.accepted += num_accepted[i]
            for t in new_list[i][:counts[i]]:
                row.token_ids.append(t)
                if t in stop:
                    row.finish = "stop"
                    break
                if len(row.token_ids) >= row.request.params.max_tokens:
                    row.finish = "length"
                    break

    # ------------------------------------------------------------------ outputs

    def _emit(self):
        done = []
        for i, row in enumerate(self.rows):
            if row.finish is not None or (self.stream and len(row.token_ids) > row.emitted_tokens):
                yield self._event(row)
            if row.finish is not None:
                done.append(i)
        if done:
            self._select_rows([i for i in range(len(self.rows)) if i not in done])

    def _event(self, row: _Row) -> StreamEvent:
        tok = self.engine.tokenizer
        stopped = row.finish == "stop"
        ids = row.token_ids[:-1] if stopped else row.token_ids
        text = "" if tok is None else tok.decode(ids, skip_special_tokens=row.request.params.skip_special_tokens)
        if row.finish is None and text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        delta_ids = row.token_ids[row.emitted_tokens:]
        delta_text = text[len(row.emitted_text):] if text.startswith(row.emitted_text) else text
        row.emitted_tokens, row.emitted_text = len(row.token_ids), text
        output = self._output(row, text) if row.finish is not None else None
        return StreamEvent(row.request.request_id, delta_text, delta_ids, 0, 1, output)

    def _output(self, row: _Row, text: str) -> RequestOutput:
        r = row.request
        latency = time.perf_counter() - (r.arrival or self.start_time)
        stats = {"draft_length": self.k, "drafted_tokens": row.drafted, "accepted_tokens": row.accepted,
                 "accepted_per_step": round(row.accepted / max(1, row.nfe - 1), 3)}
        # kv_fraction: against recomputing the whole sequence (prompt + generated) at every forward
        full = row.nfe * (len(r.prompt_token_ids) + len(row.token_ids)) * self.num_layers
        metrics = RequestMetrics(nfe=row.nfe, num_tokens=len(row.token_ids), latency_s=latency,
                                 kv_computations=sum(row.kv_per_step), kv_fraction=sum(row.kv_per_step) / full,
                                 kv_computations_per_step=row.kv_per_step, strategy_stats=stats)
        return RequestOutput(r.request_id, r.prompt, list(r.prompt_token_ids),
                             [CompletionOutput(0, text, list(row.token_ids), row.finish)], metrics)

    def _select_rows(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        self.prompts = [self.prompts[i] for i in keep]
        if not keep:
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.length, self.pending, self.drafts = self.length[idx], self.pending[idx], self.drafts[idx]
        if self.temperature > 0 and self.k:
            self.q = self.q[idx]
        self.buffers.select_rows(idx)


class _Branches:
    def __init__(self, ids, positions, write, mask, logit_rows):
        self.ids, self.positions, self.write, self.mask, self.logit_rows = ids, positions, write, mask, logit_rows


def _keys(width: int, device) -> torch.Tensor:
    return torch.arange(width, device=device)


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
        """Prompt (causal) + one branch after it: the first AR token and the first drafts."""
        b, k, dev = len(self.rows), self.k, self.device
        lens = torch.tensor([len(x) for x in self.prompts], device=dev)
        width = int(lens.max())
        ids = torch.full((b, width), self.spec.pad_id, dtype=torch.long, device=dev)
        for i, x in enumerate(self.prompts):
            ids[i, :len(x)] = torch.tensor(x, device=dev)
        cols = torch.arange(width, device=dev).expand(b, -1)
        visible = _keys(self.width, dev)[None, None, :] <= cols[:, :, None]             # [B, W, K] causal
        ar_index = (lens - 1)[:, None]
        self.length = lens.clone()
        if k == 0:
            self.drafts = torch.zeros(b, 0, dtype=torch.long, device=dev)
            logits = self._forward(ids, cols, cols, visible, ar_index)
            self.last_ar_logits = logits
            self._commit(torch.zeros(b, 0, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.long, device=dev),
                         self._sample(logits[:, 0]))
            return
        branch = self._branches(lens - 1, 1)                                            # one branch, j = 0
        logits = self._forward(torch.cat([ids, branch.ids], 1), torch.cat([cols, branch.positions], 1),
                               torch.cat([cols, branch.write], 1), torch.cat([visible, branch.mask], 1),
                               torch.cat([ar_index, width + branch.logit_rows], 1))
        self.last_ar_logits = logits[:, :1]
        token = self._sample(logits[:, 0])
        self._commit(torch.zeros(b, 0, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.long, device=dev),
                     token)
        self._take_drafts(logits[:, 1:].unsqueeze(1), torch.zeros(b, dtype=torch.long, device=dev))

    def _step(self) -> None:
        b, k, dev = len(self.rows), self.k, self.device
        n = self.length                                                                 # [B] position of t
        causal_ids = torch.cat([self.pending[:, None], self.drafts], 1)                 # [B, k+1]
        pos = n[:, None] + torch.arange(k + 1, device=dev)                              # [B, k+1]
        visible = _keys(self.width, dev)[None, None, :] <= pos[:, :, None]
        ar_index = torch.arange(k + 1, device=dev).expand(b, -1)
        if k == 0:
            logits = self._forward(causal_ids, pos, pos, visible, ar_index)
            self.last_ar_logits = logits
            self._commit(self.drafts, torch.zeros(b, dtype=torch.long, device=dev), self._sample(logits[:, 0]))
            return
        branch = self._branches(n, k + 1)
        logits = self._forward(torch.cat([causal_ids, branch.ids], 1), torch.cat([pos, branch.positions], 1),
                               torch.cat([pos, branch.write], 1), torch.cat([visible, branch.mask], 1),
                               torch.cat([ar_index, k + 1 + branch.logit_rows], 1))
        ar_logits, pre = logits[:, :k + 1], logits[:, k + 1:].view(b, k + 1, k, -1)     # [B, k+1, V], [B, k+1, k, V]
        self.last_ar_logits = ar_logits
        gens = [r.generator for r in self.rows]
        if self.temperature == 0:
            accepted, token = verify_greedy(self.drafts, ar_logits)
        else:
            p = torch.softmax(ar_logits.double() / self.temperature, -1)
            accepted, token = verify_sample(self.drafts, self.q, p, uniform_rows(b, k, gens, dev), gens)
        self._commit(self.drafts, accepted, token)
        self._take_drafts(pre, accepted)

    def _branches(self, last: torch.Tensor, count: int) -> "_Branches":
        """`count` branches of k+1 MASK rows; branch j at positions last+j+1.., seeing keys [0, last + j]."""
        b, k, dev = last.shape[0], self.k, self.device
        size = k + 1
        j = torch.arange(count, device=dev).repeat_interleave(size)                    # [count * size]
        r = torch.arange(size, device=dev).repeat(count)
        positions = last[:, None] + j + 1 + r                                           # [B, count * size]
        write = (self.scratch + torch.arange(count * size, device=dev)).expand(b, -1)
        keys = _keys(self.width, dev)
        sees_prefix = keys[None, None, :] <= (last[:, None] + j)[:, :, None]            # [B, count*size, K]
        own = (keys[None, :] >= (self.scratch + j * size)[:, None]) & (keys[None, :] < (self.scratch + (j + 1) * size)[:, None])
        mask = sees_prefix | own[None]
        ids = torch.full_like(positions, self.spec.mask_id)
        logit_rows = (torch.arange(count, device=dev)[:, None] * size + torch.arange(1, size, device=dev)).reshape(1, -1)
        return _Branches(ids, positions, write, mask, logit_rows.expand(b, -1))

    def _forward(self, ids, positions, write, visible, logits_index) -> torch.Tensor:
        for row in self.rows:
            row.nfe += 1
            row.kv_per_step.append(ids.shape[1] * self.num_layers)
        plan = _Plan(self.buffers, write, visible[:, None])
        return self.engine.runner.forward(ids, positions, plan, logits_index).float()

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.double() / self.temperature, -1)
        return sample_rows(probs, [r.generator for r in self.rows])

    def _take_drafts(self, pre: torch.Tensor, accepted: torch.Tensor) -> None:
        """pre [B, branches, k, V]: the drafts (and, sampling, their distributions) of branch `accepted`."""
        rows = torch.arange(pre.shape[0], device=self.device)
        chosen = pre[rows, accepted]                                                    # [B, k, V]
        if self.temperature == 0:
            self.drafts = chosen.argmax(-1)
            return
        self.q = torch.softmax(chosen.double() / self.temperature, -1)
        b, k, v = self.q.shape
        self.drafts = sample_rows(self.q.reshape(b * k, v), [g for g in (r.generator for r in self.rows)
                                                             for _ in range(k)]).view(b, k)

    def _commit(self, drafts: torch.Tensor, accepted: torch.Tensor, token: torch.Tensor) -> None:
        """Rows take drafts[:accepted] and `token`; the pending token and the accepted drafts are now cached."""
        if hasattr(self, "pending"):
            self.length = self.length + accepted + 1
        self.pending = token
        new = torch.cat([drafts, token[:, None]], 1)
        new.scatter_(1, accepted[:, None], token[:, None])
        counts, new_list = (accepted + 1).tolist(), new.tolist()
        stop = set(self.stop_ids.tolist())
        for i, row in enumerate(self.rows):
            row.drafted += drafts.shape[1]
            row.accepted += counts[i] - 1
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


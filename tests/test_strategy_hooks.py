"""The engine's hooks for strategies beyond commit-only selection, on the bundled zoo models:

- remasking (`StepEdits.remask`): applied, counted in metrics, never touching the prompt; streamed text never
  changes once emitted (nothing right of `final_limit` is emitted); a re-masked stop token un-stops the row;
  caches that reuse K/V refresh at the next forward;
- truncation (`StepEdits.truncate`): the row ends at the cut and its later columns are no longer attended to;
- a strategy's own forward (`ctx.forward`): the scratch-column pass equals a plain forward of the same tokens.
"""
from __future__ import annotations

import pytest
import torch

from dllm import LLM, SamplingParams
from dllm.decoding import STRATEGIES
from dllm.decoding.base import StepEdits, Strategy, chosen_probability


class RemaskOnce(Strategy):
    """Commit the most confident masked position each step; every third step, re-mask the most recently
    committed generated position (the whole generation is the span)."""

    name = "remask-once"
    logits_span = "generation"
    remasks = True
    families = ("llada", "dream")
    period = 3   # re-mask at every period-th step

    def max_forwards(self, block_length):
        return 4 * block_length

    def begin_block(self, masked):
        super().begin_block(masked)
        self.last = None

    def step(self, logits, masked, generators, first_only=False):
        x0 = logits.argmax(-1)
        conf = chosen_probability(x0, torch.softmax(logits.float(), -1), masked)
        commit = torch.zeros_like(masked).scatter_(-1, conf.argmax(-1, keepdim=True), True) & masked
        remask = self.last if self.step_index % self.period == self.period - 1 else None
        self.last = commit.clone()
        self.step_index += 1
        return StepEdits(x0, commit, remask)

    def final_limit(self):
        return [self.canvas.gen_start] * self.canvas.batch_size   # anything generated may still change


class TruncateAt(Strategy):
    """Commit one position a step, left to right, and end every row's canvas `keep` columns into the generation
    at the first step."""

    name = "truncate-at"
    families = ("llada",)
    keep = 5

    def step(self, logits, masked, generators, first_only=False):
        x0 = logits.argmax(-1)
        first = masked.long().argmax(-1, keepdim=True)
        commit = torch.zeros_like(masked).scatter_(-1, first, True) & masked
        cut = [self.canvas.gen_start + self.keep] * masked.shape[0] if self.step_index == 0 else None
        self.step_index += 1
        return StepEdits(x0, commit, truncate=cut)


@pytest.fixture
def strategies(monkeypatch):
    monkeypatch.setitem(STRATEGIES, RemaskOnce.name, RemaskOnce)
    monkeypatch.setitem(STRATEGIES, TruncateAt.name, TruncateAt)


PROMPTS = ["What is 12 + 7?", "Write the word cat twice."]


@pytest.mark.parametrize("cache", ["none"])
def test_remasks_are_applied_counted_and_never_streamed_early(strategies, cache):
    llm = LLM("tiny-llada", strategy=RemaskOnce.name, cache=cache, device="cpu", dtype="float32")
    sp = SamplingParams(max_tokens=16, block_length=16, temperature=0, ignore_eos=True)
    events = list(llm.stream(PROMPTS, sp))
    outs = {e.request_id: e.output for e in events if e.output is not None}
    for rid, out in outs.items():
        assert out.metrics.num_remasked > 0
        assert out.metrics.nfe > len(out.token_ids)          # remasks cost extra forwards
        assert llm.spec.mask_id not in out.token_ids
        streamed = [e for e in events if e.request_id == rid]
        assert all(e.output is not None or not e.delta_token_ids for e in streamed)   # nothing before the end
        assert "".join(e.delta_text for e in streamed) == out.text


def test_remasking_strategies_need_a_cache_that_feeds_everything(strategies):
    from dllm.errors import InvalidParameterError
    with pytest.raises(InvalidParameterError, match="use cache none"):
        LLM("tiny-llada", strategy=RemaskOnce.name, cache="dual", device="cpu")


def test_a_remasked_stop_token_unstops_the_row(strategies, monkeypatch):
    """Force the model's first commit to be the stop token, then remask it: the row must go on."""
    llm = LLM("tiny-llada", strategy=RemaskOnce.name, device="cpu", dtype="float32")
    stop = llm.spec.stop_ids[0]
    calls = {"n": 0}
    original = RemaskOnce.step

    def step(self, logits, masked, generators, first_only=False):
        calls["n"] += 1
        if calls["n"] == 1:                                   # commit a stop token at the first position
            x0 = torch.full_like(masked, stop, dtype=torch.long)
            commit = torch.zeros_like(masked)
            commit[:, 0] = True
            self.last = commit.clone()
            self.step_index += 1
            return StepEdits(x0, commit)
        if calls["n"] == 2:                                   # and take it back
            self.step_index += 1
            return StepEdits(logits.argmax(-1), torch.zeros_like(masked), self.last)
        return original(self, logits, masked, generators, first_only)

    monkeypatch.setattr(RemaskOnce, "step", step)
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, block_length=8, temperature=0))[0]
    assert out.metrics.nfe > 2 and len(out.token_ids) >= 1
    assert out.metrics.num_remasked >= 1


@pytest.mark.parametrize("cache", ["none", "dual", "prefix"])
def test_caches_refresh_after_a_remask(strategies, cache, monkeypatch):
    """After a remask, a policy that reuses K/V plans a full forward."""
    from dllm.cache.base import CachePolicy
    seen = []
    original = CachePolicy.on_remask

    def on_remask(self, remasked):
        seen.append(int(remasked.sum()))
        original(self, remasked)

    monkeypatch.setattr(CachePolicy, "on_remask", on_remask)
    monkeypatch.setattr(RemaskOnce, "logits_span", "block")
    llm = LLM("tiny-llada", strategy=RemaskOnce.name, cache=cache, device="cpu", dtype="float32")
    fed = []
    forward = llm.engine.runner.forward

    def record(ids, positions, plan, logits_index):
        fed.append(ids.shape[1])
        return forward(ids, positions, plan, logits_index)

    llm.engine.runner.forward = record
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=16, block_length=8, temperature=0, ignore_eos=True))[0]
    assert seen and out.metrics.num_remasked == sum(seen)
    full = fed[0]
    refreshes = sum(1 for n in fed[1:] if n == full)
    assert refreshes >= len(seen) if cache != "none" else True


def test_truncation_ends_the_row_and_hides_later_keys(strategies):
    llm = LLM("tiny-llada", strategy=TruncateAt.name, device="cpu", dtype="float32")
    sp = SamplingParams(max_tokens=16, block_length=16, temperature=0, ignore_eos=True)
    out = llm.generate(PROMPTS, sp)
    assert all(len(o.token_ids) == TruncateAt.keep for o in out)
    assert all(o.metrics.nfe == TruncateAt.keep for o in out)
    # the same decode on a canvas that was never longer: a row that only ever had `keep` masks
    short = llm.generate(PROMPTS, SamplingParams(max_tokens=TruncateAt.keep, block_length=TruncateAt.keep,
                                                 temperature=0, ignore_eos=True))
    # step 1 saw the long canvas (before the cut), later steps the short one: equal from the second token on
    # when the first token agrees; the first token itself may differ, so compare only where it does
    for a, b in zip(out, short):
        if a.token_ids[0] == b.token_ids[0]:
            assert a.token_ids == b.token_ids


class _Masked:
    index = None
    buffers = None

    def __init__(self, mask):
        self.attn_mask = mask

    def kv(self, layer, k, v):
        return k, v


@pytest.mark.parametrize("cache", ["none", "block", "dual"])
def test_scratch_forward_equals_a_plain_forward(cache, monkeypatch):
    """On a block-causal model the cached prefix does not depend on what follows, so ctx.forward of the current
    block (its masks filled in, block-internal attention) equals the model run on [prefix + block] under the
    canvas's own block-causal mask, batched with left padding, through every cache."""
    from dllm.decoding.threshold import ThresholdStrategy
    monkeypatch.setattr(ThresholdStrategy, "scratch_width", lambda self, block_length: block_length)
    llm = LLM("tiny-sdar", strategy="threshold", cache=cache, device="cpu", dtype="float32")
    captured = {}
    original = ThresholdStrategy.step

    def step(self, logits, masked, generators, first_only=False):
        if "scratch" not in captured and self.block_start > 0:
            start, width = self.block_start, masked.shape[1]
            c = self.canvas
            ids = c.tokens[:, start:start + width].clone()
            ids[masked] = 5                                           # some tokens in place of the masks
            pos = c.positions[:, start:start + width]
            visible = torch.ones(ids.shape[0], width, width, dtype=torch.bool)
            captured["scratch"] = self.ctx.forward(ids, pos, visible, start).clone()
            n = start + width
            full_ids = torch.cat([c.tokens[:, :start], ids], 1)
            mask = c.attn_mask(0, n, n)
            captured["plain"] = llm.loaded.model(full_ids, c.positions[:, :n], _Masked(mask),
                                                 logits_range=(start, n))
        return original(self, logits, masked, generators, first_only)

    ThresholdStrategy.step = step
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, block_length=4, temperature=0, ignore_eos=True))
    finally:
        ThresholdStrategy.step = original
    torch.testing.assert_close(captured["scratch"], captured["plain"], rtol=1e-4, atol=1e-4)
    assert all(o.metrics.nfe >= 2 * 2 for o in outs)   # at least one extra forward counted on top of the blocks


class RemaskInBlock(RemaskOnce):
    """Commit the most confident masked position of the block; every other step re-mask the last commit (the block
    is the span, so text left of the block start is final)."""

    name = "remask-in-block"
    logits_span = "block"
    families = ("llada",)
    period = 2

    def max_forwards(self, block_length):
        return 3 * block_length

    def final_limit(self):
        return [self.block_start] * self.canvas.batch_size


def test_streamed_text_never_changes_once_emitted(monkeypatch):
    """Text left of `final_limit` streams block by block; every emitted prefix is a prefix of the final output."""
    monkeypatch.setitem(STRATEGIES, RemaskInBlock.name, RemaskInBlock)
    llm = LLM("tiny-llada", strategy=RemaskInBlock.name, device="cpu", dtype="float32")
    sp = SamplingParams(max_tokens=16, block_length=4, temperature=0, ignore_eos=True)
    events = list(llm.stream(PROMPTS, sp))
    for rid in {e.request_id for e in events}:
        mine = [e for e in events if e.request_id == rid]
        out = mine[-1].output
        assert out is not None and out.metrics.num_remasked > 0
        emitted, text = [], ""
        for e in mine:
            emitted += e.delta_token_ids
            text += e.delta_text
            assert out.token_ids[:len(emitted)] == emitted
            assert out.text.startswith(text)
        assert sum(1 for e in mine[:-1] if e.delta_token_ids) >= 2     # it did stream before the end
        assert emitted == out.token_ids and text == out.text

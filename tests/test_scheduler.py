"""The step scheduler (dllm/scheduler.py) through `LLM.add_request` / `step`: requests that arrive while others
decode start at the next step, finish on their own schedule, reuse freed slots, and get exactly the tokens they
get decoding alone (float32, temperature 0), for every family and cache."""
from __future__ import annotations

import pytest

from checkpoints import break_after
from dllm import LLM, SamplingParams
from dllm.errors import InvalidParameterError

LONG = dict(max_tokens=32, block_length=8, ignore_eos=True, seed=1)   # seeded: Dream's default rule draws
SHORT = dict(max_tokens=8, block_length=8, ignore_eos=True, seed=2)

CASES = [("tiny_llada", c) for c in ("none", "prefix", "dual", "dkv", "freecache", "elastic")] + \
        [("tiny_dream", c) for c in ("none", "dual")] + [("tiny_sdar", c) for c in ("none", "block")]


def _drain(llm, log=None) -> dict:
    outputs = {}
    while llm.has_unfinished_requests():
        for event in llm.step():
            if event.output is not None:
                outputs[event.request_id] = event.output
                if log is not None:
                    log.append((event.request_id, llm.scheduler.num_steps))
    return outputs


@pytest.mark.parametrize("fixture,cache", CASES)
def test_late_request_starts_at_the_next_step_and_equals_decoding_alone(request, fixture, cache):
    llm = LLM(str(request.getfixturevalue(fixture)), cache=cache, strategy="reference", device="cpu",
              dtype="float32", max_batch_size=4)
    one_a_step = dict(steps=8, remasking="low_confidence_static") if fixture == "tiny_sdar" else {}  # per block
    long_params = SamplingParams(**LONG, **(one_a_step or {"steps": 32}))
    short_params = SamplingParams(**SHORT, **(one_a_step or {"steps": 8}))
    early = llm.add_request([5, 6, 7, 8, 9], long_params)
    llm.step()
    llm.step()
    late = llm.add_request([11, 12, 13], short_params)
    events = llm.step()
    assert llm.scheduler.num_running == 2 and len(llm.scheduler.cohorts) == 2    # joined at this step
    assert not llm.scheduler.waiting and {e.request_id for e in events} <= {early, late}
    log = []
    outputs = _drain(llm, log)
    assert [rid for rid, _ in log] == [late, early]       # the late, short request does not wait for the long one
    alone_long = llm.generate([[5, 6, 7, 8, 9]], long_params)[0]
    alone_short = llm.generate([[11, 12, 13]], short_params)[0]
    assert outputs[early].outputs[0].token_ids == alone_long.outputs[0].token_ids
    assert outputs[late].outputs[0].token_ids == alone_short.outputs[0].token_ids
    assert outputs[early].metrics.nfe == alone_long.metrics.nfe
    assert llm.engine.runner.taken == {}                   # every cohort gave its slots back


def test_slots_are_reused_and_more_prompts_than_slots_finish_in_order(tiny_llada):
    llm = LLM(str(tiny_llada), cache="dual", strategy="reference", device="cpu", dtype="float32", max_batch_size=2)
    params = SamplingParams(**SHORT)
    prompts = [[5 + i, 6, 7] for i in range(7)]
    ids = [llm.add_request(p, params) for p in prompts]
    in_use, log, outputs = [], [], {}
    while llm.has_unfinished_requests():
        for event in llm.step():
            if event.output is not None:
                log.append(event.request_id)
                outputs[event.request_id] = event.output
        in_use.append(llm.scheduler.slots_in_use)
        assert len(llm.engine.runner.taken) <= 2
    assert log == ids                                    # first come, first served
    assert max(in_use) <= 2 and llm.engine.runner.pool.slots == 2   # the pool never grew past the slots
    alone = [llm.generate([p], params)[0] for p in prompts]
    assert [outputs[i].outputs[0].token_ids for i in ids] == [o.outputs[0].token_ids for o in alone]


def test_cohorts_hold_disjoint_pool_slots(tiny_llada):
    llm = LLM(str(tiny_llada), cache="dual", strategy="reference", device="cpu", dtype="float32", max_batch_size=4)
    llm.add_request([5, 6, 7], SamplingParams(**LONG))
    llm.step()
    llm.add_request([8, 9], SamplingParams(**LONG))     # arrive together: one cohort, after the first
    llm.add_request([10, 11], SamplingParams(**LONG))
    llm.step()
    runner = llm.engine.runner
    assert [len(c.open) for c in llm.scheduler.cohorts] == [1, 2]
    assert all(runner.pool.owns(c.run.cache.buffers) for c in llm.scheduler.cohorts)
    assert sorted(runner.taken.items()) == [(0, 1), (1, 2)]
    _drain(llm)
    assert runner.taken == {}


def test_abort_frees_the_slot_and_the_others_decode_on(tiny_llada):
    llm = LLM(str(tiny_llada), cache="dual", strategy="reference", device="cpu", dtype="float32", max_batch_size=2)
    params = SamplingParams(**LONG)
    a = llm.add_request([5, 6, 7], params)
    b = llm.add_request([8, 9, 10], params)
    c = llm.add_request([11, 12], params)             # waits: both slots are taken
    llm.step()
    assert llm.scheduler.num_waiting == 1
    assert llm.abort_request(a)
    assert not llm.abort_request("no-such-request")
    events = llm.step()                                # a's slot goes to c at this step
    assert a not in {e.request_id for e in events} and llm.scheduler.num_waiting == 0
    outputs = _drain(llm)
    assert set(outputs) == {b, c}
    assert outputs[b].outputs[0].token_ids == llm.generate([[8, 9, 10]], params)[0].outputs[0].token_ids
    assert outputs[c].outputs[0].token_ids == llm.generate([[11, 12]], params)[0].outputs[0].token_ids
    assert llm.engine.runner.taken == {}


def test_bad_requests_are_refused_when_added(tiny_llada):
    llm = LLM(str(tiny_llada), strategy="reference", device="cpu", max_batch_size=1)
    with pytest.raises(InvalidParameterError, match="exceeds the model's context"):
        llm.add_request([5] * 10, SamplingParams(max_tokens=4096))
    rid = llm.add_request([5, 6], SamplingParams(**SHORT), request_id="mine")
    with pytest.raises(InvalidParameterError, match="already queued"):
        llm.add_request([5, 6], SamplingParams(**SHORT), request_id="mine")
    assert set(_drain(llm)) == {rid}


def test_a_cohort_longer_than_the_pool_gets_its_own_storage(tiny_llada):
    llm = LLM(str(tiny_llada), cache="dual", strategy="reference", device="cpu", dtype="float32", max_batch_size=4)
    short = SamplingParams(**SHORT)
    long_params = SamplingParams(max_tokens=320, block_length=32, steps=320, ignore_eos=True, seed=3)
    a = llm.add_request([5, 6, 7], short)
    llm.step()                                         # the pool is sized for this short canvas
    b = llm.add_request([8, 9, 10] * 40, long_params)  # a longer canvas than the pool holds, while it is in use
    llm.step()
    runner = llm.engine.runner
    assert not runner.pool.owns(llm.scheduler.cohorts[-1].run.cache.buffers)
    outputs = _drain(llm)
    assert outputs[b].outputs[0].token_ids == llm.generate([[8, 9, 10] * 40], long_params)[0].outputs[0].token_ids
    assert outputs[a].outputs[0].token_ids == llm.generate([[5, 6, 7]], short)[0].outputs[0].token_ids


def test_generate_streams_more_prompts_than_slots_through_the_scheduler(tiny_llada, monkeypatch):
    """`LLM.generate` with more prompts than slots and two settings: cohorts start as slots free up (not after
    the whole previous batch), run side by side, and every output equals its prompt decoded alone."""
    llm = LLM(str(tiny_llada), cache="dual", strategy="reference", device="cpu", dtype="float32", max_batch_size=3)
    short, long_params = SamplingParams(**SHORT, steps=8), SamplingParams(**LONG, steps=32)
    prompts = [[5 + i, 6, 7] for i in range(7)]
    params = [long_params if i == 0 else short for i in range(7)]
    starts, real_open = [], llm.engine.open_run

    def open_run(requests, *args, **kwargs):
        starts.append((len(requests), len(llm.engine.runner.taken)))   # (cohort size, cohorts already running)
        return real_open(requests, *args, **kwargs)

    monkeypatch.setattr(llm.engine, "open_run", open_run)
    outputs = llm.generate(prompts, params)
    monkeypatch.undo()
    assert all(size <= 3 for size, _ in starts) and sum(size for size, _ in starts) == 7
    assert any(running > 0 for _, running in starts[1:])      # a cohort joined while another decoded
    for prompt, p, out in zip(prompts, params, outputs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == llm.generate([prompt], p)[0].outputs[0].token_ids
    streamed = {}
    for event in llm.stream(prompts, params):
        streamed.setdefault(event.request_id, []).extend(event.delta_token_ids)
    assert sorted(map(tuple, streamed.values())) == sorted(tuple(o.outputs[0].token_ids) for o in outputs)
    assert llm.engine.runner.taken == {}


def test_max_num_cohorts_and_batched_tokens_bound_what_runs_at_once(tiny_llada):
    from dllm.scheduler import Scheduler, columns

    llm = LLM(str(tiny_llada), cache="dual", strategy="reference", device="cpu", dtype="float32", max_batch_size=8)
    settings = [SamplingParams(**SHORT, steps=8), SamplingParams(max_tokens=16, block_length=8, steps=16,
                                                                 ignore_eos=True, seed=4)]
    requests = [llm._request([5 + i, 6, 7], settings[i % 2]) for i in range(6)]
    budget = 2 * columns(requests[1])
    scheduler = Scheduler(max_num_seqs=8, max_num_cohorts=1, max_num_batched_tokens=budget)
    for r in requests:
        scheduler.add(llm.engine, r)
    outputs = {}
    while scheduler.has_unfinished():
        for event in scheduler.step():
            if event.output is not None:
                outputs[event.request_id] = event.output
        assert len(scheduler.cohorts) <= 1 and scheduler.columns_in_use <= budget
    assert scheduler.num_steps > 0 and scheduler.slot_steps > 0
    for r in requests:
        alone = llm.generate([r.prompt_token_ids], settings[int(r.request_id) % 2])[0]
        assert outputs[r.request_id].outputs[0].token_ids == alone.outputs[0].token_ids
    with pytest.raises(InvalidParameterError, match="max_num_batched_tokens"):
        Scheduler(max_num_batched_tokens=4).add(llm.engine, requests[0])
    with pytest.raises(InvalidParameterError, match="max_num_cohorts"):
        Scheduler(max_num_cohorts=0)


@pytest.mark.parametrize("poisoned_first", [True, False])
def test_a_failing_cohort_raises_from_step_after_the_others_finished_theirs(tiny_llada, monkeypatch, poisoned_first):
    """Not isolated (`LLM.step`), a cohort that raises is closed and its error propagates, but only once every
    other cohort has finished its step: they decode on at the next step to their own tokens, whether they
    stepped before or after the failing one."""
    llm = LLM(str(tiny_llada), cache="dual", strategy="reference", device="cpu", dtype="float32", max_batch_size=4)
    params = SamplingParams(**LONG, steps=32)
    real_open = llm.engine.open_run

    def open_run(batch, *args, **kwargs):
        run = real_open(batch, *args, **kwargs)
        if any(r.prompt_token_ids[0] == 66 for r in batch):
            break_after(run, 1)                   # the run breaks at its second step
        return run

    monkeypatch.setattr(llm.engine, "open_run", open_run)
    first, second = ([66, 6, 7], [5, 6, 7]) if poisoned_first else ([5, 6, 7], [66, 6, 7])
    ids = [llm.add_request(first, params)]
    llm.step()
    ids.append(llm.add_request(second, params))   # a cohort of its own, one step behind
    good = ids[1] if poisoned_first else ids[0]
    outputs, errors = {}, []
    while llm.has_unfinished_requests():
        try:
            for event in llm.step():
                if event.output is not None:
                    outputs[event.request_id] = event.output
        except RuntimeError as exc:
            errors.append(str(exc))
    monkeypatch.undo()
    assert errors == ["poisoned"] and list(outputs) == [good]
    want = llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    assert outputs[good].outputs[0].token_ids == want
    assert llm.engine.runner.taken == {}


def test_isolate_retries_a_failed_cohort_one_request_at_a_time(tiny_llada, monkeypatch):
    """With isolate=True a cohort that raises is closed, its requests queued again alone (their events start
    over), a request that fails alone is given up, and the rest decode to their own tokens."""
    from dllm.scheduler import Scheduler

    llm = LLM(str(tiny_llada), cache="dual", strategy="reference", device="cpu", dtype="float32", max_batch_size=4)
    params = SamplingParams(**LONG, steps=32)
    requests = [llm._request(p, params) for p in ([5, 6, 7], [66, 6, 7], [8, 9, 10])]   # 66: the poison
    real_open, sizes = llm.engine.open_run, []

    def open_run(batch, *args, **kwargs):
        run = real_open(batch, *args, **kwargs)
        sizes.append(len(batch))
        if any(r.prompt_token_ids[0] == 66 for r in batch):
            break_after(run, 2)                   # the run breaks at its third step
        return run

    monkeypatch.setattr(llm.engine, "open_run", open_run)
    scheduler = Scheduler(max_num_seqs=4, isolate=True)
    for r in requests:
        scheduler.add(llm.engine, r)
    tokens, failures = {}, []
    while scheduler.has_unfinished():
        for event in scheduler.step():
            tokens.setdefault(event.request_id, []).extend(event.delta_token_ids)
        for f in scheduler.take_failures():
            failures.append((f.request_id, f.retried, str(f.error)))
            if f.retried:
                tokens.pop(f.request_id, None)    # its events start over
    monkeypatch.undo()
    ids = [r.request_id for r in requests]
    assert sizes == [3, 1, 1, 1]
    assert sorted(failures) == sorted([(i, True, "poisoned") for i in ids] + [(ids[1], False, "poisoned")])
    assert set(tokens) >= {ids[0], ids[2]}
    for r in (requests[0], requests[2]):
        assert tokens[r.request_id] == llm.generate([r.prompt_token_ids], params)[0].outputs[0].token_ids
    assert llm.engine.runner.taken == {}
    with pytest.raises(RuntimeError, match="poisoned"):      # without isolate (LLM.step) the error propagates
        monkeypatch.setattr(llm.engine, "open_run", open_run)
        llm.add_request([66, 6, 7], params)
        while llm.has_unfinished_requests():
            llm.step()
    assert not llm.scheduler.cohorts


@pytest.mark.parametrize("in_pool", [False, True], ids=["per-run", "in-pool"])
@pytest.mark.parametrize("fixture,cache", CASES)
def test_cohorts_with_one_forward_shape_share_one_model_call(request, fixture, cache, in_pool):
    """Two cohorts one step apart (same settings and prompt length): once their forwards have the same shape
    they run as one model call (rows of both, each attending to its own cohort's K/V), and each request's
    tokens equal decoding it alone. Both forms of the merged call: attention per cohort (the CPU's) and one
    canonical forward over the pool's rows (CUDA's, the one its graphs capture)."""
    llm = LLM(str(request.getfixturevalue(fixture)), cache=cache, strategy="reference", device="cpu",
              dtype="float32", max_batch_size=4)
    llm.engine.runner.merge_in_pool = in_pool
    one_a_step = dict(steps=8, remasking="low_confidence_static") if fixture == "tiny_sdar" else {"steps": 32}
    params = SamplingParams(**LONG, **one_a_step)
    first = llm.add_request([5, 6, 7, 8], params)
    llm.step()
    second = llm.add_request([9, 10, 11, 12], params)
    cohort_steps, outputs = 1, {}
    while llm.has_unfinished_requests():
        cohort_steps += len(llm.scheduler.cohorts) + len(llm.scheduler.waiting)
        for event in llm.step():
            if event.output is not None:
                outputs[event.request_id] = event.output
    merged = cohort_steps - llm.scheduler.num_forwards
    print(f"{fixture} {cache}: {llm.scheduler.num_forwards} model calls for {cohort_steps} cohort steps")
    if cache != "elastic":       # (its plans hook every layer: never merged)
        assert merged > 0
    else:
        assert merged == 0
    for rid, prompt in ((first, [5, 6, 7, 8]), (second, [9, 10, 11, 12])):
        assert outputs[rid].outputs[0].token_ids == llm.generate([prompt], params)[0].outputs[0].token_ids


POOL_CASES = [("tiny_llada", "none"), ("tiny_llada", "prefix"), ("tiny_llada", "dual"), ("tiny_llada", "dkv"),
              ("tiny_llada", "freecache"), ("tiny_dream", "dual"), ("tiny_sdar", "block")]


def staggered_arrivals(llm, sdar: bool) -> dict:
    """Requests arriving over four steps: a cohort of two whose second row leaves after a block, a cohort in
    another phase (another block length) between later ones, canvases of two lengths. -> {request id: (prompt,
    params, output)}."""
    steps = (lambda n: dict(steps=n // 4, remasking="low_confidence_static")) if sdar else \
        (lambda n: {"steps": n})
    long = SamplingParams(**{**LONG, "max_tokens": 24}, **steps(24))
    early_end = SamplingParams(**{**LONG, "max_tokens": 8}, **steps(8))     # same cohort, leaves after a block
    other_block = SamplingParams(max_tokens=16, block_length=4, ignore_eos=True, seed=3, **steps(16))
    arrivals = {0: [([5, 6, 7, 8], long), ([9, 10, 11, 12], early_end)], 1: [([13, 14, 15], other_block)],
                2: [([16, 17, 18, 19], long)], 3: [([20, 21, 22, 23, 24, 25], long)]}
    requests, outputs, step = {}, {}, 0
    while step in arrivals or llm.has_unfinished_requests():
        for prompt, params in arrivals.get(step, []):
            requests[llm.add_request(prompt, params)] = (prompt, params)
        for event in llm.step():
            if event.output is not None:
                outputs[event.request_id] = event.output
        step += 1
    return {rid: (prompt, params, outputs[rid]) for rid, (prompt, params) in requests.items()}


@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
@pytest.mark.parametrize("fixture,cache", POOL_CASES)
def test_merged_forwards_over_the_pool_change_no_cohort_s_tokens(request, fixture, cache, padded, monkeypatch):
    """The pool form of a merged call (CUDA's) with filler rows: a row that left its cohort early, a cohort in
    another phase whose slots sit between the merged ones, canvases of other lengths. Every request gets exactly
    its tokens decoding alone, and no run's K/V view holds the pool's last column (where the fillers write).
    `padded`: rows and fed widths padded to their buckets as on CUDA (the eager form of what graphs replay)."""
    import dllm.runner as runner_module

    llm = LLM(str(request.getfixturevalue(fixture)), cache=cache, strategy="reference", device="cpu",
              dtype="float32", max_batch_size=6)
    runner = llm.engine.runner
    runner.merge_in_pool = True
    runner.pad_rows = runner.pad_widths = padded
    merged_calls = []
    original_pool, original_rows = runner_module._merge_pool, runner_module._merge_rows

    def recording(pool, parts, rows):
        out = original_pool(pool, parts, rows)
        merged_calls.append((out[0].ids.shape[0], sum(p.ids.shape[0] for p in parts)))
        assert all(p.buffers.k[0].shape[2] < pool.length for p in parts)
        return out

    def stacking(parts, rows, bucket):
        merged_calls.append((None, sum(rows)))
        return original_rows(parts, rows, bucket)

    monkeypatch.setattr(runner_module, "_merge_pool", recording)
    monkeypatch.setattr(runner_module, "_merge_rows", stacking)
    results = staggered_arrivals(llm, fixture == "tiny_sdar")
    monkeypatch.undo()
    if cache != "none":
        assert any(rows > real for rows, real in merged_calls), f"no merged call had filler rows: {merged_calls}"
    else:   # no K/V buffers: the rows are stacked
        assert merged_calls, "nothing was merged: the test checks nothing"
    for rid, (prompt, params, output) in results.items():
        assert output.outputs[0].token_ids == llm.generate([prompt], params)[0].outputs[0].token_ids, rid
    assert runner.taken == {}


def test_forwards_of_engines_on_different_runners_are_never_merged(tiny_llada):
    """Two engines over one model with runners of their own (an eager one and a graphed one share no pool):
    their cohorts' forwards have equal shapes but must not run as one call on either runner."""
    from dllm.engine import Engine

    llm = LLM(str(tiny_llada), cache="dual", strategy="reference", device="cpu", dtype="float32", max_batch_size=4,
              enforce_eager=True)
    other = Engine(llm.loaded, cache="dual", strategy="reference")
    assert other.runner is not llm.engine.runner
    for runner in (llm.engine.runner, other.runner):
        runner.merge_in_pool = True
    params = SamplingParams(**{**LONG, "max_tokens": 16}, steps=16)
    first, second = llm._request([5, 6, 7, 8], params), llm._request([9, 10, 11, 12], params)
    llm.scheduler.add(llm.engine, first)
    llm.scheduler.add(other, second)
    outputs = _drain(llm)
    assert llm.scheduler.num_forwards == llm.scheduler.num_steps * 2     # one call per cohort, every step
    for r in (first, second):
        want = llm.generate([r.prompt_token_ids], params)[0].outputs[0].token_ids
        assert outputs[r.request_id].outputs[0].token_ids == want


@pytest.mark.parametrize("fixture", ["tiny_llada", "tiny_sdar"])
@pytest.mark.parametrize("stream", [True, False])
def test_one_status_transfer_a_step_brings_every_cohort_s_rows(request, fixture, monkeypatch, stream):
    """Every cohort commits before any row status is read, and one transfer (`StatusRead.fetch_all`) brings all
    the cohorts' status (and, streaming, their generation regions) to the host: no cohort waits for the device
    between another's commit and its own. Streamed deltas still add up to each output, whose tokens are those
    of decoding alone."""
    from dllm.engine import StatusRead
    from dllm.scheduler import Scheduler

    sdar = fixture == "tiny_sdar"
    llm = LLM(str(request.getfixturevalue(fixture)), cache="block" if sdar else "dual", strategy="reference",
              device="cpu", dtype="float32", max_batch_size=8)
    llm.scheduler = Scheduler(max_num_seqs=8, stream=stream)
    fetches = []
    original = StatusRead.fetch_all

    def recording(reads):
        fetches.append((llm.scheduler.num_steps, len(reads), [r.region is not None for r in reads]))
        return original(reads)

    deltas: dict[str, list[int]] = {}
    original_step = llm.step

    def step():
        events = original_step()
        for e in events:
            deltas.setdefault(e.request_id, []).extend(e.delta_token_ids)
        return events

    monkeypatch.setattr(StatusRead, "fetch_all", staticmethod(recording))
    monkeypatch.setattr(llm, "step", step)
    # a cohort whose rows start generating at different columns (SDAR does not left-pad), then the staggered ones
    params = SamplingParams(max_tokens=16, block_length=4, ignore_eos=True, seed=5,
                            **(dict(steps=4, remasking="low_confidence_static") if sdar else {"steps": 16}))
    uneven = [([30, 31, 32, 40, 41], params), ([33, 34, 35, 36, 37, 38, 39], params)]
    uneven_ids = [llm.add_request(p, sp) for p, sp in uneven]
    results = staggered_arrivals(llm, sdar)
    while llm.has_unfinished_requests():
        llm.step()
    monkeypatch.undo()
    assert max(n for _, n, _ in fetches) >= 3, fetches          # several cohorts' status in one transfer
    per_step: dict[int, list[int]] = {}
    for step_no, n, regions in fetches:
        per_step.setdefault(step_no, []).append(n)
        assert all(r == stream for r in regions)
    # a step makes one transfer for every cohort that stepped; a run's very last read (after its last block,
    # at the next step) goes alone
    assert all(sum(1 for n in counts if n > 1) <= 1 for counts in per_step.values()), per_step
    for rid, (prompt, sp) in zip(uneven_ids, uneven):
        assert llm.generate([prompt], sp)[0].outputs[0].token_ids == deltas[rid], rid
    for rid, (prompt, params, output) in results.items():
        assert deltas[rid] == output.outputs[0].token_ids, rid
        assert output.outputs[0].token_ids == llm.generate([prompt], params)[0].outputs[0].token_ids, rid

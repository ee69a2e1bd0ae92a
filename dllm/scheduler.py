"""The step scheduler: requests join and leave decoding at every step, not once per batch.

    scheduler.add(engine, request)         queue a request (checked now: a bad one is refused here, alone)
    events = scheduler.step()               admit waiting requests into free slots, then one step of every cohort
    scheduler.abort(request_id)             a waiting request is dropped; a running one leaves at the next step
    scheduler.close()                       drop every waiting and running request (their K/V slots go back)

Everything decodes through it: `LLM.generate` / `LLM.stream` (a scheduler of their own per call, so more prompts
than slots stream through the slots), `LLM.add_request` / `LLM.step`, and `dllm serve` (one for the server,
stepped by its worker; see dllm/server/engine_client.py).

A *cohort* is the requests admitted together at one step with the same engine (cache and strategy) and the same
`SamplingParams.batch_key()`: they share one canvas and one forward a step, exactly like a static batch. Every
step the scheduler first admits waiting requests, oldest first, into free slots (`max_num_seqs` rows across all
cohorts; a classifier-free-guidance request takes two, or decodes alone when there is one), then advances every
running cohort by one step. A request that arrives while others decode therefore starts at the next step instead
of after the whole batch, and a row that finishes (stop token final or region full) or is aborted frees its slot
for the next step's admission. `max_num_batched_tokens`, when set, also bounds the canvas columns (prompt +
max_tokens, twice under guidance) of the running rows, and `max_num_cohorts` the cohorts running at once
(arrivals then wait for a cohort to end and start together, in bigger cohorts).

Admission is first come, first served: the oldest waiting request heads the queue, and the cohort it starts takes
the later waiting requests that share its settings, in arrival order, up to the free slots. If the head does not
fit, nobody is admitted until it does, so no request is passed over more than once per cohort admitted ahead of
it (a bound, not starvation).

One model call per forward shape: each step every cohort runs up to its forward (`_Run.events(forwards=True)`
hands it out as a `ForwardCall`), the forwards whose shapes match (`ModelRunner.merge_key`: same fed width and
logit count; so per-row settings that leave the shape alone, such as temperature, top_p/top_k, seed, threshold,
factor, steps, max_tokens, stop ids or remasking, do not split a step) run as one model call, projections, MLPs
and logits batched over all their rows and attention per cohort over its own K/V storage, and then every cohort
commits from its rows' logits, after which one transfer brings every cohort's row status (and, streaming, its
generated tokens) to the host (`StatusRead`): the host launches all the commits behind the forward instead of
waiting for the device between cohorts. Forwards of other shapes (a block start beside in-block steps, another block
length, the no-cache canvas of another length, guidance's doubled rows) run in the same step as separate calls:
the rule is "same step, one call per shape". On CUDA a merged call is one canonical forward over the K/V pool's
rows, cohorts' rows at their own slots and filler rows between them, graphed like any other (its key is the
pool's highest slot in use, not which cohorts take part, so no graph is recaptured when rows join or leave; see
`ModelRunner.forward_merged`). Not merged: a run whose cache hooks every layer (Elastic-Cache), a retried request
(below), tensor parallelism, and on CUDA a cohort with K/V storage of its own or a merge whose filler rows would
cost more than the calls it saves.

Batch invariance: a cohort decodes as a static batch of its members would, rows leave a cohort without changing
the others' arithmetic, and a merged call computes each row as its own cohort's call would, so at temperature 0
in float32 a request's tokens do not depend on what else runs (tests/test_scheduler.py, every family and cache).

K/V storage: the runner's pool is sized for `max_num_seqs` rows when the first cohort starts; each cohort holds a
contiguous range of it until the cohort ends (rows that leave early do not give their part of the range back), and
a cohort that finds no free range big enough gets K/V storage of its own (on CUDA it then runs without graphs).
Under tensor parallelism one cohort decodes at a time.

Failures: by default an exception in a cohort (its start or a step) closes that cohort and propagates
(`LLM.step`; from a step, once every other cohort has finished that step, so that they decode on at the next).
With `isolate=True` (the server) it does not: the cohort's unfinished requests are queued again at the head of
the queue, each to decode alone (`Failure(..., retried=True)`: its events start over from the first
step, the same ones again under the same seed), and a request that fails alone is given up (`retried=False`);
`take_failures()` hands them over after each step. The other cohorts decode on.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import torch

from dllm.engine import _END, Engine, ForwardCall, Request, StatusRead, _Run, _send
from dllm.errors import InvalidParameterError
from dllm.outputs import StreamEvent

_OWN_STEP = object()   # `_until_forward`: the cohort made its step's forwards itself


@dataclass
class Failure:
    """A request whose cohort raised (`isolate=True`): queued again to decode alone (`retried`), or given up."""

    request_id: str
    error: Exception
    retried: bool


@dataclass(eq=False)
class _Waiting:
    engine: Engine
    request: Request
    alone: bool = False     # a retry after a failed cohort: it decodes in a cohort of its own


@dataclass(eq=False)
class _Cohort:
    run: _Run
    events: object          # the run's step-marked event generator
    per_row: int            # slots a row takes (2 under classifier-free guidance)
    open: dict[str, _Waiting]  # its requests that have not finished
    alone: bool = False

    @property
    def columns(self) -> int:
        return sum(columns(w.request) for w in self.open.values())


class Scheduler:
    def __init__(self, max_num_seqs: int = 32, stream: bool = True, max_num_batched_tokens: int | None = None,
                 isolate: bool = False, max_num_cohorts: int | None = None):
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_num_cohorts", max_num_cohorts)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
        self.max_num_seqs, self.stream, self.isolate = max_num_seqs, stream, isolate
        self.max_num_batched_tokens, self.max_num_cohorts = max_num_batched_tokens, max_num_cohorts
        self.waiting: collections.deque[_Waiting] = collections.deque()
        self.cohorts: list[_Cohort] = []
        self.num_steps = 0
        self.num_forwards = 0                     # model calls (merged forwards count once)
        self.slot_steps = 0                       # slots in use summed over steps: utilisation = / (steps x slots)
        self.admitted: list[list[Request]] = []   # the cohorts the latest step admitted
        self.failures: list[Failure] = []
        self._error: Exception | None = None     # a cohort's error, raised at the end of the step (not isolated)

    # ------------------------------------------------------------------ queue

    def add(self, engine: Engine, request: Request) -> None:
        engine.check_request(request)
        if self.max_num_batched_tokens is not None and columns(request) > self.max_num_batched_tokens:
            raise InvalidParameterError(f"this request takes {columns(request)} canvas columns, more than "
                                        f"max_num_batched_tokens {self.max_num_batched_tokens}; lower max_tokens")
        if request.arrival is None:
            request.arrival = time.perf_counter()
        self.waiting.append(_Waiting(engine, request))

    def abort(self, request_id: str) -> bool:
        """Drop a waiting request, or take a running one out of its cohort (its slot is free at the next step).
        True if it was found unfinished."""
        for i, w in enumerate(self.waiting):
            if w.request.request_id == request_id:
                del self.waiting[i]
                return True
        for cohort in self.cohorts:
            if request_id in cohort.open:
                del cohort.open[request_id]
                cohort.run.drop({request_id})
                if not cohort.open:
                    self._close(cohort)
                return True
        return False

    def has(self, request_id: str) -> bool:
        """Whether `request_id` is queued or decoding."""
        return any(w.request.request_id == request_id for w in self.waiting) or any(
            request_id in c.open for c in self.cohorts)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(len(c.open) for c in self.cohorts)

    @property
    def slots_in_use(self) -> int:
        return sum(len(c.open) * c.per_row for c in self.cohorts)

    @property
    def columns_in_use(self) -> int:
        return sum(c.columns for c in self.cohorts)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.cohorts)

    def take_failures(self) -> list[Failure]:
        failures, self.failures = self.failures, []
        return failures

    def close(self) -> None:
        """Drop every waiting and running request; the running ones give their K/V slots back."""
        self.waiting.clear()
        for cohort in list(self.cohorts):
            self._close(cohort)

    # ------------------------------------------------------------------ steps

    def step(self) -> list[StreamEvent]:
        """Admit what fits, then one step of every cohort: each runs up to its forward, the forwards that can
        share one model call run as one (`ModelRunner.merge_key`), then each commits; the events of that step."""
        self.admitted = []
        self._admit()
        self.slot_steps += self.slots_in_use
        events: list[StreamEvent] = []
        with torch.no_grad():
            calls: list[tuple[_Cohort, ForwardCall]] = []
            reads: list[tuple[_Cohort, StatusRead]] = []
            for cohort in list(self.cohorts):             # each cohort up to its forward
                call = self._guard(cohort, lambda c=cohort: self._until_forward(c, events))
                if call is not None and call is not _OWN_STEP:
                    calls.append((cohort, call))
            groups: dict[object, list[tuple[_Cohort, ForwardCall]]] = {}
            for cohort, call in calls:
                key = None if cohort.alone else cohort.run.engine.runner.merge_key(call.ids, call.plan,
                                                                                  call.logits_index)
                groups.setdefault(key if key is not None else id(cohort), []).append((cohort, call))
            for group in groups.values():                 # one model call per group, then each commits
                runner = group[0][0].run.engine.runner    # (the key names the runner)
                logits = self._guard_all([c for c, _ in group],
                                         lambda g=group: runner.forward_merged([call.args for _, call in g]))
                if logits is None:                        # the call failed: its cohorts are closed
                    continue
                self.num_forwards += runner.merged_calls
                for (cohort, _), out in zip(group, logits):
                    read = self._guard(cohort, lambda c=cohort, o=out: self._after_forward(c, o, events))
                    if read is not None:
                        reads.append((cohort, read))
            # every cohort's commit is queued on the device: one transfer brings all their row status to the host
            values = self._guard_all([c for c, _ in reads], lambda: StatusRead.fetch_all([r for _, r in reads])) \
                if reads else ()
            for (cohort, _), value in zip(reads, values or ()):
                self._guard(cohort, lambda c=cohort, v=value: self._finish_step(c, v, events))
        self.num_steps += 1
        if self._error is not None:   # (not isolated) every other cohort has finished its step first
            error, self._error = self._error, None
            raise error
        return events

    def _guard_all(self, cohorts: list[_Cohort], work):
        """work() for these cohorts (None if it raised): an exception fails each of them (`_failed`); anything
        else (KeyboardInterrupt) closes them and propagates."""
        try:
            return work()
        except Exception as exc:
            for cohort in cohorts:
                self._failed(cohort, exc)
        except BaseException:
            for cohort in cohorts:
                self._close(cohort)
            raise
        return None

    def _guard(self, cohort: _Cohort, work):
        return self._guard_all([cohort], work)

    def _failed(self, cohort: _Cohort, exc: Exception) -> None:
        """Close a cohort that raised. Not isolated, the step raises its (first) error once the other cohorts
        have finished theirs: raising at once would leave them halfway through a step."""
        self._close(cohort)
        if not self.isolate:
            self._error = self._error or exc
            return
        self._fail(list(cohort.open.values()), exc, cohort.alone)

    def _until_forward(self, cohort: _Cohort, out: list[StreamEvent]) -> ForwardCall | None:
        """Run `cohort` up to its next forward (None: it ended)."""
        item = next(cohort.events, _END)
        while not isinstance(item, ForwardCall):
            if item is None:                  # a run that makes its own forwards (TiDAR) ended its step
                return _OWN_STEP
            if item is _END:
                self._close(cohort)
                return None
            if isinstance(item, StatusRead):  # the run's last status (after its last block), read by itself
                item = _send(cohort.events, item.fetch())
                continue
            self._keep(cohort, item, out)
            item = next(cohort.events, _END)
        return item

    def _after_forward(self, cohort: _Cohort, logits: torch.Tensor, out: list[StreamEvent]) -> StatusRead | None:
        """Hand `cohort` its forward's logits and run it up to its step's status read (returned; None: the step
        ended without one)."""
        return self._run_step(cohort, _send(cohort.events, logits), out)

    def _finish_step(self, cohort: _Cohort, value: tuple, out: list[StreamEvent]) -> None:
        """Hand `cohort` its status read's host values and run it to the end of its step."""
        if self._run_step(cohort, _send(cohort.events, value), out) is not None:
            raise RuntimeError("a run read its status twice in one step")

    def _run_step(self, cohort: _Cohort, item, out: list[StreamEvent]) -> StatusRead | None:
        while item is not None:                # the end of this cohort's step
            if item is _END:
                self._close(cohort)
                return None
            if isinstance(item, StatusRead):
                return item
            self._keep(cohort, item, out)
            item = next(cohort.events, _END)
        return None

    @staticmethod
    def _keep(cohort: _Cohort, event: StreamEvent, out: list[StreamEvent]) -> None:
        if event.request_id in cohort.open:
            out.append(event)
            if event.output is not None:
                del cohort.open[event.request_id]

    def _admit(self) -> None:
        free = self.max_num_seqs - self.slots_in_use
        budget = None if self.max_num_batched_tokens is None else self.max_num_batched_tokens - self.columns_in_use
        while self.waiting:
            head = self.waiting[0]
            engine = head.engine
            if engine.runner.group is not None and self.cohorts:
                return                   # tensor parallelism: one cohort at a time
            if self.max_num_cohorts is not None and len(self.cohorts) >= self.max_num_cohorts:
                return                   # as many forwards a step as allowed: wait for a cohort to end
            key = head.request.params.batch_key()
            members, need, cols = [], 0, 0
            for w in ([head] if head.alone else self.waiting):   # a retry decodes alone
                r = w.request
                fits = need + _slots(r) <= free or not (self.cohorts or members)   # (guidance at 1 slot: alone)
                if (w.engine is engine and not w.alone and r.params.batch_key() == key or w is head) and fits \
                        and (budget is None or cols + columns(r) <= budget):
                    members.append(w)
                    need, cols = need + _slots(r), cols + columns(r)
            if not members or members[0] is not head:
                return                   # the oldest does not fit: nobody goes ahead of it
            taken = set(map(id, members))
            self.waiting = collections.deque(w for w in self.waiting if id(w) not in taken)
            requests = [w.request for w in members]
            try:
                with torch.no_grad():
                    run = engine.open_run(requests, self.stream, pool_rows=0 if self.cohorts else self.max_num_seqs)
            except Exception as exc:
                if not self.isolate:
                    raise
                self._fail(members, exc, head.alone)
                continue
            events = run.events(marks=True, forwards=True) if isinstance(run, _Run) else run.events(marks=True)
            self.cohorts.append(_Cohort(run, events, _slots(head.request),
                                        {w.request.request_id: w for w in members}, head.alone))
            self.admitted.append(requests)
            free -= need
            if budget is not None:
                budget -= cols

    def _fail(self, members: list[_Waiting], exc: Exception, alone: bool) -> None:
        """A cohort raised: give up a request that decoded alone; queue the others again, alone, at the head."""
        if alone or len(members) == 1:
            self.failures.extend(Failure(w.request.request_id, exc, False) for w in members)
            return
        for w in reversed(members):      # at the head, in arrival order
            self.waiting.appendleft(_Waiting(w.engine, w.request, alone=True))
        self.failures.extend(Failure(w.request.request_id, exc, True) for w in members)

    def _close(self, cohort: _Cohort) -> None:
        if cohort in self.cohorts:
            self.cohorts.remove(cohort)
        cohort.events.close()
        cohort.run.close()               # its K/V slots go back (also when it never ran a step)


def columns(request: Request) -> int:
    """The canvas columns `request` takes: prompt + max_tokens, twice with classifier-free guidance."""
    return (len(request.prompt_token_ids) + request.params.max_tokens) * _slots(request)


def _slots(request: Request) -> int:
    return 2 if request.params.cfg_scale > 0 else 1

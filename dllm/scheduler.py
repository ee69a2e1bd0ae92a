"""The step scheduler: requests join and leave decoding at every step, not once per batch.

    scheduler.add(engine, request)         queue a request (checked now: a bad one is refused here, alone)
    events = scheduler.step()               admit waiting requests into free slots, then one forward per cohort
    scheduler.abort(request_id)             a waiting request is dropped; a running one leaves at the next step

A *cohort* is the requests admitted together at one step with the same engine (cache and strategy) and the same
`SamplingParams.batch_key()`: they share one canvas and one forward a step, exactly like a static batch. Every
step the scheduler first admits waiting requests, oldest first, into free slots (`max_num_seqs` rows across all
cohorts; a classifier-free-guidance request takes two), then advances every running cohort by one step. A
request that arrives while others decode therefore starts at the next step instead of after the whole batch,
and a row that finishes (stop token final or region full) or is aborted frees its slot for the next step's
admission.

Admission is first come, first served: the oldest waiting request heads the queue, and the cohort it starts takes
the later waiting requests that share its settings, in arrival order, up to the free slots. If the head does not
fit, nobody is admitted until it does, so no request is passed over more than once per cohort admitted ahead of
it (a bound, not starvation). Requests with other settings decode side by side in their own cohorts, each step
running one forward per cohort (forwards of different cohorts are not merged yet).

Batch invariance: a cohort decodes as a static batch of its members would, and rows leave a cohort without
changing the others' arithmetic, so at temperature 0 in float32 a request's tokens do not depend on what else runs
(tests/test_scheduler.py). K/V storage: the runner's pool is sized for `max_num_seqs` rows when the first cohort
starts; each cohort holds a contiguous range of it until the cohort ends (rows that leave early do not give their
part of the range back), and a cohort that finds no free range big enough gets K/V storage of its own (on CUDA it
then runs without graphs). Under tensor parallelism one cohort decodes at a time.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import torch

from dllm.engine import Engine, Request, _Run  # noqa: F401  (_Run: the type of a canvas run)
from dllm.errors import InvalidParameterError
from dllm.outputs import StreamEvent


@dataclass(eq=False)
class _Cohort:
    run: _Run
    events: object          # the run's step-marked event generator
    per_row: int            # slots a row takes (2 under classifier-free guidance)
    open: set[str]          # its requests that have not finished


class Scheduler:
    def __init__(self, max_num_seqs: int = 32, stream: bool = True):
        if not isinstance(max_num_seqs, int) or isinstance(max_num_seqs, bool) or max_num_seqs < 1:
            raise InvalidParameterError(f"max_num_seqs must be a positive integer, got {max_num_seqs!r}")
        self.max_num_seqs, self.stream = max_num_seqs, stream
        self.waiting: collections.deque[tuple[Engine, Request]] = collections.deque()
        self.cohorts: list[_Cohort] = []
        self.num_steps = 0

    # ------------------------------------------------------------------ queue

    def add(self, engine: Engine, request: Request) -> None:
        engine.check_request(request)
        if _slots(request) > self.max_num_seqs:
            raise InvalidParameterError(f"a request with cfg_scale > 0 takes 2 slots and max_num_seqs is "
                                        f"{self.max_num_seqs}; raise max_num_seqs or set cfg_scale=0")
        if request.arrival is None:
            request.arrival = time.perf_counter()
        self.waiting.append((engine, request))

    def abort(self, request_id: str) -> bool:
        """Drop a waiting request, or take a running one out of its cohort (its slot is free at the next step).
        True if it was found unfinished."""
        for i, (_, request) in enumerate(self.waiting):
            if request.request_id == request_id:
                del self.waiting[i]
                return True
        for cohort in self.cohorts:
            if request_id in cohort.open:
                cohort.open.discard(request_id)
                cohort.run.drop({request_id})
                if not cohort.open:
                    self._close(cohort)
                return True
        return False

    def has(self, request_id: str) -> bool:
        """Whether `request_id` is queued or decoding."""
        return any(r.request_id == request_id for _, r in self.waiting) or any(
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

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.cohorts)

    # ------------------------------------------------------------------ steps

    def step(self) -> list[StreamEvent]:
        """Admit what fits, then one step (one forward) of every cohort; the events of that step."""
        self._admit()
        events: list[StreamEvent] = []
        with torch.no_grad():
            for cohort in list(self.cohorts):
                try:
                    events.extend(self._advance(cohort))
                except BaseException:
                    self._close(cohort)
                    raise
        self.num_steps += 1
        return events

    def _advance(self, cohort: _Cohort) -> list[StreamEvent]:
        out = []
        for event in cohort.events:
            if event is None:        # the end of this cohort's step
                return out
            if event.request_id in cohort.open:
                out.append(event)
                if event.output is not None:
                    cohort.open.discard(event.request_id)
        self._close(cohort)          # the run is over
        return out

    def _admit(self) -> None:
        free = self.max_num_seqs - self.slots_in_use
        while self.waiting:
            engine, head = self.waiting[0]
            if engine.runner.group is not None and self.cohorts:
                return                   # tensor parallelism: one cohort at a time
            key = head.params.batch_key()
            members, need = [], 0
            for e, r in self.waiting:
                if e is engine and r.params.batch_key() == key and need + _slots(r) <= free:
                    members.append(r)
                    need += _slots(r)
            if not members or members[0] is not head:
                return                   # the oldest does not fit: nobody goes ahead of it
            taken = {r.request_id for r in members}
            self.waiting = collections.deque((e, r) for e, r in self.waiting if r.request_id not in taken)
            with torch.no_grad():
                run = engine.make_run(members, self.stream, pool_rows=0 if self.cohorts else self.max_num_seqs)
            self.cohorts.append(_Cohort(run, run.events(marks=True), _slots(head), taken))
            free -= need

    def _close(self, cohort: _Cohort) -> None:
        if cohort in self.cohorts:
            self.cohorts.remove(cohort)
        cohort.events.close()
        cohort.run.close()               # its K/V slots go back (also when it never ran a step)


def _slots(request: Request) -> int:
    return 2 if request.params.cfg_scale > 0 else 1

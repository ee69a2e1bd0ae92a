"""Data-parallel evaluation: the pending samples of a run split over N engine processes (one per GPU, or CPU
processes), their records merged into the run's one `samples.jsonl` as they arrive.

The parent keeps the run directory: it alone appends (fsync per batch, as a single engine does), so an
interrupted run resumes whatever the number of engines before or after. Samples are dealt round-robin; each
worker decodes its share in batches through the same session code as a single engine and sends each batch's
records back. Records carry `dp_rank` and the parent's session and clock, so throughput counts the engines as
running side by side (see `metrics.generation_seconds`).
"""
from __future__ import annotations

import dataclasses
import queue as queue_module
import time
import uuid

from dllm.errors import DllmError
from dllm.eval import report
from dllm.eval.store import EvalError


def decode(config, task, store, pending: list, total: int, size: int, progress: bool, warmup: bool,
           label: str) -> dict:
    """Decode `pending` on `size` engine processes; returns the first engine's environment (+ the size)."""
    import torch
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    devices = _devices(config, size)
    shards = [[(doc.doc_id, j) for doc, j in pending[k::size]] for k in range(size)]
    workers = [ctx.Process(target=_work, args=(dataclasses.asdict(config), shard, devices[k], k, size, results, warmup),
                           daemon=True, name=f"dllm-dp{k}") for k, shard in enumerate(shards) if shard]
    for w in workers:
        w.start()
    run_id, start = uuid.uuid4().hex[:8], time.perf_counter()
    bar = report.Progress(total=total, done=total - len(pending), enabled=progress, desc=label)
    environment, done, tokens = None, 0, 0
    try:
        while done < len(workers):
            kind, rank, payload = _next(results, workers)
            if kind == "error":
                raise EvalError(f"data-parallel engine {rank}: {payload}")
            if kind == "done":
                done += 1
                environment = environment or payload
                continue
            for r in payload:
                r.update(session=run_id, session_seconds=time.perf_counter() - start, dp_rank=rank)
                if "_prompt" in r:                       # prompt text once per directory, as one engine writes it
                    r.update(store.prompt_fields(r.pop("_prompt")))
            store.append(payload)
            tokens += sum(r.get("tokens", 0) for r in payload)
            bar.update(len(payload), accuracy=store.accuracy(), tokens_per_second=tokens / (time.perf_counter() - start))
    finally:
        bar.close()
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join(timeout=10)
    return {**environment, "data_parallel_size": size, "devices": devices[:len(workers)], "session": run_id}


def _next(results, workers):
    """The next message; a worker that died without saying why is an error, not a hang."""
    while True:
        try:
            return results.get(timeout=2)
        except queue_module.Empty:
            for k, w in enumerate(workers):
                if not w.is_alive() and w.exitcode not in (0, None):
                    raise EvalError(f"data-parallel engine {k} died (exit code {w.exitcode}); rerun the same "
                                    "command to resume")


def _devices(config, size: int) -> list[str]:
    import torch
    want = config.device
    if want in ("auto", "cuda") and torch.cuda.is_available():
        per = config.tensor_parallel_size
        if per > 1:
            raise EvalError("--data-parallel-size with --tensor-parallel-size > 1 on GPUs is not supported yet; "
                            "use one of them")
        if torch.cuda.device_count() < size:
            raise EvalError(f"--data-parallel-size {size} needs {size} GPUs; this machine has "
                            f"{torch.cuda.device_count()}")
        return [f"cuda:{k}" for k in range(size)]
    if want not in ("auto", "cpu"):
        raise EvalError(f"--data-parallel-size spreads engines over devices itself; use --device auto or cpu, "
                        f"not {want!r}")
    return ["cpu"] * size


class _Outbox:
    """The worker's stand-in for the run store: records go to the parent, which owns the directory."""

    def __init__(self, results, rank: int):
        self.results, self.rank, self.records = results, rank, []

    def append(self, records: list[dict]) -> None:
        self.records += records
        self.results.put(("records", self.rank, records))

    def prompt_fields(self, prompt: str) -> dict:
        return {"_prompt": prompt}

    def accuracy(self) -> float:
        scored = [r for r in self.records if not r.get("skipped")]
        return sum(bool(r["correct"]) for r in scored) / len(scored) if scored else 0.0


def _work(config_dict: dict, keys: list, device: str, rank: int, size: int, results, warmup: bool) -> None:
    import os

    from dllm.eval.runner import EvalConfig, _Session, build_llm, load_task
    try:
        if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:   # the engines share the cores
            os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // size))
            import torch
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        config = dataclasses.replace(EvalConfig(**config_dict), device=device)
        task = load_task(config)
        docs = {doc.doc_id: doc for doc in task.docs()}
        pending = [(docs[d], j) for d, j in keys]
        session = _Session(config, task, _Outbox(results, rank), build_llm(config), time.perf_counter())
        environment = session.run(pending, total=len(pending), progress=False, warmup=warmup, label="")
        results.put(("done", rank, environment))
    except DllmError as exc:
        results.put(("error", rank, str(exc)))

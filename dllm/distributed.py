"""The tensor-parallel group: rank 0 (the process that runs the engine, scheduler and strategies) and N - 1
worker ranks that each hold a shard of the model and run the same forwards.

torch.distributed underneath: NCCL between GPUs (rank r on cuda:r), gloo on CPUs. Ranks are started either by the
engine (`torch.multiprocessing`, spawn) or by `torchrun` (its environment: RANK, WORLD_SIZE, MASTER_ADDR, ...;
ranks other than 0 then serve as workers inside `LLM(...)` and exit when rank 0 is done).

Per forward, rank 0 posts a fixed-size header (raw int64s, no pickling) on the group's key-value store and
broadcasts the step's canonical inputs in two tensors (the int64 indices, the uint8 mask); every rank runs the
forward (all-reduces inside), and rank 0 gathers the vocabulary shards of the logits. Workers idle on the store,
so an idle server never trips a collective's timeout. A worker that dies makes rank 0's next command fail with
one line (checked before every command, and any collective error is reported the same way); a rank 0 that dies
closes the store, and the workers exit.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import struct
import sys

import torch
import torch.distributed as dist

from dllm.errors import DllmError

logger = logging.getLogger(__name__)

STOP, PREPARE, FORWARD, SELECT = 0, 1, 2, 3
_HEADER = 16                                   # int64 fields in every command header
DEFAULT_TIMEOUT_S = 300
# collectives that return on rank 0 only once every rank took part: after one, every worker has read the command
# headers posted before it, so they can be deleted from the store
_EVERY_RANK_DONE = (dist.gather, dist.all_reduce, dist.barrier)


class DistributedError(DllmError):
    """A rank of the tensor-parallel group failed or went away."""


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                    and "MASTER_ADDR" in os.environ)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPGroup:
    """Rank 0's handle on the group: commands out, logits in."""

    def __init__(self, rank: int, size: int, store, device: torch.device, processes=()):
        self.rank, self.size, self.store, self.device = rank, size, store, device
        self.processes = list(processes)
        self.seq = 0
        self.read_upto = self.deleted = 0      # header keys every worker has read / already deleted
        self.closed = False            # unusable (a rank failed, or closed)
        self.finished = False          # shut down
        self.pg = dist.group.WORLD

    # ------------------------------------------------------------------ starting

    @classmethod
    def start(cls, size: int, device_type: str, worker_args: dict, timeout_s: int = DEFAULT_TIMEOUT_S) -> "TPGroup":
        """Rank 0 of a new group: spawn the workers (or join torchrun's group) and initialise torch.distributed."""
        if device_type == "cuda" and torch.cuda.device_count() < size:
            raise DistributedError(f"tensor_parallel_size {size} needs {size} GPUs; this machine has "
                                   f"{torch.cuda.device_count()}")
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if dist.is_initialized() and not launched_by_torchrun():
            raise DistributedError("a tensor-parallel LLM is already running in this process; call its "
                                   "shutdown() first (one group per process)")
        if launched_by_torchrun():
            return cls._from_torchrun(size, backend, device_type, worker_args, timeout)
        port = _free_port()
        store = dist.TCPStore("127.0.0.1", port, size, is_master=True, timeout=timeout, wait_for_workers=False)
        ctx = torch.multiprocessing.get_context("spawn")
        procs = []
        for rank in range(1, size):
            p = ctx.Process(target=worker_main, args=(rank, size, port, backend, device_type, worker_args, timeout_s),
                            daemon=True, name=f"dllm-tp-rank{rank}")
            p.start()
            procs.append(p)
        dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=0, world_size=size,
                                timeout=timeout)
        group = cls(0, size, dist.PrefixStore("dllm", store), _device(device_type, 0), procs)
        atexit.register(group.close)
        return group

    @classmethod
    def _from_torchrun(cls, size, backend, device_type, worker_args, timeout):
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world != size:
            raise DistributedError(f"torchrun started {world} processes but tensor_parallel_size is {size}")
        if device_type == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
        store = dist.distributed_c10d._get_default_store()   # torchrun's rendezvous store: no second port
        if rank != 0:   # this process serves as a worker and ends with the group
            serve(rank, size, dist.PrefixStore("dllm", store), device_type, worker_args)
            dist.destroy_process_group()
            sys.exit(0)
        group = cls(0, size, dist.PrefixStore("dllm", store), _device(device_type, 0))
        atexit.register(group.close)
        return group

    # ------------------------------------------------------------------ commands

    def post(self, *fields: int) -> None:
        if self.closed:
            raise DistributedError("the tensor-parallel group is closed")
        for p in self.processes:
            if not p.is_alive():
                self.closed = True
                raise DistributedError(f"tensor-parallel rank {p.name[-1]} died (exit code {p.exitcode}); "
                                       "restart the engine")
        header = list(fields) + [0] * (_HEADER - len(fields))
        self.store.set(f"cmd{self.seq}", struct.pack(f"<{_HEADER}q", *header))
        self.seq += 1
        # every worker has read the headers up to the last collective (it took part in it): drop them
        while self.deleted < self.read_upto:
            self.store.delete_key(f"cmd{self.deleted}")
            self.deleted += 1

    def collective(self, fn, *args):
        """Run a collective, turning a failed peer into one line."""
        try:
            out = fn(*args)
            if fn in _EVERY_RANK_DONE:   # a broadcast can return at the root before a worker took part
                self.read_upto = self.seq
            return out
        except (RuntimeError, dist.DistBackendError) as exc:
            self.closed = True
            raise DistributedError(f"a tensor-parallel rank stopped answering ({str(exc).splitlines()[0][:160]}); "
                                   "restart the engine") from None

    def close(self) -> None:
        if self.finished:
            return
        self.finished = self.closed = True
        try:
            self.post_unchecked(STOP)
        except Exception:  # noqa: BLE001 - shutting down: a dead worker needs no goodbye
            pass
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()

    def post_unchecked(self, *fields: int) -> None:
        header = list(fields) + [0] * (_HEADER - len(fields))
        self.store.set(f"cmd{self.seq}", struct.pack(f"<{_HEADER}q", *header))
        self.seq += 1


def _device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


# ---------------------------------------------------------------------- the worker side

def worker_main(rank: int, size: int, port: int, backend: str, device_type: str, worker_args: dict,
                timeout_s: int) -> None:
    """Entry point of a spawned worker rank."""
    timeout = datetime.timedelta(seconds=timeout_s)
    torch.set_num_threads(max(1, torch.get_num_threads() // size))
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=size,
                            timeout=timeout)
    try:
        serve(rank, size, dist.PrefixStore("dllm", store), device_type, worker_args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def serve(rank: int, size: int, store, device_type: str, worker_args: dict) -> None:
    """Load this rank's shard and run rank 0's commands until STOP (or until rank 0 goes away)."""
    from dllm.models.loader import load_model
    from dllm.parallel import TPInfo
    from dllm.runner import ModelRunner
    tp = TPInfo(rank, size, dist.group.WORLD)
    args = dict(worker_args)
    enforce_eager = args.pop("enforce_eager", False)
    loaded = load_model(args.pop("path"), device=str(_device(device_type, rank)), skip_tokenizer_init=True,
                        tp=tp, **args)
    runner = ModelRunner(loaded.model, loaded.arch, enforce_eager=enforce_eager)
    seq = 0
    while True:
        key = f"cmd{seq}"
        try:
            store.wait([key], datetime.timedelta(hours=24))
        except RuntimeError as exc:        # a wait timeout: rank 0 is idle; anything else: it is gone
            if "timeout" in str(exc).lower() or "timed out" in str(exc).lower():
                continue
            return
        fields = struct.unpack(f"<{_HEADER}q", store.get(key))
        seq += 1
        if fields[0] == STOP:
            return
        runner.serve_command(fields)

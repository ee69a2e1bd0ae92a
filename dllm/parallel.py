"""Tensor parallelism: how one rank's shard of the transformer is cut, and the two collectives a forward needs.

Megatron's layout (vLLM's names): q/k/v and gate/up are column-parallel (a rank holds some heads / some of the
intermediate features), o and down are row-parallel (one all-reduce each), the embedding and the LM head are
vocabulary-parallel (the embedding all-reduces; the LM head's logits are gathered by the runner, only for the
positions the step reads). With fewer K/V heads than ranks each K/V head is replicated on the ranks whose query
heads use it, as vLLM does. A rank's K/V buffers hold its own K/V heads.

`TPInfo` with size 1 is the whole model in one process: every helper is then the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dllm.errors import InvalidParameterError
from dllm.models.spec import ArchConfig


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    group: object = None          # a torch.distributed ProcessGroup; None: the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x


def check_divisible(arch: ArchConfig, size: int) -> None:
    """Refuse, in one line, a TP size that does not cut the model into equal shards."""
    if size < 1:
        raise InvalidParameterError(f"tensor_parallel_size must be >= 1, got {size}")
    for what, n in (("attention heads", arch.num_heads), ("MLP features", arch.intermediate_size),
                    ("vocabulary entries", arch.vocab_size)):
        if n % size:
            raise InvalidParameterError(f"tensor_parallel_size {size} does not divide the model's {n} {what}; "
                                        f"use a size that divides {arch.num_heads} heads and {arch.vocab_size} "
                                        "vocabulary entries")
    kv = arch.num_kv_heads
    if (kv % size) if kv >= size else (size % kv):
        raise InvalidParameterError(f"tensor_parallel_size {size} and the model's {kv} key/value heads: one must "
                                    "divide the other")


def head_range(arch: ArchConfig, tp: TPInfo) -> tuple[int, int]:
    """(first query head, count) of this rank."""
    n = arch.num_heads // tp.size
    return tp.rank * n, n


def kv_head_range(arch: ArchConfig, tp: TPInfo) -> tuple[int, int]:
    """(first K/V head, count) of this rank: an even share, or the one head its query heads use (replicated)."""
    kv = arch.num_kv_heads
    if kv >= tp.size:
        n = kv // tp.size
        return tp.rank * n, n
    first_q, _ = head_range(arch, tp)
    return first_q // (arch.num_heads // kv), 1


def split_range(total: int, tp: TPInfo) -> tuple[int, int]:
    n = total // tp.size
    return tp.rank * n, n


def shard_slices(name: str, arch: ArchConfig, tp: TPInfo) -> tuple[int, slice] | None:
    """For a parameter of the core (dllm's names), the (dimension, slice) this rank holds; None = all of it."""
    if tp.size == 1:
        return None
    d = arch.head_dim
    leaf = name.split(".")[-2:]            # e.g. ["q_proj", "weight"]
    module, kind = leaf[0], leaf[1]
    if module == "q_proj":
        first, n = head_range(arch, tp)
        return 0, slice(first * d, (first + n) * d)
    if module in ("k_proj", "v_proj"):
        first, n = kv_head_range(arch, tp)
        return 0, slice(first * d, (first + n) * d)
    if module == "o_proj" and kind == "weight":
        first, n = head_range(arch, tp)
        return 1, slice(first * d, (first + n) * d)
    if module in ("gate_proj", "up_proj"):
        first, n = split_range(arch.intermediate_size, tp)
        return 0, slice(first, first + n)
    if module == "down_proj" and kind == "weight":
        first, n = split_range(arch.intermediate_size, tp)
        return 1, slice(first, first + n)
    if module in ("embed", "lm_head"):
        first, n = split_range(arch.vocab_size, tp)
        return 0, slice(first, first + n)
    return None


def take_shard(tensor: torch.Tensor, rule: tuple[int, slice] | None) -> torch.Tensor:
    if rule is None:
        return tensor
    dim, sl = rule
    return tensor[sl] if dim == 0 else tensor[:, sl]


def start_tensor_parallel(model, size: int, device, load: dict, enforce_eager: bool):
    """Rank 0's side of `LLM(..., tensor_parallel_size=size)`: check the shapes, start the workers (or join
    torchrun's group) and return (local checkpoint path, rank 0's device, {"tp": TPInfo, "group": TPGroup})."""
    from dllm.distributed import TPGroup
    from dllm.models.loader import inspect_checkpoint, resolve_device, resolve_path
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InvalidParameterError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    path = resolve_path(model, load.get("revision"))
    check_divisible(inspect_checkpoint(path).arch, size)
    dev = resolve_device(device)
    worker_args = {"path": str(path), "enforce_eager": enforce_eager,
                   **{k: v for k, v in load.items() if k in ("dtype", "trust_remote_code", "load_format", "seed")}}
    group = TPGroup.start(size, dev.type, worker_args)
    rank0 = "cuda:0" if dev.type == "cuda" else "cpu"
    return str(path), rank0, {"tp": TPInfo(0, size, group.pg), "group": group}

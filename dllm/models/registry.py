"""Architecture registry: picks the family adapter from config.json's `model_type` / `architectures`."""
from __future__ import annotations

from dllm.errors import UnsupportedModelError
from dllm.models.dream import DreamAdapter
from dllm.models.llada import LLaDAAdapter
from dllm.models.sdar import SDARAdapter, SDARMoeAdapter
from dllm.models.tidar import TiDARAdapter

ADAPTERS = [LLaDAAdapter(), DreamAdapter(), SDARAdapter(), SDARMoeAdapter(), TiDARAdapter()]


def adapter_for(cfg: dict, where: str = "the checkpoint"):
    """The adapter whose model_type or architecture names match `cfg`; a clear error otherwise."""
    model_type = str(cfg.get("model_type", ""))
    archs = cfg.get("architectures") or []
    for adapter in ADAPTERS:
        if model_type.lower() in adapter.model_types or any(a in adapter.architectures for a in archs):
            return adapter
    supported = ", ".join(f"{a.family} (model_type {'/'.join(a.model_types)})" for a in ADAPTERS
                          if a.family != "sdar_moe")
    raise UnsupportedModelError(
        f"{where} has model_type {model_type!r} and architectures {archs}, which dllm does not support; "
        f"supported families: {supported}")

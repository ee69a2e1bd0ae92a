"""Model adapters over one transformer core; see `core.py` (the maths) and `registry.py` (family lookup)."""
from dllm.models.loader import LoadedModel, load_model
from dllm.models.spec import ArchConfig, ModelSpec

__all__ = ["ArchConfig", "LoadedModel", "ModelSpec", "load_model"]

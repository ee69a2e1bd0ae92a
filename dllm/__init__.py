"""dllm: a decoding runtime for diffusion language models.

Public API: `LLM`, `SamplingParams`, `RequestOutput`, `StreamEvent` (see `dllm/api.py`).
"""
from dllm.errors import DllmError
from dllm.outputs import CompletionOutput, RequestMetrics, RequestOutput, StreamEvent
from dllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics", "StreamEvent",
           "DllmError", "__version__"]


def __getattr__(name: str):
    # `LLM` pulls in `dllm.cache` and `dllm.decoding`, which themselves import small interfaces from `dllm`;
    # importing it lazily keeps `import dllm.cache` (or `dllm.decoding`) first from being circular.
    if name == "LLM":
        from dllm.api import LLM
        return LLM
    raise AttributeError(f"module 'dllm' has no attribute {name!r}")

"""dllm: a decoding runtime for diffusion language models.

Public API: `LLM`, `SamplingParams`, `RequestOutput`, `StreamEvent` (see `dllm/api.py`).
"""
from dllm.api import LLM
from dllm.errors import DllmError
from dllm.outputs import CompletionOutput, RequestMetrics, RequestOutput, StreamEvent
from dllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics", "StreamEvent",
           "DllmError", "__version__"]

"""Learn2PD's commit filter (arXiv 2509.25188; ims-kdks/Learning-to-Parallel-Decoding `model/small_model.py`, the
2-layer variant the authors ship as `layer_2_flan.pth`): a tiny MLP that reads the block's confidence vector and
says, per position, whether the current proposal there is already the final token.

    logits = Linear(L, L) -> ReLU -> Linear(L, L)      L = block length (32 in the paper), 2 L (L + 1) parameters

Input: float32 [B, n] confidences (n <= L; a block cut short by end-of-text prediction is zero-padded to L and
the output sliced back, as the authors' class does). Output: [B, n] logits; "accept" = sigmoid(logit) > threshold.

A filter on disk is two files side by side: `NAME.safetensors` (the weights, the authors' state-dict names
`linear1.*`, `linear2.*`) and `NAME.json` (what it was trained for: model, vocabulary size, block length, feature
definition, threshold, and how it was trained). `load_filter(path)` takes either file or the stem.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dllm.errors import InvalidParameterError

FORMAT = "learn2pd-filter/1"
FEATURES = "confidence"   # p(x0) of every block position under the family's proposal (committed ones included)
DEFAULT_THRESHOLD = 0.96  # the authors' accept_thres (llada/eval_llada.sh, generate.py main)


class ParallelFilter(nn.Module):
    def __init__(self, block_length: int):
        super().__init__()
        self.block_length = block_length
        self.linear1 = nn.Linear(block_length, block_length)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(block_length, block_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]                                                    # [B, n], n <= L
        if n != self.block_length:
            x = nn.functional.pad(x, (0, self.block_length - n))
        out = self.linear2(self.relu(self.linear1(x)))
        return out[..., :n]


@dataclass
class FilterConfig:
    model: str                 # the checkpoint it was trained for (name or path, as given to training)
    family: str
    vocab_size: int
    block_length: int
    threshold: float = DEFAULT_THRESHOLD
    features: str = FEATURES
    format: str = FORMAT
    training: dict = field(default_factory=dict)


@dataclass
class Filter:
    config: FilterConfig
    net: ParallelFilter

    @torch.no_grad()
    def accept_probability(self, confidence: torch.Tensor) -> torch.Tensor:
        """[B, n] confidences -> [B, n] sigmoid outputs (float32, as the authors feed it)."""
        net = self.net.to(confidence.device)
        return torch.sigmoid(net(confidence.to(torch.float32)))


def _paths(path) -> tuple[pathlib.Path, pathlib.Path]:
    p = pathlib.Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_filter(path, flt: Filter) -> pathlib.Path:
    """Write NAME.safetensors + NAME.json; returns the JSON path."""
    from safetensors.torch import save_file
    weights, meta = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous().float() for k, v in flt.net.state_dict().items()}, str(weights))
    meta.write_text(json.dumps(asdict(flt.config), indent=2) + "\n")
    return meta


def load_filter(path) -> Filter:
    from safetensors.torch import load_file
    weights, meta = _paths(path)
    if not weights.is_file() or not meta.is_file():
        raise InvalidParameterError(f"no Learn2PD filter at {path}: expected {weights.name} and {meta.name} "
                                    "(make one with `dllm train-filter`)")
    try:
        raw = json.loads(meta.read_text())
        config = FilterConfig(**raw)
    except (ValueError, TypeError) as exc:
        raise InvalidParameterError(f"{meta} is not a Learn2PD filter config ({exc}); remake it with "
                                    "`dllm train-filter`") from None
    if config.format != FORMAT or config.features != FEATURES:
        raise InvalidParameterError(f"{meta}: filter format {config.format!r} with features {config.features!r} "
                                    f"is not supported (expected {FORMAT!r}, {FEATURES!r})")
    net = ParallelFilter(config.block_length)
    try:
        net.load_state_dict(load_file(str(weights)))
    except RuntimeError:
        raise InvalidParameterError(f"{weights} does not hold a {config.block_length}-wide 2-layer filter; "
                                    "remake it with `dllm train-filter`") from None
    return Filter(config, net.eval())


def check_filter(flt: Filter, vocab_size: int, block_length: int | None = None, source: str = "") -> None:
    """Refuse a filter made for another vocabulary or block length (one line, how to fix)."""
    c = flt.config
    if c.vocab_size != vocab_size:
        raise InvalidParameterError(f"Learn2PD filter {source} was trained for {c.model} (vocabulary {c.vocab_size}), "
                                    f"not this model (vocabulary {vocab_size}); train one with `dllm train-filter`")
    if block_length is not None and block_length != c.block_length:
        raise InvalidParameterError(f"Learn2PD filter {source} was trained for block_length {c.block_length}; set "
                                    f"block_length={c.block_length} or train a filter for {block_length}")

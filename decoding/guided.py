"""Guided diffusion (FlashDLM, arXiv 2505.21467; ZhanqiuHu/flash-dlm-experimental @ 387beab `guided_diffusion/`):
a small autoregressive model that shares the tokenizer decides how many of the diffusion model's proposals to
commit.

Each step the diffusion model proposes a token (its argmax, the family's proposal at temperature 0) at every
masked position of the block; the guide reads the row's tokens with the proposals in place, causally, and the
proposals are accepted left to right while the guide's greedy choice at that position equals the proposal.
- `mode="assisted"` (the authors' `diff_spec_utils_assisted.py`): commit the first max(1, a) proposals, a being
  the number accepted (the guide only gates);
- `mode="speculative"` (`diff_spec_utils_shifted.py`): commit the a accepted proposals plus the guide's own token
  at the first rejection.
Either way every step commits at least one token. The paper's setting decodes the whole answer as one block
(`block_length = max_tokens`); with smaller blocks the proposals stop at the block end.

The guide is any causal LM that transformers loads (`AutoModelForCausalLM`; the zoo's `tiny-ar`), given once per
engine: `LLM(model, strategy="guided", strategy_options={"guide": "tiny-ar"})`. It runs one forward over the whole
row per step (the authors verify in chunks of 32 proposals with a KV cache; for a causal guide the accepted
count is the same, the chunking only saves guide compute).
"""
from __future__ import annotations

import torch

from dllm.decoding.base import Strategy
from dllm.errors import InvalidParameterError

MODES = ("assisted", "speculative")


class Guide:
    """The loaded guide model (shared by every run of an engine)."""

    def __init__(self, model, vocab_size: int):
        self.model, self.vocab_size = model, vocab_size

    @torch.no_grad()
    def greedy(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """[B, T] -> the guide's argmax next token after each position, [B, T]."""
        mask = None if valid is None else valid.long()
        logits = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions).logits
        return logits.argmax(-1)


class GuidedStrategy(Strategy):
    name = "guided"
    families = ("llada", "dream")
    engine_options = {"guide": None, "mode": "assisted", "trust_remote_code": False}

    @classmethod
    def prepare(cls, options: dict, loaded) -> dict:
        opts = cls.resolve_engine_options(options)
        if not opts["guide"]:
            raise InvalidParameterError("strategy 'guided' needs a guide model: strategy_options={'guide': "
                                        "'tiny-ar'} (any causal LM that shares the model's tokenizer)")
        if opts["mode"] not in MODES:
            raise InvalidParameterError(f"guided mode must be one of {', '.join(MODES)}, got {opts['mode']!r}")
        opts["guide"] = load_guide(opts["guide"], loaded, opts["trust_remote_code"])
        return opts

    def choose(self, x0, probs, masked, generators) -> torch.Tensor:
        canvas, start = self.canvas, self.block_start
        end = start + masked.shape[1]
        tokens = canvas.tokens[:, :end].clone()
        tokens[:, start:] = torch.where(masked, x0, tokens[:, start:])
        valid = None if canvas.key_valid is None else canvas.key_valid[:, :end]
        choice = self.state["guide"].greedy(tokens, canvas.positions[:, :end], valid)[:, start - 1:end - 1]
        cols = torch.arange(masked.shape[1], device=masked.device)[None, :]
        rejected = masked & (choice != x0)
        first_rejected = torch.where(rejected.any(1), cols.masked_fill(~rejected, masked.shape[1]).min(1).values,
                                     masked.shape[1])[:, None]                                  # [B, 1]
        commit = masked & (cols < first_rejected)
        if self.state["mode"] == "speculative":
            at_rejection = masked & (cols == first_rejected)
            x0.copy_(torch.where(at_rejection, choice, x0))
            return commit | at_rejection
        first_masked = masked & (masked.cumsum(1) == 1)
        return torch.where(commit.any(1, keepdim=True), commit, first_masked)


def load_guide(name, loaded, trust_remote_code: bool) -> Guide:
    """The guide as a transformers causal LM on the diffusion model's device and dtype; zoo names resolve to the
    bundled models. Refused when its vocabulary cannot hold the model's token ids."""
    from transformers import AutoModelForCausalLM
    from dllm.zoo import bundled_path
    path = str(bundled_path(str(name)) or name)
    param = next(loaded.model.parameters())
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=param.dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InvalidParameterError(f"cannot load the guide model {name!r} as a causal LM ({str(exc).splitlines()[0]}); "
                                    "give a local directory or hub id of a transformers causal LM") from None
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab < loaded.arch.vocab_size:
        raise InvalidParameterError(f"the guide's vocabulary ({vocab}) is smaller than the model's "
                                    f"({loaded.arch.vocab_size}); the guide must share the model's tokenizer")
    return Guide(model.to(param.device).eval(), vocab)

"""The strategy interface: given the logits of the current block, which masked positions to commit, and to
which tokens.

Verbs (the engine calls nothing else):
  begin_block(masked)                       masked: [B, Lb] bool, the block's MASK positions at block start
  step(logits, masked, generators)          -> (x0 [B, Lb] tokens, commit [B, Lb] bool); commit only where masked
  select_rows(keep)                         rows left the batch

`Strategy` implements the LLaDA-family proposal (optional EOS suppression, Gumbel sampling, confidence,
optional EOS/EoT confidence suppression); subclasses implement `choose`, the selection rule.
"""
from __future__ import annotations

import torch

from decoding.sampling import rand_like_rows, sample_tokens, token_confidence
from dllm.models.spec import ModelSpec
from dllm.sampling_params import SamplingParams


class Strategy:
    name = "base"
    uses_steps = False                         # whether SamplingParams.steps bounds the forwards per block
    confidence_dtype: torch.dtype | None = torch.float64

    def __init__(self, params: SamplingParams, spec: ModelSpec):
        self.params = params
        self.spec = spec
        self.step_index = 0
        self._suppress = [i for i in (spec.eos_id, spec.eot_id) if i is not None]
        self._id_tensors: dict = {}

    def begin_block(self, masked: torch.Tensor) -> None:
        self.step_index = 0

    def step(self, logits: torch.Tensor, masked: torch.Tensor, generators: list):
        x0, confidence = self.propose(logits, masked, generators)
        commit = self.choose(confidence, masked) & masked
        self.step_index += 1
        return x0, commit

    def propose(self, logits: torch.Tensor, masked: torch.Tensor, generators: list):
        """-> x0 [B, Lb], confidence [B, Lb] (-inf where not masked)."""
        p = self.params
        if p.logits_eos_inf and self.spec.eos_id is not None:
            logits = logits.index_fill(-1, self._ids([self.spec.eos_id], logits), -torch.inf)
        # The MASK token is never a prediction: sampling it would leave the position masked (the published
        # samplers can do this at temperature > 0). Confidence still uses the unaltered distribution.
        x0 = sample_tokens(logits.index_fill(-1, self._ids([self.spec.mask_id], logits), -torch.inf),
                           p.temperature, generators)
        if p.remasking == "random":
            confidence = rand_like_rows(tuple(masked.shape), generators, torch.float64, masked.device)
        else:
            if p.confidence_eos_eot_inf and self._suppress:
                # LLaDA sets these logits to -inf after sampling, so they get zero probability and are
                # committed last. (Its chained assignment does this for EOS only at temperature 0; here the
                # documented meaning, both tokens, holds at every temperature.)
                logits = logits.index_fill(-1, self._ids(self._suppress, logits), -torch.inf)
            confidence = token_confidence(logits, x0, self.confidence_dtype)
        return x0, confidence.masked_fill(~masked, -torch.inf)

    def _ids(self, ids: list[int], like: torch.Tensor) -> torch.Tensor:
        """Token ids as a device tensor, made once (no host-to-device copy inside the step loop)."""
        key = (tuple(ids), like.device)
        if key not in self._id_tensors:
            self._id_tensors[key] = torch.tensor(ids, dtype=torch.long, device=like.device)
        return self._id_tensors[key]

    def choose(self, confidence: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select_rows(self, keep: torch.Tensor) -> None:
        pass

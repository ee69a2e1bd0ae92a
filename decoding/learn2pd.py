"""Learn2PD (arXiv 2509.25188; ims-kdks/Learning-to-Parallel-Decoding @ 342293ce `llada/generate.py`): LLaDA's
low-confidence semi-autoregressive sampler plus a learned filter that commits, every step, each masked block
position it judges already final; with End-of-Text Prediction (EoTP) the canvas is cut after the predicted end.

Per step, with c = p(x0) of every block position (committed ones included) and the row's quota q from LLaDA's
linear schedule (`get_num_transfer_tokens`; one token a step when steps = max_tokens, the authors' setting):
  accept = sigmoid(filter(c)) > threshold, on masked block positions       (the filter: `l2p_filter.py`)
  commit = accept | the q most confident masked block positions            (so at least one token a step)
  EoTP:  if some accepted position proposes EOS, cut the canvas after the first one; else, if some masked
         position in the EoTP scope proposes EOS, cut after the most confident of them (that position may still
         be MASK: it stays, and is decoded later).
The EoTP scope is the authors' per variant:
  cache none   (`generate_l2p_eot`)                  every masked position of the canvas (later blocks too)
  prefix, dual (`generate_with_{prefix,dual}_cache`) the current block only (their `get_transfer_index` sees
                                                     the block's mask index alone)
and the confidence dtype too: the logits' own dtype without a cache, float64 with one (`get_transfer_index`).
`eotp=False` is `generate_learn2parallel` (no cut). A cut hides the columns after it from every later forward,
as the authors' slicing of `x` does (dual cache: from the next block start on; see `cache/dual.py`).

Dream (no published Learn2PD sampler): the same rule over Dream's proposal (its `sample_tokens` at the request's
temperature; c = p(x0)), with the LLaDA-style quota; on cached Dream paths the block-start forward commits the
block's first position only, as for every strategy (`first_only`).

Options (`strategy_options`): `filter` (path to a filter from `dllm train-filter`; default: the zoo model's
shipped filter), `threshold` (default: the filter's, 0.96 unless trained otherwise), `eotp` (default true).
"""
from __future__ import annotations

import torch

from dllm.decoding.base import StepEdits, Strategy
from dllm.decoding.l2p_filter import check_filter, load_filter
from dllm.decoding.llada import LLaDAReference, transfer_quota
from dllm.errors import InvalidParameterError


class Learn2PDStrategy(LLaDAReference):
    name = "learn2pd"
    families = ("llada", "dream")
    options = ("steps",)
    remasking = ()         # LLaDA's quota rule always ranks by confidence here
    steps_mode = "total"
    logits_span = "tail"   # [block start, canvas end) when the cache feeds every column (EoTP scope), else the block
    engine_options = {"filter": None, "threshold": None, "eotp": True}

    @classmethod
    def prepare(cls, options: dict, loaded) -> dict:
        opts = cls.resolve_engine_options(options)
        path = opts["filter"] or zoo_filter(loaded)
        if path is None:
            raise InvalidParameterError("strategy 'learn2pd' needs a filter for this model: strategy_options="
                                        "{'filter': PATH} (make one with `dllm train-filter`)")
        flt = load_filter(path)
        check_filter(flt, loaded.arch.vocab_size, source=str(path))
        if flt.config.family != loaded.spec.family:
            raise InvalidParameterError(f"Learn2PD filter {path} was trained for a {flt.config.family} model, not "
                                        f"{loaded.spec.family}; train one with `dllm train-filter`")
        threshold = flt.config.threshold if opts["threshold"] is None else _probability(opts["threshold"])
        return {"filter": flt, "threshold": threshold, "eotp": opts["eotp"]}

    def max_forwards(self, block_length: int) -> int:
        return super().max_forwards(block_length) + 1

    def begin_block(self, masked: torch.Tensor) -> None:
        Strategy.begin_block(self, masked)      # not LLaDA's quota: this one leaves out columns a cut removed
        flt = self.state["filter"]
        check_filter(flt, flt.config.vocab_size, self.params.block_length, source="")
        alive = self.canvas.alive(self.block_start, self.block_start + masked.shape[1])
        self.quota = transfer_quota(masked if alive is None else masked & alive, self._steps_per_block())
        # The authors' no-cache sampler takes the softmax in the logits' dtype, the cached one in float64.
        self.confidence_dtype = None if self.ctx.run.cache.feeds_all else torch.float64

    def choose(self, x0, probs, masked, generators) -> StepEdits:
        # [B, S], S = block (+ the rest of the canvas when the cache feeds it): the filter's accepts and LLaDA's
        # quota in the block, and the end-of-text cut
        width = self.params.block_length
        conf = probs.gather(-1, x0[..., None]).squeeze(-1)                      # [B, S] p(x0), every position
        block_masked = masked[:, :width]
        accept = self._accept(conf[:, :width]) & block_masked
        commit = torch.zeros_like(masked)
        commit[:, :width] = accept | super().choose(x0[:, :width], probs[:, :width], block_masked, generators)
        cut = self._end_of_text(x0, conf, masked, accept) if self.state["eotp"] else None
        return StepEdits(x0, commit, truncate=cut)

    def _accept(self, conf: torch.Tensor) -> torch.Tensor:
        """The filter's verdict on the block's confidences [B, L]; columns a cut removed read 0 (the authors'
        zero padding of a shortened block)."""
        start = self.block_start
        alive = self.canvas.alive(start, start + conf.shape[1])
        features = conf if alive is None else conf.masked_fill(~alive, 0)
        return self.state["filter"].accept_probability(features) > self.state["threshold"]

    def _end_of_text(self, x0, conf, masked, accept) -> list[int | None] | None:
        """Per row, the absolute column where EoTP ends the canvas (None: no cut)."""
        eos = self.spec.eos_id
        if eos is None:
            return None
        width = accept.shape[1]
        accepted_eos = accept & (x0[:, :width] == eos)
        eos_conf = conf.masked_fill(~(masked & (x0 == eos)), -torch.inf)      # the scope: every column we got
        first = accepted_eos.long().argmax(-1)
        best = eos_conf.argmax(-1)
        has_accepted, has_any = accepted_eos.any(-1), torch.isfinite(eos_conf).any(-1)
        where = torch.where(has_accepted, first, best).masked_fill(~(has_accepted | has_any), -1).tolist()  # one sync
        cuts = [self.block_start + w + 1 if w >= 0 else None for w in where]
        return cuts if any(c is not None for c in cuts) else None



def zoo_filter(loaded):
    """The filter shipped for a bundled zoo model (None for any other model)."""
    from dllm.zoo import FILTERS_DIR, ZOO_MODELS, bundled_path
    for name in ZOO_MODELS:
        path = bundled_path(name)
        if path is not None and path.resolve() == loaded.path.resolve():
            candidate = FILTERS_DIR / f"{name}.json"
            return candidate if candidate.is_file() else None
    return None


def _probability(value) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = -1.0
    if not 0 < t < 1:
        raise InvalidParameterError(f"learn2pd threshold must be a number in (0, 1), got {value!r}")
    return t

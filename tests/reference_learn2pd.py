"""Independent re-implementation of the authors' Learn2PD samplers and training-data generator, for parity tests.

Mirrors ims-kdks/Learning-to-Parallel-Decoding @ 342293ce, `llada/generate.py`:
  `generate_learn2parallel` / `generate_l2p_eot`      -> `l2p_generate(..., eot=False / True)`
  `generate_with_prefix_cache` / `..._dual_cache`     -> `l2p_generate_cached(..., cache="prefix" / "dual")`
  (`get_transfer_index` with the filter, float64 confidences, EoTP over the block's mask index)
and `llada/generate_training_data.py::generate_data` (the Extremely-Greedy-Parallel replay) -> `egp_records`.
The filter is `model/small_model.py`'s 2-layer class in plain math (zero padding of a short input).
Written from the published code's behaviour, never from the runtime packages (dllm, decoding, cache).
The model is `reference_llada.RefLLaDA` (plain-math LLaDA forward with the Fast-dLLM cache arguments); the
authors' dual cache writes the block's K/V into the cache in place, so the cache here is replaced by each
forward's `present`. Batch 1, as the authors' functions (their EoTP indexes `[0]`).
"""
from __future__ import annotations

import torch

from reference_llada import get_num_transfer_tokens

NEG_INF = float("-inf")


class RefFilter:
    """relu(x W1^T + b1) W2^T + b2 over a zero-padded confidence vector (the authors' 2-layer small model)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.w1, self.b1 = state["linear1.weight"].float(), state["linear1.bias"].float()
        self.w2, self.b2 = state["linear2.weight"].float(), state["linear2.bias"].float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, dim = x.shape[-1], self.w1.shape[1]
        if n != dim:
            x = torch.cat([x, torch.zeros(*x.shape[:-1], dim - n)], -1)
        out = torch.relu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2
        return out[..., :n]


def _confidence(logits, dtype=None):
    x0 = logits.argmax(-1)
    p = torch.softmax(logits if dtype is None else logits.to(dtype), dim=-1)
    return x0, p.gather(-1, x0[..., None]).squeeze(-1)


def _start(prompt, steps, gen_length, block_length, mask_id):
    """The authors' set-up: the canvas (prompt + gen_length MASKs), prompt length, blocks, steps per block."""
    P = prompt.shape[1]
    x = torch.full((1, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    nb = gen_length // block_length
    return x, P, nb, steps // nb


@torch.no_grad()
def l2p_generate(model, filt, thr, prompt, steps, gen_length, block_length, mask_id, eos_id, eot=True):
    """`generate_l2p_eot` (eot=True) / `generate_learn2parallel` (eot=False) at temperature 0, no CFG.
    Returns (x [1, <= P + G], nfe, cuts)."""
    x, P, nb, spb = _start(prompt, steps, gen_length, block_length, mask_id)
    nfe, cuts = 0, 0
    for b in range(nb):
        bs, be = P + b * block_length, P + (b + 1) * block_length
        quota = get_num_transfer_tokens(x[:, bs:be] == mask_id, spb)
        i = 0
        while (x[:, bs:be] == mask_id).any():
            mask_index = x == mask_id
            logits = model(x)[0]
            nfe += 1
            x0, x0_p = _confidence(logits)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            transfer[:, bs:be] = torch.sigmoid(filt(x0_p[:, bs:be].float())) > thr
            transfer = transfer & mask_index
            eot_accepted = (x0 == eos_id) & transfer
            end_conf = torch.where((x0 == eos_id) & mask_index, x0_p, NEG_INF)
            x0_p[:, be:] = NEG_INF
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, NEG_INF)
            _, sel = torch.topk(confidence[0], k=int(quota[0, i]))
            transfer[0, sel] = True
            x[transfer] = x0[transfer]
            if eot:
                if eot_accepted.any():
                    x = x[:, :int(eot_accepted.to(torch.int8).argmax(-1)[0]) + 1]
                    cuts += 1
                elif (end_conf > NEG_INF).any():
                    x = x[:, :int(end_conf.argmax(-1)[0]) + 1]
                    cuts += 1
            i += 1
    return x, nfe, cuts


def _transfer_index(logits, mask_index, x, k, filt, thr, eos_id, block=None):
    """The authors' `get_transfer_index` at temperature 0 with `low_confidence` (float64 confidences)."""
    x0, x0_p = _confidence(logits, torch.float64)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    if block is not None:
        bs, be = block
        transfer[:, bs:be] = torch.sigmoid(filt(x0_p[:, bs:be].float())) > thr
    else:
        transfer = torch.sigmoid(filt(x0_p.float())) > thr
    transfer = transfer & mask_index
    eot_accepted = (x0 == eos_id) & transfer
    end_conf = torch.where((x0 == eos_id) & mask_index, x0_p, NEG_INF)
    end = None
    if eot_accepted.any():
        end = int(eot_accepted.to(torch.int8).argmax(-1)[0])
    elif (end_conf > NEG_INF).any():
        end = int(end_conf.argmax(-1)[0])
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, NEG_INF)
    _, sel = torch.topk(confidence[0], k=int(k))
    transfer[0, sel] = True
    return x0, transfer, end


@torch.no_grad()
def l2p_generate_cached(model, filt, thr, prompt, steps, gen_length, block_length, mask_id, eos_id, cache):
    """`generate_with_prefix_cache` (cache="prefix") / `generate_with_dual_cache` (cache="dual") at temperature 0.
    Returns (x, nfe, cuts)."""
    x, P, nb, spb = _start(prompt, steps, gen_length, block_length, mask_id)
    nfe, cuts = 0, 0
    for b in range(nb):
        bs = P + b * block_length
        if bs >= x.shape[1]:
            break
        be = bs + block_length
        quota = get_num_transfer_tokens(x[:, bs:be] == mask_id, spb)
        logits, present = model(x)
        nfe += 1
        mask_index = x == mask_id
        mask_index[:, be:] = False
        x0, transfer, end = _transfer_index(logits, mask_index, x, quota[0, 0], filt, thr, eos_id, (bs, be))
        x[transfer] = x0[transfer]
        if end is not None:
            x, cuts = x[:, :end + 1], cuts + 1
        past = [(k[:, :, :bs], v[:, :, :bs]) for k, v in present] if cache == "prefix" else present
        replace = torch.zeros_like(x, dtype=torch.bool)
        replace[:, bs:be] = True
        i = 1
        while (x[:, bs:be] == mask_id).sum() > 0:
            nfe += 1
            if cache == "prefix":
                mask_index = x[:, bs:] == mask_id
                mask_index[:, block_length:] = False
                logits = model(x[:, bs:], past_key_values=past)[0]
                x0, transfer, end = _transfer_index(logits, mask_index, x[:, bs:], quota[0, i], filt, thr, eos_id,
                                                    (0, be - bs))
            else:
                mask_index = x[:, bs:be] == mask_id
                logits, past = model(x[:, bs:be], past_key_values=past, replace_position=replace)
                x0, transfer, end = _transfer_index(logits, mask_index, x[:, bs:be], quota[0, i], filt, thr, eos_id)
            x[:, bs:bs + transfer.shape[1]][transfer] = x0[transfer]
            if end is not None:
                x, cuts = x[:, :bs + end + 1], cuts + 1
                replace[:, bs + end + 1:] = False
            i += 1
    return x, nfe, cuts


@torch.no_grad()
def egp_records(model, prompt, target, steps, gen_length, block_length, mask_id):
    """`generate_data` with `correct_answer=target` (the reference output, [1, P + G]): per block and step, the
    block's 32 confidences (logits' dtype) and whether each argmax equals the target; commit every correct
    position; when a step's block argmax equals the previous step's, copy the target block in (record kept).
    Returns (records, number of such stalls)."""
    P = prompt.shape[1]
    x = torch.full((1, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    records, stalls = [], 0
    for b in range(gen_length // block_length):
        bs, be = P + b * block_length, P + (b + 1) * block_length
        i, prev = 0, None
        while (x[:, bs:be] == mask_id).any():
            x0, x0_p = _confidence(model(x)[0])
            block = x0[:, bs:be]
            correct = block == target[:, bs:be]
            records.append({"step": i, "confidence": x0_p[0, bs:be].tolist(), "is_correct": correct[0].tolist()})
            if prev is not None and bool((block == prev).all()):
                x[:, bs:be] = target[:, bs:be]
                stalls += 1
                continue
            x[:, bs:be] = torch.where(correct, block, x[:, bs:be])
            i += 1
            prev = block
    return records, stalls

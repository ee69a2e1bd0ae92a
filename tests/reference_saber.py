"""Independent oracle for Saber (arXiv 2510.18165), written from the authors' algorithm, not from the runtime:

- `saber_llada`: zhaoyMa/Saber `decoding.py::generate_with_saber`, both published versions (the remask divisor is
  8 at 2f061e2e, `mu` (default 2) at c4caa28d); batch-1 like the authors' function, on the full canvas, with the
  same tensor dtypes (confidence in the logits' dtype, the commit record and tau in float32, tau compared in the
  confidence's dtype as torch does for a 0-dim tensor).
- `saber_dream`: `Dream/generation_utils.py::DreamGenerationMixin._sample` (temperature 0, eos_penalty 0).

Each returns (canvas [1, P + G], number of forwards, number of re-masked tokens). Both use `torch.topk` on
tensors laid out as the authors' (full canvas rows; Dream's gathered candidates), so ties break as theirs do.
"""
from __future__ import annotations

import math

import torch

from reference_dream import shift_logits

NEG_INF = float("-inf")


@torch.no_grad()
def saber_llada(model, prompt, n=2, mu=2, gen_length=32, block_length=32, mask_id=126336):
    P = prompt.shape[1]
    x = torch.full((1, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    prompt_pos = x != mask_id
    gen_pos = x == mask_id
    committed = torch.zeros_like(x, dtype=torch.bool)
    latest = torch.full(x.shape, NEG_INF, dtype=torch.float32)     # confidence at the latest commit
    prev = torch.zeros(x.shape, dtype=torch.float32)                # last step's confidence vector
    forwards = remasked = 0
    for blk in range(gen_length // block_length):
        end = P + (blk + 1) * block_length
        for _ in range(1024):
            forwards += 1
            logits = model(x)[0]
            guess = logits.argmax(-1)
            conf = torch.softmax(logits, -1).gather(-1, guess[..., None]).squeeze(-1)
            conf[:, end:] = NEG_INF
            guess = torch.where(gen_pos, guess, x)
            conf_g = torch.where(gen_pos, conf, NEG_INF)
            drop = conf_g - prev
            drop = torch.where(torch.isfinite(drop), drop, torch.full_like(drop, float("inf")))
            prev = conf_g
            cand = torch.where(committed, NEG_INF, conf_g)
            hist = latest[0, :end]
            hist = hist[hist > NEG_INF]
            tau = hist.mean() if hist.numel() > 0 else 1
            pick = torch.where(cand[0] > tau)[0]
            if pick.numel() < n:
                pick = torch.topk(cand[0], k=n).indices
            fix = max(n, pick.numel())
            sel = torch.zeros_like(committed)
            sel[0, pick] = True
            committed |= sel
            x[sel] = guess[sel]
            latest = torch.where(sel, conf, latest)
            if bool(committed[gen_pos].all()):
                return x, forwards, remasked
            if bool((x[:, :end] != mask_id).all()):
                break
            key = torch.where(gen_pos, drop, torch.full_like(drop, float("inf")))
            key[:, end:] = float("inf")
            key[x == mask_id] = float("inf")
            key[prompt_pos] = float("inf")
            r = min(max(n // 2, (fix + mu - 1) // mu), fix - 1)
            out = torch.topk(key[0], k=r, largest=False).indices
            x[0, out] = mask_id
            committed[0, out] = False
            remasked += r
    return x, forwards, remasked


@torch.no_grad()
def saber_dream(model, prompt, gen_length=32, mask_id=151666, n=2, mu=8):
    P = prompt.shape[1]
    x = torch.nn.functional.pad(prompt, (0, gen_length), value=mask_id)
    is_prompt = torch.zeros_like(x, dtype=torch.bool)
    is_prompt[:, :P] = True
    first = torch.full(x.shape, float("nan"), dtype=torch.float32)
    forwards = remasked = 0
    while bool((x == mask_id).any()):
        masked = x == mask_id
        logits = shift_logits(model(x)[0])
        forwards += 1
        probs32 = torch.softmax(logits[masked].float(), -1)          # sample_tokens at T = 0
        c, tok = probs32.max(-1)
        c = c.to(logits.dtype)
        conf = torch.full(x.shape, NEG_INF, dtype=c.dtype)
        guess = torch.full(x.shape, mask_id, dtype=torch.long)
        conf[masked], guess[masked] = c, tok
        pos = torch.where(masked[0] & ~is_prompt[0])[0]
        rec = first[0][~torch.isnan(first[0])]
        tau = float(rec.mean().item()) if rec.numel() > 0 else 1.0
        cb = conf[0, pos]
        chosen = pos[cb > tau]
        if chosen.numel() < n:
            chosen = pos[torch.topk(cb, k=min(n, pos.numel())).indices]
        new = torch.zeros_like(masked)
        new[0, chosen] = True
        new &= masked
        x[new] = guess[new]
        first[torch.isnan(first) & new] = conf[torch.isnan(first) & new].float()
        if not bool((x == mask_id).any()):
            break
        p_now = torch.softmax(logits, -1).gather(-1, x[..., None]).squeeze(-1)
        done = torch.where((x[0] != mask_id) & ~is_prompt[0])[0]
        if done.numel() <= 1:
            continue
        k_new = int(new.sum())
        r = max(1, min(math.ceil(k_new / mu), k_new - 1))
        out = done[torch.topk(-p_now[0, done], k=r).indices]
        x[0, out] = mask_id
        remasked += r
    return x, forwards, remasked

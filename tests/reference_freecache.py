"""Independent reference oracle for FlashDLM: FreeCache (Dream and LLaDA) and Guided Diffusion.

Written only from the published code (ZhanqiuHu/flash-dlm-experimental @ 387beab) and the reference notes,
never from the runtime packages (dllm, decoding, cache). Algorithm note: docs/notes/freecache.md. Mirrors:

- `freecache_dream_generate`: `DreamGenerationMixin._sample_block_diffusion` of
  `src/model/dream_flash/generation_utils.py` (the only block path `_sample` calls) with the `BlockCache`
  semantics of `src/model/dream_flash/block_utils.py` / `modeling_dream.py::DreamSdpaAttention.forward`.
- `freecache_llada_generate`: `src/model/llada_v2/generate.py::generate_block_cached` with the
  `BlockCacheV2` semantics of `src/model/llada_v2/{block_utils,modeling_llada}.py`.
- `guided_generate`: `guided_diffusion/diff_spec_utils_assisted.py::assisted_block_diffusion_generate`
  (mode="assisted") and `guided_diffusion/diff_spec_utils_shifted.py::speculative_block_diffusion_generate`
  (mode="speculative"), default (prompt-only) cache path, deterministic verification strategies.

FreeCache in one sentence: one full forward at the very first step; afterwards every forward feeds
x[:, c:] (c = current block start, minus 1 for Dream's logit shift) and attends to frozen K/V of [0, c);
on the last step of each block the K/V computed by that step's forward for [c, block_end (-1)) are frozen too.
The authors' BlockCache holds PRE-RoPE K (RoPE re-applied with the stored per-position cos/sin), which is
what `RefDream` / `RefLLaDA` prefix mode (`past_key_values`, positions continuing) computes.

Deliberate, documented deviations from the authors' code (all in the note):
- steps per block == 1: the authors' first forward freezes [0, P-1) (Dream) / [0, P) (LLaDA) even though
  it is also the block's last step, so block 1 is then fed at the wrong positions; here the last-step save
  wins (clean = block_end - 1 / block_end). Identical whenever steps per block >= 2.
- batch > 1: the authors' Dream block sampler flattens the batch into one top-k (rows coupled) and
  their LLaDA / guided code is batch 1 only; here each row runs independently (the B = 1 result per row).
- guided: the AR logits are computed by one causal forward over prefix + all drafts (the authors feed the
  same tokens in KV-cached chunks of `verify_batch_size`; rows are identical for a causal AR model). The
  chunking is kept for the NFE count and the log.

Every generate returns (x, nfe, log). `log` has one dict per model forward (see each docstring).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from reference_dream import sample_tokens, shift_logits
from reference_llada import RefLLaDA, add_gumbel_noise, get_num_transfer_tokens

NEG_INF = float("-inf")


# --------------------------------------------------------------------------- helpers

def _past(kv, c):
    """The frozen K/V of positions [0, c) (pre-RoPE), per layer."""
    return [(k[:, :, :c], v[:, :, :c]) for k, v in kv]


def _runs(src):
    """[(lo, hi, step)] runs of equal values in a 1-D list: which step computed the K/V of each position."""
    out = []
    for pos, s in enumerate(src):
        if out and out[-1][2] == s and out[-1][1] == pos:
            out[-1][1] = pos + 1
        else:
            out.append([pos, pos + 1, s])
    return [tuple(r) for r in out]


def _rows(fn, model, input_ids, *args, **kw):
    """Run a batch-1 generator row by row (rows are independent; see the module docstring)."""
    if input_ids.shape[0] == 1:
        return fn(model, input_ids, *args, **kw)
    xs, nfes, logs = [], [], []
    for r in range(input_ids.shape[0]):
        x, nfe, log = fn(model, input_ids[r:r + 1], *args, **kw)
        xs.append(x)
        nfes.append(nfe)
        logs.append(log)
    return torch.cat(xs, dim=0), nfes, logs


# --------------------------------------------------------------------------- FreeCache, Dream

@torch.no_grad()
def freecache_dream_generate(model, input_ids, max_new_tokens, mask_token_id, steps=512, block_size=None,
                             eps=1e-3, alg='maskgit_plus', alg_temp=None, temperature=0., top_p=None, top_k=None,
                             use_cache=True, early_stop=False, early_stop_consecutive=5, eos_token_id=None):
    """Mirror of dream_flash `_sample_block_diffusion` (use_block_diffusion=True, use_full_query_attn=False).

    Canvas x = prompt + max_new_tokens MASKs, L = P + max_new_tokens; blocks [P + b*bs, P + (b+1)*bs);
    steps // num_blocks steps per block; global step i = b * spb + j; timesteps = linspace(1, eps, steps+1).
    Forward at step i: i == 0 (or use_cache=False): full x; else x[:, c:] against frozen K/V [0, c). The
    frozen prefix c is P - 1 after step 0 and block_end - 1 after the last step of each block (that step's
    own forward supplies the newly frozen K/V, computed BEFORE its commit).
    Logits are Dream-shifted within the fed window; the block is read at rows [block_start - c, block_end - c).
    Commit: sample_tokens over the block's MASKs (alg maskgit_plus / topk_margin / entropy), quota
    int((#MASK in block + (num_blocks - b - 1) * bs) * (1 - s/t)) (int64 * float32) on non-last steps, all
    block MASKs on the last; top-k (alg_temp None/0) or multinomial over softmax(conf / alg_temp).

    log: per forward {step, block, fed: (lo, L), cache_read: (0, lo), kv_source: [(lo, hi, step)] for the
    read positions, clean_after: frozen prefix length after the forward, committed: [positions]}.
    nfe = number of forwards (= steps unless early_stop fires).
    """
    return _rows(_freecache_dream_row, model, input_ids, max_new_tokens, mask_token_id, steps=steps,
                 block_size=block_size, eps=eps, alg=alg, alg_temp=alg_temp, temperature=temperature, top_p=top_p,
                 top_k=top_k, use_cache=use_cache, early_stop=early_stop,
                 early_stop_consecutive=early_stop_consecutive, eos_token_id=eos_token_id)


def _dream_early_stop(x, last_pos, last_tok, eos, mask_id, k):
    """dream_flash `_check_early_stop` (batch 1): the furthest committed token is EOS, no MASK up to it, and
    the `k` tokens ending there are all EOS."""
    if last_tok != eos or last_pos < 0:
        return False
    if (x[0, :last_pos + 1] == mask_id).any() or last_pos + 1 < k:
        return False
    return bool((x[0, last_pos - k + 1: last_pos + 1] == eos).all())


def _freecache_dream_row(model, input_ids, max_new_tokens, mask_token_id, steps, block_size, eps, alg, alg_temp,
                         temperature, top_p, top_k, use_cache, early_stop, early_stop_consecutive, eos_token_id):
    if alg not in ('maskgit_plus', 'topk_margin', 'entropy'):
        # 'origin': the authors' block loop reaches topk(confidence) with `confidence` unbound.
        # 'position_weighted': broadcasts [n] * [n, 2] (nonzero of a 2-D mask), fails for n != 2.
        raise NotImplementedError(f"alg={alg!r} does not run in the authors' block sampler")
    assert block_size is not None and max_new_tokens % block_size == 0, "max_new_tokens % block_size"
    num_blocks = max_new_tokens // block_size
    assert steps % num_blocks == 0, "steps must be divisible by num_blocks"
    spb = steps // num_blocks
    P = input_ids.shape[1]
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_token_id)
    L = x.shape[1]
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    kv, clean, src = None, 0, [None] * L
    nfe, log = 0, []
    last_pos, last_tok = -1, None
    for b in range(num_blocks):
        bs_, be = P + b * block_size, P + (b + 1) * block_size
        for j in range(spb):
            i = b * spb + j
            last_step = j == spb - 1
            if i == 0 or not use_cache:
                lo = 0
                logits, kv = model(x)
            else:
                lo = clean                                  # == bs_ - 1
                logits, kv = model(x[:, lo:], past_key_values=_past(kv, lo))
            nfe += 1
            entry = {"step": i, "block": b, "fed": (lo, L), "cache_read": (0, lo), "kv_source": _runs(src[:lo])}
            for p in range(lo, L):
                src[p] = i
            if use_cache:
                if last_step:
                    clean = be - 1
                elif i == 0:
                    clean = bs_ - 1
            entry["clean_after"] = clean
            logits = shift_logits(logits)[:, bs_ - lo: be - lo]
            blk = x[:, bs_:be]
            mask_index = blk == mask_token_id
            t, s = timesteps[i], timesteps[i + 1]
            confidence, x0 = sample_tokens(logits[mask_index], temperature, top_p=top_p, top_k=top_k,
                                           margin_confidence=alg == 'topk_margin', neg_entropy=alg == 'entropy')
            num_mask = mask_index.sum()                                      # int64
            total = num_mask + (num_blocks - b - 1) * block_size
            k = int(total * (1 - s / t)) if not last_step else int(num_mask)
            committed = []
            if k > 0:
                if alg_temp is None or alg_temp == 0:
                    idx = torch.topk(confidence, k).indices
                else:
                    idx = torch.multinomial(F.softmax(confidence / alg_temp, dim=-1), num_samples=k)
                x0_ = torch.full_like(x0, mask_token_id)
                x0_[idx] = x0[idx]
                blk[mask_index] = x0_
                pos = mask_index[0].nonzero().flatten()[idx]
                committed = sorted((pos + bs_).tolist())
                last_pos = max(last_pos, committed[-1])
                last_tok = int(x[0, last_pos])
            entry["committed"] = committed
            log.append(entry)
            if early_stop and _dream_early_stop(x, last_pos, last_tok, eos_token_id, mask_token_id,
                                                early_stop_consecutive):
                x[x == mask_token_id] = eos_token_id
                return x, nfe, log
    return x, nfe, log


# --------------------------------------------------------------------------- FreeCache, LLaDA

@torch.no_grad()
def freecache_llada_generate(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.,
                             remasking='low_confidence', mask_id=126336, use_cache=True, early_stop=False,
                             eos_token_id=None):
    """Mirror of llada_v2 `generate_block_cached` (cfg_scale 0; use_full_query_attn False).

    LLaDA's official block schedule (get_num_transfer_tokens per block); forwards: the very first step feeds
    all of x; later steps feed x[:, c:] against frozen K/V [0, c): c = P after step 0, block_end after the
    last step of each block (that forward's K/V, computed before its commit). No logit shift. Confidence is
    softmax(add_gumbel_noise(logits).double()) at the argmax (not softmax(logits) as in official LLaDA; the
    same at temperature 0). Gumbel noise is drawn over the fed slice only.

    log: as `freecache_dream_generate` (block quota instead of the Dream quota).
    """
    return _rows(_freecache_llada_row, model, prompt, steps=steps, gen_length=gen_length,
                 block_length=block_length, temperature=temperature, remasking=remasking, mask_id=mask_id,
                 use_cache=use_cache, early_stop=early_stop, eos_token_id=eos_token_id)


def _freecache_llada_row(model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
                         use_cache, early_stop, eos_token_id):
    P = prompt.shape[1]
    x = torch.full((1, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    L = x.shape[1]
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    spb = steps // num_blocks
    kv, clean, src = None, 0, [None] * L
    nfe, log = 0, []
    for b in range(num_blocks):
        bs_, be = P + b * block_length, P + (b + 1) * block_length
        quota = get_num_transfer_tokens(x[:, bs_:be] == mask_id, spb)
        for i in range(spb):
            g = b * spb + i
            mask_index = x == mask_id
            if early_stop and not mask_index.any():
                return x, nfe, log
            if g == 0 or not use_cache:
                lo = 0
                logits, kv = model(x)
            else:
                lo = clean                                  # == bs_
                logits, kv = model(x[:, lo:], past_key_values=_past(kv, lo))
            nfe += 1
            entry = {"step": g, "block": b, "fed": (lo, L), "cache_read": (0, lo), "kv_source": _runs(src[:lo])}
            for p in range(lo, L):
                src[p] = g
            if use_cache:
                if i == spb - 1:
                    clean = be
                elif g == 0:
                    clean = bs_
            entry["clean_after"] = clean
            lwn = add_gumbel_noise(logits, temperature)
            x0_slice = torch.argmax(lwn, dim=-1)
            if remasking == 'low_confidence':
                p_ = torch.softmax(lwn.to(torch.float64), dim=-1)
                x0_p_slice = torch.gather(p_, -1, x0_slice[..., None]).squeeze(-1)
            elif remasking == 'random':
                x0_p_slice = torch.rand((x0_slice.shape[0], x0_slice.shape[1]), device=x.device)
            else:
                raise NotImplementedError(remasking)
            x0 = torch.cat([x[:, :lo], x0_slice], dim=1)
            x0_p = torch.cat([torch.full((1, lo), NEG_INF, dtype=x0_p_slice.dtype, device=x.device), x0_p_slice], 1)
            x0_p[:, be:] = NEG_INF
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, NEG_INF)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            k = int(quota[0, i])
            if k > 0:
                transfer[0, torch.topk(confidence[0], k=k).indices] = True
            entry["committed"] = (transfer[0] & mask_index[0]).nonzero().flatten().tolist()
            x[transfer] = x0[transfer]
            log.append(entry)
            if early_stop:
                eos = (x == eos_token_id)
                if eos.any():
                    x[:, int(eos.nonzero()[:, 1].min()) + 1:] = eos_token_id
    return x, nfe, log


# --------------------------------------------------------------------------- Guided Diffusion

def _ar_logits(ar_model, ids):
    """Any callable ids [1, N] -> logits [1, N, V], or an HF model (output.logits) / tuple (first item)."""
    out = ar_model(ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _verify(probs, drafts, strategy, acceptance_top_k, top_p):
    """One chunk of `batch_verify`: (accept_len, AR choice at the first rejection or None). probs [m, V]."""
    for r in range(drafts.shape[0]):
        d = int(drafts[r])
        if strategy == 'deterministic':                  # _verify_deterministic
            top = int(probs[r].argmax())
            ok = top == d
        elif strategy == 'topk':                         # _verify_topk: draft in AR top-k
            ids = probs[r].topk(acceptance_top_k).indices
            ok = bool((ids == d).any())
            alt = probs[r].clone()
            alt[d] = NEG_INF
            top = int(alt.argmax())
        elif strategy == 'topk_relative':                # _verify_topk_relative (relative_threshold = top_p)
            vals, ids = probs[r].topk(acceptance_top_k)
            ok = bool((ids == d).any()) and float(probs[r, d]) >= top_p * float(vals[0])
            top = int(ids[0])
        else:
            raise NotImplementedError(f"sampling_strategy={strategy!r} (stochastic strategies not mirrored)")
        if not ok:
            return r, top
    return drafts.shape[0], None


@torch.no_grad()
def guided_generate(model, ar_model, input_ids, max_new_tokens, mask_token_id, eos_token_id, mode='assisted',
                    verify_batch_size=32, sampling_strategy='deterministic', acceptance_top_k=5, top_p=0.95,
                    eos_token_ids=None, stop_on_dream_eos=False, use_cache=True, sliding_window_size=None):
    """FlashDLM Guided Diffusion (block-cached generate of the authors' guided_diffusion/), batch 1 per row.

    Each step: one diffusion forward (step 0: full canvas; later, with use_cache, x[:, P:] against the prompt
    K/V frozen at step 0 — save_cache=False, so nothing else is ever frozen); drafts = argmax of the (Dream:
    shifted) logits at EVERY remaining MASK (no block restriction; temperature unused); the AR model scores
    prefix + drafts causally and the drafts are verified left to right in chunks of `verify_batch_size`
    (one AR forward per chunk, continuing only while a whole chunk is accepted). Commit, with a = number of
    leading drafts accepted:
    - mode 'assisted' (diff_spec_utils_assisted.py): the first max(1, a) DRAFT tokens (the AR only gates);
      stop (fill every MASK with eos_token_id) once a committed draft == eos_token_id.
    - mode 'speculative' (diff_spec_utils_shifted.py): the a accepted drafts plus the AR's choice at the
      first rejection (none if all accepted); stop once a committed token is in `eos_token_ids` (the authors
      hard-code Qwen's <|endoftext|>, <|im_end|>), fill MASKs with eos_token_id; stop_on_dream_eos: also stop
      if the FIRST draft was rejected and was eos_token_id.
    Always >= 1 token per step. sliding_window_size (derived, coherent version of the authors' assisted
    window; see the note): after step 0 feed x[:, lo:hi), lo = max(0, last - W), hi = min(L, last + W),
    last = last committed position; keys [0, hi) (K/V of [0, lo) from the last forward that computed them);
    only MASKs in [lo, hi) are drafted. A RefLLaDA model runs the same loop without the logit shift (derived).

    Returns (x, nfe, log): nfe = {'dream': diffusion forwards, 'ar': AR forwards incl. the step-0 prefill}.
    log: per step {step, dream_fed: (lo, hi), cache_read: (0, c), drafted: (first_mask, hi), ar_prefill:
    (lo, hi) or None, ar_chunks: [(lo, hi) AR input positions per chunk forward], accepted: a, committed:
    [positions], source: 'draft' / 'draft+ar', stopped: bool}.
    """
    kw = {"mode": mode, "verify_batch_size": verify_batch_size, "sampling_strategy": sampling_strategy,
          "acceptance_top_k": acceptance_top_k, "top_p": top_p, "eos_token_ids": eos_token_ids,
          "stop_on_dream_eos": stop_on_dream_eos, "use_cache": use_cache, "sliding_window_size": sliding_window_size}
    if input_ids.shape[0] == 1:
        return _guided_row(model, ar_model, input_ids, max_new_tokens, mask_token_id, eos_token_id, **kw)
    outs = [_guided_row(model, ar_model, input_ids[r:r + 1], max_new_tokens, mask_token_id, eos_token_id, **kw)
            for r in range(input_ids.shape[0])]
    return torch.cat([o[0] for o in outs]), [o[1] for o in outs], [o[2] for o in outs]


def _guided_row(model, ar_model, input_ids, max_new_tokens, mask_token_id, eos_token_id, mode, verify_batch_size,
                sampling_strategy, acceptance_top_k, top_p, eos_token_ids, stop_on_dream_eos, use_cache,
                sliding_window_size):
    if mode not in ('assisted', 'speculative'):
        raise ValueError(mode)
    shift = not isinstance(model, RefLLaDA)              # Dream (and anything Dream-like) reads logits[p - 1]
    eos_set = {eos_token_id} if eos_token_ids is None else set(eos_token_ids)
    P = input_ids.shape[1]
    seq = F.pad(input_ids, (0, max_new_tokens), value=mask_token_id)
    L = seq.shape[1]
    bs = verify_batch_size
    kv, last = None, P - 1
    nfe = {"dream": 0, "ar": 0}
    ar_cached = 0                                        # AR KV-cache length (positions [0, ar_cached))
    log, step = [], 0
    while (seq == mask_token_id).any():
        # ---- diffusion draft
        if step == 0 or not use_cache:
            lo, hi, c = 0, L, 0
            logits, kv = model(seq)
        elif sliding_window_size is not None:
            lo, hi = max(0, last - sliding_window_size), min(L, last + sliding_window_size)
            c = lo
            logits, present = model(seq[:, lo:hi], past_key_values=_past(kv, lo))
            kv = [(torch.cat([pk, k[:, :, hi:]], 2), torch.cat([pv, v[:, :, hi:]], 2))
                  for (pk, pv), (k, v) in zip(present, kv)]
        else:
            lo, hi, c = P, L, P
            logits, _ = model(seq[:, P:], past_key_values=_past(kv, P))    # kv stays the step-0 K/V
        nfe['dream'] += 1
        if shift:
            logits = shift_logits(logits)
        window = seq[0, lo:hi]
        mpos = (window == mask_token_id).nonzero().flatten()
        fm = int(mpos[0]) + lo
        drafts = logits[0, mpos].argmax(-1)
        n = drafts.shape[0]
        assert int(mpos[-1]) - int(mpos[0]) + 1 == n, "MASKs are a contiguous run"
        entry = {"step": step, "dream_fed": (lo, hi), "cache_read": (0, c), "drafted": (fm, fm + n)}
        # ---- AR verification (causal: prefix + drafts; row fm - 1 + j scores draft j)
        entry["ar_prefill"] = None
        if ar_cached < fm - 1:                            # _ensure_prefix(prefix[:-1])
            entry["ar_prefill"] = (ar_cached, fm - 1)
            nfe['ar'] += 1
        ar_in = torch.cat([seq[0, :fm], drafts])[None]
        probs = torch.softmax(_ar_logits(ar_model, ar_in)[0, fm - 1: fm - 1 + n].float(), dim=-1)
        accepted, choice, chunks, i = 0, None, [], 0
        while i < n:
            chunks.append((fm - 1 + i, fm + min(i + bs - 1, n)))
            nfe['ar'] += 1
            m = min(bs, n - i)
            a, choice = _verify(probs[i:i + m], drafts[i:i + m], sampling_strategy, acceptance_top_k, top_p)
            accepted += a
            if a < m:
                break
            i += bs
        entry["ar_chunks"], entry["accepted"] = chunks, accepted
        # ---- commit
        stopped, committed = False, []
        if mode == 'assisted':
            for off in range(max(1, accepted)):
                p, d = fm + off, int(drafts[off])
                seq[0, p] = d
                committed.append(p)
                last = p
                if d == eos_token_id:
                    seq[seq == mask_token_id] = eos_token_id
                    stopped = True
                    break
            ar_cached = fm - 1 + max(1, accepted)
            entry["source"] = "draft"
        else:
            chosen = drafts[:accepted].tolist() + ([] if choice is None else [choice])
            for off, ch in enumerate(chosen):
                p = fm + off
                seq[0, p] = ch
                committed.append(p)
                last = p
                if ch in eos_set:
                    seq[seq == mask_token_id] = eos_token_id
                    stopped = True
                    break
                if ch != int(drafts[off]):
                    if off == 0 and stop_on_dream_eos and int(drafts[0]) == eos_token_id:
                        seq[seq == mask_token_id] = eos_token_id
                        stopped = True
                    break
            ar_cached = fm + accepted
            entry["source"] = "draft+ar"
        entry["committed"], entry["stopped"] = committed, stopped
        log.append(entry)
        step += 1
        if stopped:
            break
    return seq, nfe, log

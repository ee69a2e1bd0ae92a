"""Independent reference oracle for dKV-Cache (horseee/dKV-Cache @ 49a76fc, NeurIPS 2025).

Re-implemented from the authors' published algorithm, never from the runtime packages (dllm, decoding, cache),
so the runtime's dKV policy can be checked against it token for token at temperature 0 and schedule for
schedule. The rule for each variant, with file:line references, is in docs/notes/dkv.md. In short:

- `dkv_llada_decode_generate`: `generation_utils/llada_dkv_cache_decode.py::generate` with
  `models/modeling_llada_dkv_cache_decode.py` (dKV-Cache-Decode, LLaDA). Per block, block-local step i:
  i == 0, i == 1 or i % cache_reloading_step == 0 -> full forward; otherwise feed only the positions that
  were still MASK after step i-2 and read the K/V of all others from the cache. After every forward with
  i >= 1 the cache holds the K/V *used in that forward* at the positions decoded up to step i-1 (so a token
  decoded at step t is fed once more at step t+1, its K/V from that forward enter the cache, and it is first
  reused at t+2: "delayed caching"). The cache is dropped at every block start.
- `dkv_llada_greedy_generate`: `generation_utils/llada_dkv_cache_greedy.py::generate` with
  `models/modeling_llada_dkv_cache_greedy.py` (dKV-Cache-Greedy, LLaDA only, remasking='random' only). The
  unmasking order of a block is drawn once at the block start; i % cache_reloading_step == 0 -> full forward
  whose K/V of every position become the cache; otherwise feed only {decoded at i-1} + {to decode at i} +
  `window_size` still-masked neighbours per to-decode position, write their fresh K/V into the cache, and use
  stale cached K/V for every other position (masked ones included).
- `dkv_dream_generate`: `generation_utils/dream_generation_utils.py::_sample` with `models/modeling_dream.py`
  and `generation_utils/cache_utils.py` (cache_type "decoded" = dKV-Cache-Decode, "prefill" =
  dKV-Cache-Prefill), and `generation_utils/dream_generation_utils_pd.py` with `models/modeling_dream_pd.py`
  (cache_type "pd" = dKV-Cache-PD). Dream's logits are shifted (position q reads the output at q-1), so the
  cacheable set is shifted too: with shift_type "un", position p is cached once token p+1 is decoded.

Model side (`DkvLLaDA`, `DkvDream`, subclasses of the existing oracles): `forward_fed(x, fed, kv)` runs every
layer on the positions `fed` only, with keys/values of the other positions taken from `kv` (full-length,
pre-RoPE, as the authors cache them), RoPE at absolute positions, full bidirectional attention over all L
keys. It returns the logits of the fed positions (ascending position order, as the authors' `x[~prv]`) and,
per layer, the full-length K/V that the forward attended over (fresh at fed positions, cached elsewhere):
every variant's cache write is "keep those K/V at the positions of the store set".

Every generator returns (x, nfe, log). nfe = number of model forwards (one per step in every variant).
log has one dict per forward: step (global), block, i (block-local step; = step for Dream), kind ('full':
every position fed, nothing read from the cache; 'cached': only `fed` recomputed, the rest read from the
cache), refresh (Dream decoded/pd: this step cleared the decode cache), fed / cache_in / cache_out /
committed (one sorted list of absolute positions per batch row: recomputed positions, positions whose K/V
were read from the cache, positions held in the cache after the step, positions unmasked by the step).
Every layer recomputes exactly the `fed` positions (dKV-Cache is not per-layer).
Random draws (torch.rand for remasking='random' / Gumbel noise / Dream's 'origin') are made with the same
shapes as in the authors' code, so seeded runs match them at temperature > 0 as well.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from reference_dream import RefDream, _commit_topk, sample_tokens, shift_logits
from reference_llada import (
    RefLLaDA,
    _topk_commit,
    add_gumbel_noise,
    get_num_transfer_tokens,
)

NEG_INF = float("-inf")


# --------------------------------------------------------------------------- helpers

def _rows(mask: torch.Tensor) -> list[list[int]]:
    """One sorted list of the True positions per batch row."""
    return [row.nonzero().flatten().tolist() for row in mask]


def _index(fed: torch.Tensor) -> torch.Tensor:
    """[B, n] ascending positions of `fed` (the authors' `nonzero(...)[1].view(B, -1)`: equal counts per row)."""
    counts = fed.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every batch row must feed the same number of positions, got {counts.tolist()}")
    return fed.nonzero(as_tuple=True)[1].view(fed.shape[0], -1)


def _kv_in(kv, fed, cached, exact=True):
    """The keys of the non-fed positions must all be in the cache. Decode/Prefill/PD: the cache holds exactly
    the non-fed positions (the authors concatenate fed + cache = L keys); Greedy (exact=False): it holds every
    position and the fed ones are overwritten."""
    if fed.all():
        return None
    ok = kv is not None and cached is not None and (torch.equal(cached, ~fed) if exact else bool((cached | fed).all()))
    if not ok:
        raise AssertionError("the cache must hold the positions that are not fed")
    return kv


def _entry(step, block, i, kind, fed, cache_in, cache_out, committed, refresh=False):
    return {"step": step, "block": block, "i": i, "kind": kind, "refresh": refresh, "fed": _rows(fed),
                "cache_in": _rows(cache_in) if cache_in is not None else [[] for _ in range(fed.shape[0])],
                "cache_out": _rows(cache_out) if cache_out is not None else [[] for _ in range(fed.shape[0])],
                "committed": _rows(committed)}


# --------------------------------------------------------------------------- models

class DkvLLaDA(RefLLaDA):
    """RefLLaDA plus a forward over an arbitrary subset of positions against cached pre-RoPE K/V."""

    def rope_at(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Same maths as RefLLaDA.rope (fp32 rotate-half), with per-row positions [B, T].
        d = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=t.device) / d))
        freqs = positions.float()[..., None] * inv_freq                  # [B, T, d/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]              # [B, 1, T, d]
        tf = t.float()
        rotated = torch.cat([-tf[..., d // 2:], tf[..., : d // 2]], dim=-1)
        return (tf * angles.cos() + rotated * angles.sin()).to(t.dtype)

    def forward_fed(self, x: torch.Tensor, fed: torch.Tensor, kv=None):
        """x [B, L] canvas; fed [B, L] bool; kv None (then fed must be all True) or per layer (K, V)
        [B, n_kv, L, hd] pre-RoPE, read at the non-fed positions. Returns (logits [B, n, V] of the fed positions
        in ascending order, used) with used[layer] = (K, V) [B, n_kv, L, hd]: fresh at fed, kv elsewhere."""
        B, L = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        idx = _index(fed)
        n = idx.shape[1]
        if kv is None and n != L:
            raise ValueError("a partial forward needs cached K/V")
        h_in = self.w["wte.weight"][x.gather(1, idx)]
        key_pos = torch.arange(L, device=x.device)[None].expand(B, L)
        used = []
        hx = h_in
        for layer in range(self.n_layers):
            p = f"blocks.{layer}."
            h = self.rms_norm(hx, self.w[p + "attn_norm.weight"])
            q = (h @ self.w[p + "q_proj.weight"].T).view(B, n, H, hd).transpose(1, 2)
            k = (h @ self.w[p + "k_proj.weight"].T).view(B, n, KV, hd).transpose(1, 2)
            v = (h @ self.w[p + "v_proj.weight"].T).view(B, n, KV, hd).transpose(1, 2)
            if kv is None:
                K, V = k, v
            else:
                gather = idx[:, None, :, None].expand(B, KV, n, hd)
                K = kv[layer][0].clone().scatter_(2, gather, k)
                V = kv[layer][1].clone().scatter_(2, gather, v)
            used.append((K, V))                                          # cached BEFORE RoPE
            qr = self.rope_at(q, idx)
            kr = self.rope_at(K, key_pos)
            kr, Vr = kr.repeat_interleave(H // KV, dim=1), V.repeat_interleave(H // KV, dim=1)
            scores = (qr.float() @ kr.float().transpose(-1, -2)) / math.sqrt(hd)   # no mask: all L keys
            att = (torch.softmax(scores, dim=-1) @ Vr.float()).to(hx.dtype)
            hx = hx + att.transpose(1, 2).reshape(B, n, H * hd) @ self.w[p + "attn_out.weight"].T
            h = self.rms_norm(hx, self.w[p + "ff_norm.weight"])
            gate = F.silu(h @ self.w[p + "ff_proj.weight"].T)
            hx = hx + (gate * (h @ self.w[p + "up_proj.weight"].T)) @ self.w[p + "ff_out.weight"].T
        logits = self.rms_norm(hx, self.w["ln_f.weight"]) @ self.head.T
        return logits, used


class DkvDream(RefDream):
    """RefDream plus a forward over an arbitrary subset of positions against cached pre-RoPE K/V (with biases)."""

    def forward_fed(self, x: torch.Tensor, fed: torch.Tensor, kv=None, position_ids=None, keep=None):
        """As DkvLLaDA.forward_fed; position_ids [B, L] (`tok_idx`, default arange), keep [B, L] bool key/query
        padding mask (None = "full"): query row q attends key k iff keep[q] and keep[k] (a fully masked row,
        a pad query, gets a zero attention output, as in RefDream). Logits are NOT shifted."""
        B, L = x.shape
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        idx = _index(fed)
        n = idx.shape[1]
        if kv is None and n != L:
            raise ValueError("a partial forward needs cached K/V")
        pos = position_ids if position_ids is not None else torch.arange(L, device=x.device)[None].expand(B, L)
        hx = self.w["embed_tokens.weight"][x.gather(1, idx)]
        q_cos, q_sin = self.cos_sin(pos.gather(1, idx), hx.dtype)
        k_cos, k_sin = self.cos_sin(pos, hx.dtype)
        allowed = None
        if keep is not None:
            allowed = (keep.gather(1, idx)[:, :, None] & keep[:, None, :])[:, None]   # [B, 1, n, L]
        used = []
        for layer in range(self.n_layers):
            p = f"layers.{layer}.self_attn."
            h = self.rms_norm(hx, self.w[f"layers.{layer}.input_layernorm.weight"])
            q = (h @ self.w[p + "q_proj.weight"].T + self.w[p + "q_proj.bias"]).view(B, n, H, hd).transpose(1, 2)
            k = (h @ self.w[p + "k_proj.weight"].T + self.w[p + "k_proj.bias"]).view(B, n, KV, hd).transpose(1, 2)
            v = (h @ self.w[p + "v_proj.weight"].T + self.w[p + "v_proj.bias"]).view(B, n, KV, hd).transpose(1, 2)
            if kv is None:
                K, V = k, v
            else:
                gather = idx[:, None, :, None].expand(B, KV, n, hd)
                K = kv[layer][0].clone().scatter_(2, gather, k)
                V = kv[layer][1].clone().scatter_(2, gather, v)
            used.append((K, V))                                          # cached BEFORE RoPE
            qr = self.rotate(q, q_cos, q_sin)
            kr = self.rotate(K, k_cos, k_sin).repeat_interleave(H // KV, dim=1)
            Vr = V.repeat_interleave(H // KV, dim=1)
            scores = (qr.float() @ kr.float().transpose(-1, -2)) / math.sqrt(hd)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, NEG_INF)
            att = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            att = (att @ Vr.float()).to(hx.dtype).transpose(1, 2).reshape(B, n, H * hd)
            hx = hx + att @ self.w[p + "o_proj.weight"].T
            h = self.rms_norm(hx, self.w[f"layers.{layer}.post_attention_layernorm.weight"])
            m = f"layers.{layer}.mlp."
            gate = F.silu(h @ self.w[m + "gate_proj.weight"].T)
            hx = hx + (gate * (h @ self.w[m + "up_proj.weight"].T)) @ self.w[m + "down_proj.weight"].T
        logits = self.rms_norm(hx, self.w["norm.weight"]) @ self.head.T
        return logits, used


# --------------------------------------------------------------------------- LLaDA: dKV-Cache-Decode

def _setup(prompt, steps, gen_length, block_length, mask_id):
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    return x, B, P, num_blocks, steps // num_blocks


@torch.no_grad()
def dkv_llada_decode_generate(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.,
                              cfg_scale=0., remasking='low_confidence', mask_id=126336, enable_cache=False,
                              cache_reloading_step=1):
    """Mirror of llada_dkv_cache_decode.py::generate (defaults as there: cache off; README: enable_cache=True,
    cache_reloading_step=8). prompt [B, P], equal lengths, no attention mask (the authors pass none).
    Returns (x, nfe, log)."""
    if cfg_scale > 0.:
        raise NotImplementedError('cfg_scale > 0 is not supported yet for cache.')
    x, B, P, num_blocks, spb = _setup(prompt, steps, gen_length, block_length, mask_id)
    L = x.shape[1]
    log, nfe = [], 0
    for b in range(num_blocks):
        e = P + (b + 1) * block_length
        quota = get_num_transfer_tokens(x[:, e - block_length: e] == mask_id, spb)
        kv, cached = None, None            # dropped at every block start (past_qkv = None)
        prv = cur = None                   # non-MASK sets after steps i-2 and i-1 (None before the block)
        for i in range(spb):
            mask_index = x == mask_id
            if enable_cache and i % cache_reloading_step != 0 and i > 1:
                fed = ~prv                 # still MASK after step i-2 (includes the tokens decoded at i-1)
            else:
                fed = torch.ones_like(mask_index)
            kv_read = _kv_in(kv, fed, cached)
            logits, used = model.forward_fed(x, fed, kv_read)
            nfe += 1
            cache_in = None if kv_read is None else cached
            if enable_cache and i > 0:     # preprocess_cache=True: keep the K/V used now at cur (= A_{i-1})
                kv, cached = used, cur.clone()
            # Sampling on the compact logits of the fed positions, then refilled (-inf / mask_id elsewhere).
            x0 = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)
            if remasking == 'low_confidence':
                p = torch.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            elif remasking == 'random':
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)
            idx = _index(fed)
            x0_p = torch.full((B, L), NEG_INF, dtype=x0_p.dtype, device=x.device).scatter_(1, idx, x0_p)
            x0 = torch.full((B, L), mask_id, dtype=x0.dtype, device=x.device).scatter_(1, idx, x0)
            x0_p[:, e:] = NEG_INF
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, NEG_INF)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(B):
                _topk_commit(transfer, row, confidence[row], int(quota[row, i]))
            x[transfer] = x0[transfer]
            prv, cur = cur, x != mask_id
            log.append(_entry(len(log), b, i, 'full' if bool(fed.all()) else 'cached', fed, cache_in,
                              cached if enable_cache and i > 0 else None, transfer))
    return x, nfe, log


# --------------------------------------------------------------------------- LLaDA: dKV-Cache-Greedy

def find_window_tokens(window_index, select_ids, mask_index, window_size):
    """llada_dkv_cache_greedy.py::find_window_tokens, in place on one row: for each position in select_ids
    (in that order), alternate left/right pointers from it, one move per turn, and mark still-MASK positions
    not yet marked until window_size new ones are found or both pointers left the canvas."""
    n = window_index.shape[0]
    for sel in [int(s) for s in select_ids]:
        left, right, cnt, left_turn = sel - 1, sel + 1, 0, True
        while cnt < window_size:
            if left_turn:
                if left >= 0 and not window_index[left] and mask_index[left]:
                    window_index[left] = True
                    cnt += 1
                left -= 1
            else:
                if right < n and not window_index[right] and mask_index[right]:
                    window_index[right] = True
                    cnt += 1
                right += 1
            left_turn = not left_turn
            if left < 0 and right > n:     # `>` as in the authors' code (one extra right turn)
                break
    return window_index


@torch.no_grad()
def dkv_llada_greedy_generate(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.,
                              cfg_scale=0., remasking='low_confidence', mask_id=126336, enable_cache=False,
                              cache_reloading_step=1, window_size=0):
    """Mirror of llada_dkv_cache_greedy.py::generate (defaults as there; the README runs remasking='random',
    cache_reloading_step=2, window_size=4; 'low_confidence', the default, raises as in the authors' code).
    Returns (x, nfe, log)."""
    if cfg_scale > 0.:
        raise NotImplementedError('cfg_scale > 0 is not supported yet for cache.')
    x, B, P, num_blocks, spb = _setup(prompt, steps, gen_length, block_length, mask_id)
    L = x.shape[1]
    log, nfe = [], 0
    for b in range(num_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        quota = get_num_transfer_tokens(x[:, s:e] == mask_id, spb)
        acc = torch.cumsum(torch.cat([torch.zeros((B, 1), dtype=quota.dtype), quota], dim=-1), dim=-1)
        if remasking == 'low_confidence':
            raise NotImplementedError("Not support for low confidence")
        elif remasking == 'random':
            order_score = torch.rand((x.shape[0], x.shape[1]), device=x.device)   # one draw per block
        else:
            raise NotImplementedError(remasking)
        order_score[:, e:] = NEG_INF
        order_score[:, :s] = NEG_INF
        order = torch.sort(order_score, descending=True).indices
        kv, cached, nxt = None, None, None
        for i in range(spb):
            mask_index = x == mask_id
            if enable_cache and i % cache_reloading_step != 0:
                fed = nxt
            else:
                fed = torch.ones_like(mask_index)
            kv_read = _kv_in(kv, fed, cached, exact=False)
            logits, used = model.forward_fed(x, fed, kv_read)
            nfe += 1
            if enable_cache:               # the fed K/V overwrite the cache in place; full steps rebuild it
                kv, cached = used, torch.ones_like(mask_index)
            x0 = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)
            x0 = torch.full((B, L), mask_id, dtype=x0.dtype, device=x.device).scatter_(1, _index(fed), x0)
            x0 = torch.where(mask_index, x0, x)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            nxt = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(B):
                sel = order[row, acc[row, i]:acc[row, i + 1]]
                transfer[row, sel] = True
            x[transfer] = x0[transfer]
            for row in range(B):
                sel = order[row, acc[row, i]:acc[row, i + 1]]
                if i < spb - 1:
                    nsel = order[row, acc[row, i + 1]:acc[row, i + 1] + quota[row, i + 1]]
                    nxt[row, nsel] = True
                    nxt[row, sel] = True
                    if window_size > 0:
                        find_window_tokens(nxt[row], nsel, mask_index[row], window_size)
            log.append(_entry(len(log), b, i, 'full' if bool(fed.all()) else 'cached', fed,
                              None if kv_read is None else ~fed, cached, transfer))
    return x, nfe, log


# --------------------------------------------------------------------------- Dream: Decode / Prefill / PD

def shifted_cache_position(x, mask_token_id, shift_type):
    """The cacheable set after a step (dream_generation_utils.py L567-576):
    'un': p iff x[p+1] is not MASK, and the last position iff x[0] is not MASK (a roll);
    'un_right': p iff x[p] and x[p+1] are not MASK, the last position copying the one before;
    'right': p iff x[p] is not MASK (breaks Dream: see the note)."""
    if shift_type == "un":
        c = x != mask_token_id
        return torch.cat([c[:, 1:], c[:, :1]], dim=-1)
    if shift_type == "un_right":
        c = (x[:, :-1] != mask_token_id) & (x[:, 1:] != mask_token_id)
        return torch.cat([c, c[:, -1:]], dim=-1)
    if shift_type == "right":
        return x != mask_token_id
    raise NotImplementedError(shift_type)


def initial_cache_position(x, mask_token_id):
    """Before step 0 (L404-414): p iff x[p+1] is not MASK, the last position copying itself (not a roll)."""
    c = x != mask_token_id
    return torch.cat([c[:, 1:], c[:, -1:]], dim=-1)


@torch.no_grad()
def dkv_dream_generate(model, input_ids, attention_mask=None, max_new_tokens=None, steps=512, eps=1e-3,
                       alg='origin', alg_temp=None, temperature=0., top_p=None, top_k=None, mask_token_id=None,
                       use_cache=False, cache_type=None, cache_steps=0, shift_type=None):
    """Mirror of the dKV Dream `_sample` (cache_type 'decoded' / 'prefill': dream_generation_utils.py with
    modeling_dream.py; 'pd': dream_generation_utils_pd.py with modeling_dream_pd.py). Defaults as in
    DreamGenerationConfig (cache off); the README runs use_cache=True, cache_type="decoded", cache_steps=16,
    shift_type="un" (dream_generate.py: --cache-steps 4). Returns (x, nfe, log)."""
    assert max_new_tokens is not None and mask_token_id is not None
    max_length = input_ids.shape[1] + max_new_tokens
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_token_id)
    B, L = x.shape
    keep, tok_idx = None, None
    if attention_mask is not None and torch.any(attention_mask == 0.0):
        am = F.pad(attention_mask, (0, max_length - attention_mask.shape[1]), value=1.0)
        tok_idx = am.long().cumsum(-1) - 1
        tok_idx.masked_fill_(am == 0, 1)
        keep = am.bool()
    if use_cache and cache_type not in ("decoded", "prefill", "pd"):
        raise NotImplementedError(f"Unknown cache type: {cache_type}")
    cache_position = initial_cache_position(x, mask_token_id) if use_cache else None
    prefill = cache_position.clone() if use_cache and cache_type == "pd" else None
    prv = None
    kv, cached = None, None
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    log, nfe = [], 0
    for i in range(steps):
        mask_index = x == mask_token_id
        refresh = False
        if use_cache and cache_type in ("decoded", "pd") and i % cache_steps == 0:
            prv, refresh = None, True
            if cache_type == "decoded":
                kv, cached = None, None
            elif cached is not None:                 # pd: the decode cache goes, the prefill cache stays
                cached = prefill.clone()
        if use_cache and prv is not None:
            fed = ~prv
        elif use_cache and cache_type == "pd" and i != 0:
            fed = ~prefill                           # pd refresh: everything but the frozen prompt prefix
        else:
            fed = torch.ones_like(mask_index)
        kv_read = _kv_in(kv, fed, cached)
        logits, used = model.forward_fed(x, fed, kv_read, position_ids=tok_idx, keep=keep)
        nfe += 1
        cache_in = None if kv_read is None else cached
        if use_cache:
            if cache_type == "decoded" or (cache_type == "prefill" and i == 0):   # prefill: stored once
                kv, cached = used, cache_position.clone()
            elif cache_type == "pd":
                kv, cached = used, (prefill if i == 0 else cache_position).clone()
            if cached is not None:
                _index(cached)                   # the authors' `[cache_position].view(B, ...)`: equal row counts
        full_logits = torch.full((B, L, logits.shape[2]), NEG_INF, dtype=logits.dtype, device=x.device)
        full_logits.scatter_(1, _index(fed)[..., None].expand(-1, -1, logits.shape[2]), logits)
        logits = shift_logits(full_logits)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        before = x.clone()
        if alg == 'origin':
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_token_id
            transfer = torch.rand(*x0.shape, device=x.device) < p_transfer
            _, x0[transfer] = sample_tokens(mask_logits[transfer], temperature=temperature, top_p=top_p, top_k=top_k)
            x[mask_index] = x0.clone()
        elif alg in ('maskgit_plus', 'topk_margin', 'entropy'):
            confidence, x0 = sample_tokens(mask_logits, temperature, top_p=top_p, top_k=top_k,
                                           margin_confidence=alg == 'topk_margin', neg_entropy=alg == 'entropy')
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            _commit_topk(x, mask_index, x0, confidence, k, alg_temp, logits.dtype, mask_token_id)
        else:
            raise RuntimeError(f"Unknown alg: {alg}")
        committed = (before == mask_token_id) & (x != mask_token_id)
        log.append(_entry(i, 0, i, 'full' if bool(fed.all()) else 'cached', fed, cache_in, cached,
                          committed, refresh))
        if use_cache:
            if cache_type == "prefill":
                if prv is None:
                    prv, cache_position = cache_position, None
            else:
                prv = cache_position
                cache_position = shifted_cache_position(x, mask_token_id, shift_type)
    return x, nfe, log


if __name__ == "__main__":
    # Quick look at the schedules on tiny checkpoints (run: python tests/reference_dkv.py).
    import tempfile

    from checkpoints import (
        load_tiny_state_dict,
        special_token_ids,
        write_tiny_dream,
        write_tiny_llada,
    )

    path = write_tiny_llada(tempfile.mkdtemp())
    ids, model = special_token_ids(path), DkvLLaDA(*load_tiny_state_dict(path))
    prompt = torch.randint(0, 250, (1, 5), generator=torch.Generator().manual_seed(0))
    _, nfe, log = dkv_llada_decode_generate(model, prompt, steps=8, gen_length=8, block_length=4, mask_id=ids["mask"],
                                            enable_cache=True, cache_reloading_step=8)
    for r in log:
        print(r["step"], r["kind"], len(r["fed"][0]), r["fed"][0], r["committed"][0])
    dpath = write_tiny_dream(tempfile.mkdtemp())
    dids, dmodel = special_token_ids(dpath), DkvDream(*load_tiny_state_dict(dpath))
    for ct in ("decoded", "prefill", "pd"):
        _, nfe, log = dkv_dream_generate(dmodel, prompt, max_new_tokens=8, steps=8, alg="maskgit_plus",
                                         mask_token_id=dids["mask"], use_cache=True, cache_type=ct, cache_steps=4,
                                         shift_type="un")
        print(ct, [(r["kind"], len(r["fed"][0]), r["committed"][0]) for r in log])

"""Independent reference oracle for Elastic-Cache (arXiv 2510.14973), LLaDA and Dream.

Written from the authors' published code, never from the runtime packages (dllm, decoding, cache):
yxu-dev/Elastic-Cache (copy of VILA-Lab/Elastic-Cache) @ 46c0bc3
- LLaDA: `llada/generate.py::generate_with_elastic_cache` + `get_decoded_token_confident` /
  `get_decoded_token_topk`, and the patched `llada/model/modeling_llada.py` (`LLaDABlock.attention`,
  `CustomRotaryEmbedding`, `LLaDAModel.forward`).
- Dream: `dream/model/generation_utils_elastic.py::DreamGenerationMixin._sample` +
  `get_transfer_index_fast`, and `dream/model/modeling_dream.py` (`DreamSdpaAttention.forward`,
  `apply_rotary_pos_emb`, `DreamBaseModel.forward`).
The algorithm (details and the hand-computed schedule: docs/notes/elastic.md):

- every layer l keeps, for ALL N = P + gen positions, the layer INPUT hidden state `x[l]` and the post-RoPE
  q, k, v. Step 0 runs every layer on all N positions and fills them.
- step i >= 1 feeds only `fed = track ++ new_decoded ++ window_queries` (track: the union over layers of the
  `track_num` most-attended non-MASK positions found in the previous forward; new_decoded: the positions
  committed by the previous step; window_queries: the first `window_length` still-masked positions (all
  masked positions when block_caching=False), minus 1 for Dream). Layer l < start_reset is "cached": it
  writes the fed rows into x[l], q, k, v and attends with the fed queries over the full (partly stale) K/V.
  Its drift test: cosine similarity, over the HEAD axis, between the track rows' attention computed from the
  cached q/k (before this step's writes) and from the fresh q / updated k, averaged over track tokens and all
  N keys; if < gamma, start_reset = l + 1.
- layer start_reset (= first drift layer + 1) takes its full input from x[start_reset] (fresh at fed rows,
  stale elsewhere) and it and every deeper layer recompute all N positions (overwriting x, q, k, v).
- decode within the window: confidence >= min(threshold, max confidence) (so at least one), or top
  `tokens_per_iter` when threshold is None; the first EOS decoded drops every masked position after it from
  the loop (they stay MASK in the output). Stop when no masked position is left.

Entry points: `elastic_generate_llada(RefLLaDA, ...)`, `elastic_generate_dream(RefDream, ...)` return
(x, nfe, log); `window_uncached_generate_*` is the same decoding rule with a full uncached forward each step.
Temperature 0 only (the authors' LLaDA path has no temperature at all; Dream's is not mirrored).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from reference_dream import RefDream
from reference_llada import RefLLaDA

# --------------------------------------------------------------------------- per-layer model adapters

class _LLaDALayers:
    """Layer-by-layer LLaDA math on RefLLaDA's weights (same formulas as RefLLaDA.__call__)."""
    shift = False

    def __init__(self, ref: RefLLaDA):
        self.ref, self.w = ref, ref.w
        self.n_layers, self.H, self.KV, self.hd = ref.n_layers, ref.n_heads, ref.n_kv_heads, ref.head_dim

    def embed(self, ids):
        return self.w["wte.weight"][ids]

    def qkv(self, n, x, pos):
        """Post-RoPE q [B,H,T,hd], k/v [B,KV,T,hd] for hidden rows x [B,T,d] at absolute positions pos [T]."""
        B, T, _ = x.shape
        p = f"blocks.{n}."
        h = self.ref.rms_norm(x, self.w[p + "attn_norm.weight"])
        q = (h @ self.w[p + "q_proj.weight"].T).view(B, T, self.H, self.hd).transpose(1, 2)
        k = (h @ self.w[p + "k_proj.weight"].T).view(B, T, self.KV, self.hd).transpose(1, 2)
        v = (h @ self.w[p + "v_proj.weight"].T).view(B, T, self.KV, self.hd).transpose(1, 2)
        return self.ref.rope(q, pos), self.ref.rope(k, pos), v

    def finish_layer(self, n, x, att):
        p = f"blocks.{n}."
        x = x + att @ self.w[p + "attn_out.weight"].T
        h = self.ref.rms_norm(x, self.w[p + "ff_norm.weight"])
        gate = F.silu(h @ self.w[p + "ff_proj.weight"].T)
        return x + (gate * (h @ self.w[p + "up_proj.weight"].T)) @ self.w[p + "ff_out.weight"].T

    def logits(self, x):
        return self.ref.rms_norm(x, self.w["ln_f.weight"]) @ self.ref.head.T

    def full_logits(self, ids):
        return self.ref(ids)[0]

    @staticmethod
    def confidence(logits):
        # get_decoded_token_confident / _topk: softmax in float64, (max prob, argmax).
        return torch.softmax(logits.to(torch.float64), dim=-1).max(dim=-1)


class _DreamLayers:
    """Layer-by-layer Dream math on RefDream's weights (same formulas as RefDream.__call__)."""
    shift = True

    def __init__(self, ref: RefDream):
        self.ref, self.w = ref, ref.w
        self.n_layers, self.H, self.KV, self.hd = ref.n_layers, ref.n_heads, ref.n_kv, ref.head_dim

    def embed(self, ids):
        return self.w["embed_tokens.weight"][ids]

    def qkv(self, n, x, pos):
        B, T, _ = x.shape
        p = f"layers.{n}.self_attn."
        h = self.ref.rms_norm(x, self.w[f"layers.{n}.input_layernorm.weight"])
        lin = lambda name: h @ self.w[p + name + ".weight"].T + self.w[p + name + ".bias"]
        q = lin("q_proj").view(B, T, self.H, self.hd).transpose(1, 2)
        k = lin("k_proj").view(B, T, self.KV, self.hd).transpose(1, 2)
        v = lin("v_proj").view(B, T, self.KV, self.hd).transpose(1, 2)
        cos, sin = self.ref.cos_sin(pos[None], x.dtype)
        return self.ref.rotate(q, cos, sin), self.ref.rotate(k, cos, sin), v

    def finish_layer(self, n, x, att):
        x = x + att @ self.w[f"layers.{n}.self_attn.o_proj.weight"].T
        h = self.ref.rms_norm(x, self.w[f"layers.{n}.post_attention_layernorm.weight"])
        m = f"layers.{n}.mlp."
        gate = F.silu(h @ self.w[m + "gate_proj.weight"].T)
        return x + (gate * (h @ self.w[m + "up_proj.weight"].T)) @ self.w[m + "down_proj.weight"].T

    def logits(self, x):
        return self.ref.rms_norm(x, self.w["norm.weight"]) @ self.ref.head.T

    def full_logits(self, ids):
        return self.ref(ids)[0]

    @staticmethod
    def confidence(logits):
        # sample_tokens at temperature 0 (top_p/top_k None): softmax in the logits' dtype, (max, argmax).
        return torch.softmax(logits, dim=-1).max(dim=-1)


def _rep(t, H):
    """Repeat KV heads to H query heads (GQA); identity when they already match."""
    return t if t.shape[1] == H else t.repeat_interleave(H // t.shape[1], dim=1)


# --------------------------------------------------------------------------- one Elastic-Cache forward

def _elastic_forward(ad, caches, ids, fed, track, wq, masked, start_reset, gamma, track_num, forced):
    """One forward of the patched model. Mutates `caches` (per layer dict x/q/k/v over all N positions).

    ids [1, N] canvas; fed [T] absolute positions fed in this order (all N at step 0); track: the track
    positions (the first len(track) fed rows); wq: window query positions (the last len(wq) fed rows; rows
    read for logits and for the most-attended statistic); masked: all still-masked positions (zeroed in the
    statistic); start_reset: -1 at step 0 (all layers full), else L; forced: layer at which a drift is
    forced (test hook; -1 = before layer 0, i.e. recompute every layer) or None.
    Returns (logits rows for wq [len(wq), V], per-layer track tokens, layer log, final start_reset, drift layer).
    """
    L, H, hd = ad.n_layers, ad.H, ad.hd
    N = ids.shape[1]
    all_pos = torch.arange(N)
    sr = start_reset
    drift_layer = None
    if forced == -1 and sr == L:
        sr, drift_layer = 0, -1
    h = ad.embed(ids[:, fed])
    layer_log, tracks = [], []
    for n in range(L):
        c = caches[n]
        if n > sr:                              # already in full mode: h holds all N rows, absolute order
            c["x"] = h
        else:                                   # cached mode (or the layer that switches to full mode)
            c["x"][:, fed] = h
            if n == sr:
                h = c["x"].clone()              # fresh at the fed rows, stale elsewhere
        full = n >= sr
        q, k, v = ad.qkv(n, h, all_pos if full else fed)
        if full:
            c["q"], c["k"], c["v"] = q, k, v
            K, V = k, v
        else:
            past_k = c["k"].clone()
            c["k"][:, :, fed], c["v"][:, :, fed] = k, v
            past_q = c["q"][:, :, track].clone()
            c["q"][:, :, fed] = q
            K, V = c["k"], c["v"]
        weights = torch.softmax((q.float() @ _rep(K, H).float().transpose(-1, -2)) / math.sqrt(hd), dim=-1)
        att = (weights @ _rep(V, H).float()).to(h.dtype).transpose(1, 2).reshape(h.shape[0], h.shape[1], H * hd)
        sim = None
        if full:
            rows = weights[:, :, wq]                                   # absolute row indices
        else:
            rows = weights[:, :, weights.shape[2] - len(wq):]
            cur = weights[:, :, : len(track)]
            past = torch.softmax((past_q.float() @ _rep(past_k, H).float().transpose(-1, -2)) / math.sqrt(hd), dim=-1)
            sim = float(F.cosine_similarity(past, cur, dim=1).mean())  # cosine across HEADS, then mean
            if sim < gamma or forced == n:
                sr, drift_layer = n + 1, n
        score = rows.sum(dim=(0, 1, 2))
        score[masked] = 0.0
        tracks.append(score.topk(k=track_num).indices)
        layer_log.append({"layer": n, "full": bool(full), "sim": sim})
        h = ad.finish_layer(n, h, att)
    out = ad.logits(h)[0]
    last_full = sr <= L - 1
    rows = out[wq] if last_full else out[out.shape[0] - len(wq):]
    return rows, tracks, layer_log, sr, drift_layer


# --------------------------------------------------------------------------- the sampler

def _decode(ad, logits, dec_pos, x, threshold, tokens_per_iter, eos_id):
    """get_decoded_token_confident / get_decoded_token_topk / get_transfer_index_fast at temperature 0."""
    conf, x0 = ad.confidence(logits)
    if threshold is not None:
        keep = (conf >= min(threshold, float(conf.max()))).nonzero().flatten()
    else:
        keep = torch.topk(conf, k=min(tokens_per_iter, conf.shape[0])).indices
    decoded, tokens = dec_pos[keep], x0[keep]
    x[0, decoded] = tokens
    return decoded, tokens, decoded[tokens == eos_id]


def _run_one(ad, prompt_row, mask_id, gen_length, window_length, eos_id, threshold, tokens_per_iter, gamma,
             track_num, block_caching, force_drift, record_logits, cached=True):
    L = ad.n_layers
    P = prompt_row.shape[0]
    N = P + gen_length
    x = torch.full((1, N), mask_id, dtype=torch.long)
    x[0, :P] = prompt_row
    caches = [{"x": None, "q": None, "k": None, "v": None} for _ in range(L)]
    track = torch.zeros(0, dtype=torch.long)
    new_decoded = torch.arange(P)            # the authors' initial value; never fed (step 0 feeds all)
    masked = torch.arange(P, N)
    shift = 1 if ad.shift else 0
    decoded_eos, nfe, num_computed, total_computed, i = False, 0, 0, 0, 0
    steps = []
    while True:
        wq = (masked[:window_length] if block_caching else masked) - shift
        if i == 0:
            fed, start_reset, fed_track = torch.arange(N), -1, torch.zeros(0, dtype=torch.long)
        else:
            fed, start_reset, fed_track = torch.cat([track, new_decoded, wq]), L, track
        forced = force_drift(i) if callable(force_drift) else (force_drift or {}).get(i)
        if cached:
            logits, tracks, layer_log, sr, drift_layer = _elastic_forward(
                ad, caches, x, fed, fed_track, wq, masked, start_reset, gamma, track_num, forced)
        else:                                   # uncached reference: full forward, same decoding rule
            logits = ad.full_logits(x)[0][wq]
            tracks, layer_log, sr, drift_layer = [], [], -1 if i == 0 else 0, None
        if not block_caching:
            wq, logits = wq[:window_length], logits[:window_length]
        if cached:
            track = torch.unique(torch.cat(tracks))
        decoded, tokens, eos_pos = _decode(ad, logits, wq + shift, x, threshold, tokens_per_iter, eos_id)
        masked = masked[~torch.isin(masked, decoded)]
        nfe += 1
        truncated_at = None
        if not decoded_eos and eos_pos.numel() > 0:
            truncated_at = int(eos_pos.min())
            decoded_eos = True
            masked = masked[masked <= truncated_at]
        recomputed = L - sr                     # the authors' count: L + 1 at step 0 (start_reset = -1)
        num_computed += recomputed
        total_computed += L
        rec = {"step": i, "fed": fed.tolist(), "track": fed_track.tolist(),
               "new_decoded": [] if i == 0 else new_decoded.tolist(), "window": (wq + shift).tolist(),
               "layers": layer_log, "drift_layer": drift_layer,
               "full_layers": [e["layer"] for e in layer_log if e["full"]],
               "layers_recomputed": recomputed, "decoded": decoded.tolist(), "tokens": tokens.tolist(),
               "eos_truncated_at": truncated_at}
        if record_logits:
            rec["logits"] = logits.clone()
        steps.append(rec)
        if masked.numel() == 0:
            break
        new_decoded = decoded
        i += 1
    return x[0], nfe, {"steps": steps, "fraction": num_computed / total_computed, "nfe": nfe}


def _run(ad, prompt, mask_id, kw, cached):
    prompt = prompt if prompt.dim() == 2 else prompt[None]
    outs = [_run_one(ad, row, mask_id, cached=cached, **kw) for row in prompt]
    if len(outs) == 1:
        x, nfe, log = outs[0]
        return x[None], nfe, log
    # The authors' code is batch 1 only; here each row runs on its own (own caches, own stopping step).
    return torch.stack([o[0] for o in outs]), [o[1] for o in outs], [o[2] for o in outs]


@torch.no_grad()
def elastic_generate_llada(model: RefLLaDA, prompt, mask_id=126336, gen_length=512, window_length=16,
                           eos_id=126081, threshold=0.9, tokens_per_iter=1, gamma=0.9, track_num=1,
                           block_caching=True, force_drift=None, record_logits=False):
    """Mirror of generate_with_elastic_cache. Returns (x [B, P + gen], nfe, log).

    log["fraction"] is the authors' third return value (num_computed / total_computed, with step 0 counted
    as L + 1 layers). log["steps"][i]: fed positions (feed order), track / new_decoded / window positions,
    per layer {"full": recomputed all N positions, "sim": drift similarity or None}, drift_layer, decoded.
    force_drift (test hook, not in the authors' code): {step: layer} or callable(step) -> layer/None: at that
    step the drift test fires at that layer (-1: before layer 0, i.e. every layer recomputes all positions)."""
    kw = {"gen_length": gen_length, "window_length": window_length, "eos_id": eos_id, "threshold": threshold,
              "tokens_per_iter": tokens_per_iter, "gamma": gamma, "track_num": track_num, "block_caching": block_caching,
              "force_drift": force_drift, "record_logits": record_logits}
    return _run(_LLaDALayers(model), prompt, mask_id, kw, cached=True)


@torch.no_grad()
def elastic_generate_dream(model: RefDream, prompt, mask_id, max_new_tokens=512, window_length=16, eos_id=0,
                           threshold=0.9, tokens_per_iter=1, gamma=0.9, track_num=1, block_caching=True,
                           force_drift=None, record_logits=False):
    """Mirror of Elastic-Cache's Dream `_sample` (temperature 0, no padding). eos_id: the eval passes
    tokenizer.eos_token_id (<|endoftext|> for Dream-v0-Instruct). Window queries are the positions one
    left of the first `window_length` masks (logit shift). Same return value as elastic_generate_llada."""
    kw = {"gen_length": max_new_tokens, "window_length": window_length, "eos_id": eos_id, "threshold": threshold,
              "tokens_per_iter": tokens_per_iter, "gamma": gamma, "track_num": track_num, "block_caching": block_caching,
              "force_drift": force_drift, "record_logits": record_logits}
    return _run(_DreamLayers(model), prompt, mask_id, kw, cached=True)


@torch.no_grad()
def window_uncached_generate_llada(model: RefLLaDA, prompt, mask_id=126336, gen_length=512, window_length=16,
                                   eos_id=126081, threshold=0.9, tokens_per_iter=1, block_caching=True,
                                   record_logits=False):
    """Elastic-Cache's decoding rule (sliding window, threshold, EOS truncation) with one full uncached
    forward (RefLLaDA.__call__) per step. What the cache approximates."""
    kw = {"gen_length": gen_length, "window_length": window_length, "eos_id": eos_id, "threshold": threshold,
              "tokens_per_iter": tokens_per_iter, "gamma": 0.0, "track_num": 1, "block_caching": block_caching,
              "force_drift": None, "record_logits": record_logits}
    return _run(_LLaDALayers(model), prompt, mask_id, kw, cached=False)


@torch.no_grad()
def window_uncached_generate_dream(model: RefDream, prompt, mask_id, max_new_tokens=512, window_length=16,
                                   eos_id=0, threshold=0.9, tokens_per_iter=1, block_caching=True,
                                   record_logits=False):
    """Dream counterpart of window_uncached_generate_llada (RefDream.__call__, shifted logits)."""
    kw = {"gen_length": max_new_tokens, "window_length": window_length, "eos_id": eos_id, "threshold": threshold,
              "tokens_per_iter": tokens_per_iter, "gamma": 0.0, "track_num": 1, "block_caching": block_caching,
              "force_drift": None, "record_logits": record_logits}
    return _run(_DreamLayers(model), prompt, mask_id, kw, cached=False)

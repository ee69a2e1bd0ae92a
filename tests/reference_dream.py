"""Independent reference oracle for Dream: forward pass, official sampler, Fast-dLLM cached block sampler.

Written only from the published code and the reference notes, never from the runtime packages (dllm,
decoding, cache). Each piece mirrors, in behaviour:

- `RefDream`: the Qwen2-style forward of Dream-org `modeling_dream.py` (HF copy: RMSNorm in fp32 then cast,
  rotate-half RoPE with fp32 inv_freq and cos/sin cast to the activations' dtype, GQA, q/k/v biases,
  full bidirectional attention, no logit shift), with the cache semantics of NVlabs/Fast-dLLM @ 24cc59e
  `dream/model/modeling_dream.py` (`DreamSdpaAttention.forward`, `DreamBaseModel.forward`,
  `apply_rotary_pos_emb(block_end_index=...)`): the cache holds PRE-RoPE K/V; prefix mode concatenates
  past + fed; dual mode overwrites the cache at `replace_position` and attends over the whole cache.
- `dream_diffusion_generate`: `DreamGenerationMixin._sample` of Dream-org `generation_utils.py` (read in
  Fast-dLLM `dream/model/generation_utils.py`; its extra `confidence_threshold` branch is not mirrored).
- `fastdllm_dream_block_generate`: Fast-dLLM `dream/model/generation_utils_block.py` `_sample`.
- `sample_tokens`, `top_p_logits`, `top_k_logits`: the functions of the same names in both files.

Random draws (torch.rand, Categorical, multinomial) happen in the same order with the same shapes as in the
authors' code, so seeded runs at temperature > 0 match it.
"""
from __future__ import annotations

import math

import torch
import torch.distributions as dists
import torch.nn.functional as F


# --------------------------------------------------------------------------- model

class RefDream:
    """Plain-math Dream forward. `config` holds Dream config.json fields; `state_dict` uses the real Qwen2
    names (model.embed_tokens.weight, model.layers.N.self_attn.q_proj.{weight,bias}, lm_head.weight, ...)."""

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor]):
        self.d = config["hidden_size"]
        self.n_heads = config["num_attention_heads"]
        self.n_kv = config["num_key_value_heads"]
        self.n_layers = config["num_hidden_layers"]
        self.head_dim = self.d // self.n_heads            # DreamAttention: hidden_size // num_heads
        self.theta = float(config.get("rope_theta", 10000.0))
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.w = {k.removeprefix("model."): v for k, v in state_dict.items()}
        self.head = self.w.get("lm_head.weight", self.w["embed_tokens.weight"])   # tied when absent

    def rms_norm(self, x, weight):
        # DreamRMSNorm: fp32 x * rsqrt(mean(x^2) + eps), cast to the input dtype, THEN times the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    def cos_sin(self, positions, dtype):
        # DreamRotaryEmbedding (rope "default"): inv_freq in fp32, freqs = pos * inv_freq in fp32,
        # emb = cat(freqs, freqs); cos/sin cast to the activations' dtype. positions: [B or 1, N].
        hd = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = positions.float()[..., None] * inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]      # [B or 1, 1, N, hd]

    @staticmethod
    def rotate(t, cos, sin):
        # apply_rotary_pos_emb: t * cos + rotate_half(t) * sin, in t's dtype.
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 replace_position=None, dual_cache=False):
        """Returns (logits [B, T, V] (unshifted), present); present[layer] = (k, v), PRE-RoPE, k with its
        bias, shape [B, n_kv_heads, key_len, head_dim] (Fast-dLLM keeps the same values as [B, key_len,
        n_kv*head_dim]).

        - attention_mask: None or "full" (no mask), or a bool tensor broadcastable to [B, 1, T, key_len]
          (True = attend), like `_sample`'s 4D mask. Fully masked query rows (pads) get a zero attention
          output (torch's math SDPA `_safe_softmax`); compare only non-pad rows.
        - no cache: positions are `position_ids` ([B, T], `tok_idx` in `_sample`) or arange(T).
        - prefix cache (past_key_values, dual_cache False): keys = cat(past, fed); key positions
          arange(key_len), query positions [key_len - T, key_len).
        - dual cache (dual_cache True, replace_position [B, L] or [L] bool, one row for the batch): the fed
          K/V overwrite the past at the marked indices (a copy here; Fast-dLLM writes in place, which gives
          the same results in its loop); key positions arange(L), query positions [end - T, end) with
          end = last marked index + 1.
        Fast-dLLM's patched `DreamBaseModel.forward` always overwrites `position_ids` with arange, so with a
        cache `position_ids` must be None here.
        """
        B, T = input_ids.shape
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        if past_key_values is not None and position_ids is not None:
            raise ValueError("Fast-dLLM's cached Dream forward ignores position_ids; pass None")
        x = self.w["embed_tokens.weight"][input_ids]
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        present = []
        for n in range(self.n_layers):
            p = f"layers.{n}.self_attn."
            h = self.rms_norm(x, self.w[f"layers.{n}.input_layernorm.weight"])
            q = (h @ self.w[p + "q_proj.weight"].T + self.w[p + "q_proj.bias"]).view(B, T, H, hd).transpose(1, 2)
            k = (h @ self.w[p + "k_proj.weight"].T + self.w[p + "k_proj.bias"]).view(B, T, KV, hd).transpose(1, 2)
            v = (h @ self.w[p + "v_proj.weight"].T + self.w[p + "v_proj.bias"]).view(B, T, KV, hd).transpose(1, 2)
            q_end = None
            if past_key_values is not None:
                past_k, past_v = past_key_values[n]
                if dual_cache:
                    rp = replace_position if replace_position.dim() == 1 else replace_position[0]
                    idx = rp.nonzero().flatten()
                    k_all, v_all = past_k.clone(), past_v.clone()
                    k_all[:, :, idx], v_all[:, :, idx] = k, v
                    k, v = k_all, v_all
                    q_end = int(idx.max()) + 1
                else:
                    k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            present.append((k, v))
            S = k.shape[2]
            if past_key_values is None:
                pos = position_ids if position_ids is not None else torch.arange(T, device=x.device)[None]
                cos, sin = self.cos_sin(pos, x.dtype)
                q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
            else:
                q_end = S if q_end is None else q_end
                cos, sin = self.cos_sin(torch.arange(S, device=x.device)[None], x.dtype)
                q = self.rotate(q, cos[:, :, q_end - T: q_end], sin[:, :, q_end - T: q_end])
                k = self.rotate(k, cos, sin)
            k = k.repeat_interleave(H // KV, dim=1)           # repeat_kv
            v = v.repeat_interleave(H // KV, dim=1)
            # Explicit attention in fp32: softmax(q k^T / sqrt(hd) masked) v.
            scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(hd)
            if mask is not None:
                scores = scores.masked_fill(~mask.bool(), float("-inf"))
            att = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            att = (att @ v.float()).to(x.dtype).transpose(1, 2).reshape(B, T, H * hd)
            x = x + att @ self.w[p + "o_proj.weight"].T
            h = self.rms_norm(x, self.w[f"layers.{n}.post_attention_layernorm.weight"])
            m = f"layers.{n}.mlp."
            gate = F.silu(h @ self.w[m + "gate_proj.weight"].T)
            x = x + (gate * (h @ self.w[m + "up_proj.weight"].T)) @ self.w[m + "down_proj.weight"].T
        logits = self.rms_norm(x, self.w["norm.weight"]) @ self.head.T
        return logits, present


def shift_logits(logits):
    """Dream's AR-style alignment: position i reads logits[i - 1]; position 0 keeps its own."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


# --------------------------------------------------------------------------- sampling primitives

def top_p_logits(logits, top_p):
    """`top_p_logits`: keep the smallest descending prefix reaching top_p (the first token always);
    the rest filled with finfo(dtype).min."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits, top_k):
    """`top_k_logits`: drop logits below the k-th largest (ties kept), filled with finfo(dtype).min."""
    kth = torch.topk(logits, min(top_k, logits.size(-1)))[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False, neg_entropy=False):
    """`sample_tokens`: (confidence, x0). T > 0: logits / T, top_p, top_k, softmax, x0 ~ Categorical and
    confidence = p(x0) (if Categorical raises, e.g. its simplex check on low-precision probs, the authors'
    bare `except` falls back to the argmax); T == 0: (max prob, argmax). Then margin: p1 - p2;
    neg_entropy: sum p log(p + 1e-10)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        try:
            x0 = dists.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except Exception:
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        top2 = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = top2[:, 0] - top2[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def _commit_topk(x_view, mask_index, x0, confidence, k, alg_temp, dtype, mask_token_id, window=None):
    """The shared commit of both samplers: confidence over the view (-inf off the masks and, in the block
    code, from `window` on), k positions by top-k over each row (alg_temp None/0) or multinomial over
    softmax(conf / alg_temp); commit x0 there (a row with fewer MASKs than k gets non-MASK positions
    re-written with MASK, as in the authors' code; equal per-row MASK counts never hit this)."""
    full = torch.full(x_view.shape, float("-inf"), dtype=dtype, device=x_view.device)
    full[mask_index] = confidence
    if window is not None:
        full[:, window:] = float("-inf")
    if k <= 0:
        return
    if alg_temp is None or alg_temp == 0:
        idx = torch.topk(full, k).indices
    else:
        idx = torch.multinomial(F.softmax(full / alg_temp, dim=-1), num_samples=k)
    x_ = torch.full_like(x_view, mask_token_id)
    x_[mask_index] = x0
    rows = torch.arange(x_view.shape[0], device=x_view.device)[:, None].expand_as(idx)
    x_view[rows, idx] = x_[rows, idx]


def _prepare(input_ids, attention_mask, max_new_tokens, mask_token_id):
    """`_sample` preamble: right-pad with MASK to max_length; with zeros in attention_mask build tok_idx =
    cumsum - 1 (pads 1) and the 4D mask mask_q AND mask_k; else "full" and tok_idx None."""
    max_length = input_ids.shape[1] + max_new_tokens
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_token_id)
    if attention_mask is not None and torch.any(attention_mask == 0.0):
        am = F.pad(attention_mask, (0, max_length - attention_mask.shape[1]), value=1.0)
        tok_idx = am.long().cumsum(-1) - 1
        tok_idx.masked_fill_(am == 0, 1)
        am = torch.logical_and(am.unsqueeze(1).unsqueeze(-2), am.unsqueeze(1).unsqueeze(-1))
        return x, am, tok_idx
    return x, "full", None


# --------------------------------------------------------------------------- official Dream sampler

@torch.no_grad()
def dream_diffusion_generate(model, input_ids, attention_mask=None, max_new_tokens=None, steps=512, eps=1e-3,
                             alg='origin', alg_temp=None, temperature=0., top_p=None, top_k=None,
                             mask_token_id=None):
    """Mirror of `DreamGenerationMixin._sample` (diffusion_generate with max_new_tokens). Returns x
    [B, P + max_new_tokens]. `steps` full forwards; selection is global over the canvas."""
    assert max_new_tokens is not None and mask_token_id is not None
    x, am, tok_idx = _prepare(input_ids, attention_mask, max_new_tokens, mask_token_id)
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)        # float32
    for i in range(steps):
        mask_index = x == mask_token_id
        logits = shift_logits(model(x, attention_mask=am, position_ids=tok_idx)[0])
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == 'origin':
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_token_id
            transfer = torch.rand(*x0.shape, device=x.device) < p_transfer
            _, x0[transfer] = sample_tokens(mask_logits[transfer], temperature=temperature, top_p=top_p, top_k=top_k)
            x[mask_index] = x0.clone()
            continue
        if alg not in ('maskgit_plus', 'topk_margin', 'entropy'):
            raise NotImplementedError(alg)      # 'confidence_threshold' is Fast-dLLM's addition, not mirrored
        confidence, x0 = sample_tokens(mask_logits, temperature, top_p=top_p, top_k=top_k,
                                       margin_confidence=alg == 'topk_margin', neg_entropy=alg == 'entropy')
        num_mask_token = mask_index.sum() / mask_index.shape[0]              # batch mean, float32
        k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        _commit_topk(x, mask_index, x0, confidence, k, alg_temp, logits.dtype, mask_token_id)
    return x


# --------------------------------------------------------------------------- Fast-dLLM cached Dream

@torch.no_grad()
def fastdllm_dream_block_generate(model, input_ids, attention_mask=None, max_new_tokens=None, steps=512,
                                  block_length=32, threshold=0.9, dual_cache=False, alg='confidence_threshold',
                                  alg_temp=None, eps=1e-3, temperature=0., top_p=None, top_k=None,
                                  mask_token_id=None):
    """Mirror of Fast-dLLM `generation_utils_block.py` `_sample`. Returns (x, nfe), nfe = model calls.

    Per block [s, e): one full forward (no cache) whose shifted logits commit x0 at s unconditionally
    (sample_tokens over the whole canvas); its K/V become the cache (prefix: truncated to [0, s); dual: all).
    Then cached forwards (prefix: x[:, s:]; dual: x[:, s:e] with replace_position [s, e)), each re-shifted
    within the fed window, until the block has no MASK:
    - alg == 'confidence_threshold': top-(#MASK in block) by confidence; rank 0 always, others iff
      confidence >= threshold (sample_tokens over all MASKs of the fed window, batch size 1);
    - any other alg: the entropy rule (neg_entropy hard-coded), i from 1, quota int(m (1 - s_i/t_i))
      from linspace(1, eps, steps_per_block + 1), all remaining at i = steps_per_block - 1, and the loop
      breaks, after its forward, once i == steps_per_block (blocks can stay partly masked).
    """
    if attention_mask is not None and torch.any(attention_mask == 0.0):
        # The authors' cached calls slice the 4D mask on the key axis only ([:, :, :, s:]), which does not
        # fit the cached attention, and their patched forward ignores tok_idx: padded batches do not run.
        raise NotImplementedError("padded batches do not run in Fast-dLLM's cached Dream sampler")
    assert max_new_tokens is not None and mask_token_id is not None
    x, _, _ = _prepare(input_ids, None, max_new_tokens, mask_token_id)
    B, P = input_ids.shape
    if (alg == 'confidence_threshold' or dual_cache) and B != 1:
        raise NotImplementedError("the authors' threshold rule and dual cache handle batch size 1 only")
    assert max_new_tokens % block_length == 0
    num_blocks = max_new_tokens // block_length
    assert steps % num_blocks == 0
    spb = steps // num_blocks
    timesteps = torch.linspace(1, eps, spb + 1, device=x.device)
    nfe = 0
    for b in range(num_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        logits, present = model(x)                                          # block start: full forward
        nfe += 1
        _, x0 = sample_tokens(shift_logits(logits), temperature=temperature, top_p=top_p, top_k=top_k)
        x[:, s] = x0[:, s]
        if dual_cache:
            cache = present
            replace_position = torch.zeros_like(x, dtype=torch.bool)
            replace_position[:, s:e] = True
        else:
            cache = [(k[:, :, :s], v[:, :, :s]) for k, v in present]
        i = 1
        while True:
            view = x[:, s:e] if dual_cache else x[:, s:]
            mask_index = view == mask_token_id
            if dual_cache:
                logits, cache = model(view, past_key_values=cache, replace_position=replace_position, dual_cache=True)
            else:
                logits, _ = model(view, past_key_values=cache)
            nfe += 1
            logits = shift_logits(logits)                                   # block-local re-shift
            if alg == 'confidence_threshold':
                confidence, x0 = sample_tokens(logits[mask_index], temperature=temperature, top_p=top_p, top_k=top_k)
                full = torch.full(view.shape, float("-inf"), dtype=logits.dtype, device=x.device)
                full[mask_index] = confidence
                full[:, block_length:] = float("-inf")
                n_mask = int((x[:, s:e] == mask_token_id).sum())
                sel_conf, sel = torch.topk(full, n_mask)
                transfer = torch.zeros_like(view, dtype=torch.bool)
                transfer[0, sel[0]] = True
                for j in range(1, n_mask):
                    if sel_conf[0, j] < threshold:
                        transfer[0, sel[0, j]] = False
                x_ = torch.full_like(view, mask_token_id)
                x_[mask_index] = x0
                view[transfer] = x_[transfer]
            else:
                if i == spb:
                    break
                t, s_ = timesteps[i], timesteps[i + 1]
                mask_index[:, block_length:] = False
                confidence, x0 = sample_tokens(logits[mask_index], temperature, top_p=top_p, top_k=top_k,
                                               neg_entropy=True)
                num_mask_token = mask_index.sum() / mask_index.shape[0]
                k = int(num_mask_token * (1 - s_ / t)) if i < spb - 1 else int(num_mask_token)
                _commit_topk(view, mask_index, x0, confidence, k, alg_temp, logits.dtype, mask_token_id,
                             window=block_length)
                i += 1
            if (x[:, s:e] == mask_token_id).sum() == 0:
                break
    return x, nfe


if __name__ == "__main__":
    # Self-checks on a tiny random checkpoint (run: python tests/reference_dream.py).
    import tempfile
    from checkpoints import load_tiny_state_dict, special_token_ids, write_tiny_dream

    path = write_tiny_dream(tempfile.mkdtemp())
    cfg, sd = load_tiny_state_dict(path)
    ids, model = special_token_ids(path), RefDream(cfg, sd)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 24))
    x[:, 12:] = ids["mask"]
    full, present = model(x)
    # Left padding, as `_sample` runs it (tok_idx positions, 4D mask): real rows see the unpadded logits.
    padded = torch.cat([torch.full((2, 3), ids["pad"]), x], dim=1)
    _, am4, tok_idx = _prepare(padded, torch.cat([torch.zeros(2, 3), torch.ones(2, 24)], dim=1), 0, ids["mask"])
    assert torch.allclose(model(padded, attention_mask=am4, position_ids=tok_idx)[0][:, 3:], full, atol=1e-4)
    # transformers' Qwen2 on the same tensors: its causal default, and additive 4D masks for full / padded.
    from transformers import Qwen2Config, Qwen2ForCausalLM
    keys = ["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
            "max_position_embeddings", "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings"]
    hf = Qwen2ForCausalLM(Qwen2Config(**{k: cfg[k] for k in keys}, attn_implementation="eager")).eval()
    hf.load_state_dict(sd, strict=True)
    additive = lambda m: torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)  # noqa: E731
    with torch.no_grad():
        causal = torch.tril(torch.ones(24, 24, dtype=torch.bool))[None, None]
        assert torch.allclose(hf(x).logits, model(x, attention_mask=causal)[0], atol=1e-5)
        assert torch.allclose(hf(x, attention_mask=additive(torch.ones(1, 1, 24, 24, dtype=torch.bool))).logits,
                              full, atol=1e-5)
        got = hf(padded, attention_mask=additive(am4), position_ids=tok_idx).logits[:, 3:]
        assert torch.allclose(got, full, atol=1e-4)
    # With an unchanged canvas, both cache modes reproduce the full forward.
    prefix = [(k[:, :, :12], v[:, :, :12]) for k, v in present]
    assert torch.allclose(model(x[:, 12:], past_key_values=prefix)[0], full[:, 12:], atol=1e-5)
    rp = torch.zeros_like(x, dtype=torch.bool)
    rp[:, 12:16] = True
    got = model(x[:, 12:16], past_key_values=present, replace_position=rp, dual_cache=True)[0]
    assert torch.allclose(got, full[:, 12:16], atol=1e-5)
    # Samplers: no MASK left; nfe of the cached paths.
    prompt, mask_id = x[:, :12], ids["mask"]
    for alg in ("origin", "maskgit_plus", "topk_margin", "entropy"):
        for temperature in (0.0, 0.5):
            out = dream_diffusion_generate(model, prompt, max_new_tokens=16, steps=8, alg=alg, temperature=temperature,
                                           top_p=0.95, mask_token_id=mask_id)
            assert (out != mask_id).all() and torch.equal(out[:, :12], prompt)
    for dual in (False, True):
        kw = dict(max_new_tokens=16, steps=8, block_length=8, dual_cache=dual, mask_token_id=mask_id)
        out, nfe = fastdllm_dream_block_generate(model, prompt[:1], threshold=1.01, **kw)    # one token per step
        assert (out != mask_id).all() and nfe == 16
        out, nfe = fastdllm_dream_block_generate(model, prompt[:1], threshold=0.5, **kw)
        assert (out != mask_id).all() and 4 <= nfe <= 16
        print(f"dual_cache={dual}: threshold 0.5 nfe={nfe}")
        out, nfe = fastdllm_dream_block_generate(model, prompt[:1], alg="entropy", **kw)    # 1 full + 3 cached
        assert (out != mask_id).all() and nfe == 8
    out, nfe = fastdllm_dream_block_generate(model, prompt, alg="entropy", max_new_tokens=16, steps=2, block_length=8,
                                             mask_token_id=mask_id)
    assert nfe == 4 and (out[:, 12:] == mask_id).sum() == 2 * 2 * 7   # steps_per_block 1: 7 MASKs per block left
    print("reference_dream self-checks passed")

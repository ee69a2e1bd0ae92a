"""Independent reference oracle for SDAR: forward pass with the block KV cache, and the block sampler.

Written only from the published code and the reference notes, never from the runtime packages (dllm,
decoding, cache). Each piece mirrors, in behaviour:

- `RefSDAR`: `SDARForCausalLM` of JetAstra/SDAR @ c2041a8 `training/model/SDAR-4B-Chat/modeling_sdar.py`
  in eval mode (Qwen3 math: per-head q_norm/k_norm BEFORE RoPE, rotate-half RoPE, scale head_dim^-0.5,
  SiLU-gated MLP, no logit shift; flash-attn `rms_norm_fn` RMSNorm, which applies the weight in fp32 before
  the downcast). `SDARAttention.forward`: a bool attention mask is required; the DynamicCache holds
  post-k_norm, post-RoPE K/V; store_kv=True appends the fed K/V (`past_key_value.update`), store_kv=False
  attends over past + fed without storing. The flash (all-True mask) and SDPA paths compute the same math.
- `sdar_block_diffusion_generate`: JetAstra/SDAR `generate.py::block_diffusion_generate`, with
  `get_num_transfer_tokens`, `top_k_logits`, `top_p_logits`, `sample_with_temperature_topk_topp`.
  Exceptions, both documented at the function: `entropy_bounded` implements the EB-Sampler rule (the
  official branch is broken) and temperature == 0 is greedy (the official code divides by zero).

Random draws (one torch.multinomial over all block positions per step) happen as in the authors' code, so
seeded runs at temperature > 0 match it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- model

class RefSDAR:
    """Plain-math SDAR forward. `config` holds SDAR config.json fields; `state_dict` uses the real Qwen3
    names (model.layers.N.self_attn.{q,k,v,o}_proj.weight, self_attn.{q,k}_norm.weight, lm_head.weight)."""

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor]):
        self.d = config["hidden_size"]
        self.n_heads = config["num_attention_heads"]
        self.n_kv = config["num_key_value_heads"]
        self.n_layers = config["num_hidden_layers"]
        self.head_dim = config.get("head_dim") or self.d // self.n_heads
        self.theta = float(config.get("rope_theta", 10000.0))
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.w = {k.removeprefix("model."): v for k, v in state_dict.items()}
        self.head = self.w.get("lm_head.weight", self.w["embed_tokens.weight"])   # tied when absent

    def rms_norm(self, x, weight):
        # flash_attn rms_norm_fn: all in fp32 (x * rsqrt(mean(x^2) + eps) * weight), then cast to x's dtype.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * weight.float()).to(x.dtype)

    def cos_sin(self, positions, dtype):
        # SDARRotaryEmbedding (rope "default"): fp32 inv_freq and freqs, cos/sin cast to the activations' dtype.
        hd = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = positions.float()[..., None] * inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]      # [B or 1, 1, T, hd]

    @staticmethod
    def rotate(t, cos, sin):
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values=None, store_kv=False):
        """Returns (logits [B, T, V], new_past). past_key_values: None (empty DynamicCache) or a list of
        per-layer (k, v), [B, n_kv, S, head_dim], post-k_norm and post-RoPE. attention_mask: bool (or
        0/1 float, cast with .bool() as the authors do) [B or 1, T, S + T], True = attend; required.
        position_ids: [B or 1, T]. store_kv=True returns the past with the fed K/V appended (a new list;
        a new cache when past is None); store_kv=False returns the past unchanged."""
        if attention_mask is None:
            raise ValueError("SDAR's eval forward needs a bool attention mask (its mask builder is commented out)")
        B, T = input_ids.shape
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        mask = attention_mask.bool()[:, None]                        # [B or 1, 1, T, S + T]
        x = self.w["embed_tokens.weight"][input_ids]
        cos, sin = self.cos_sin(position_ids, x.dtype)
        new_past = []
        for n in range(self.n_layers):
            a = f"layers.{n}.self_attn."
            h = self.rms_norm(x, self.w[f"layers.{n}.input_layernorm.weight"])
            q = self.rms_norm((h @ self.w[a + "q_proj.weight"].T).view(B, T, H, hd), self.w[a + "q_norm.weight"])
            k = self.rms_norm((h @ self.w[a + "k_proj.weight"].T).view(B, T, KV, hd), self.w[a + "k_norm.weight"])
            v = (h @ self.w[a + "v_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
            q, k = self.rotate(q.transpose(1, 2), cos, sin), self.rotate(k.transpose(1, 2), cos, sin)
            if past_key_values:                                     # None or [] = empty cache
                k = torch.cat([past_key_values[n][0], k], dim=2)
                v = torch.cat([past_key_values[n][1], v], dim=2)
            new_past.append((k, v))
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)   # enable_gqa
            scores = (q.float() @ k.float().transpose(-1, -2)) * hd ** -0.5
            att = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            att = (att @ v.float()).to(x.dtype).transpose(1, 2).reshape(B, T, H * hd)
            x = x + att @ self.w[a + "o_proj.weight"].T
            h = self.rms_norm(x, self.w[f"layers.{n}.post_attention_layernorm.weight"])
            m = f"layers.{n}.mlp."
            gate = F.silu(h @ self.w[m + "gate_proj.weight"].T)
            x = x + (gate * (h @ self.w[m + "up_proj.weight"].T)) @ self.w[m + "down_proj.weight"].T
        logits = self.rms_norm(x, self.w["norm.weight"]) @ self.head.T
        return logits, (new_past if store_kv else past_key_values)


def block_causal_mask(total_length, block_length, device=None):
    """generate.py's mask: tril(ones(nb, nb)) repeat-interleaved by block_length, as bool [1, L, L]."""
    nb = total_length // block_length
    blocks = torch.tril(torch.ones(nb, nb, dtype=torch.bool, device=device))
    return blocks.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[None]


# --------------------------------------------------------------------------- sampling primitives

def get_num_transfer_tokens(block_length, steps):
    """`get_num_transfer_tokens`: block_length // steps per step, the first block_length % steps get one
    more. Computed from block_length, NOT from the MASKs left in the block."""
    quota = torch.zeros(steps, dtype=torch.int64) + block_length // steps
    quota[: block_length % steps] += 1
    return quota


def top_k_logits(logits, k):
    """`top_k_logits`: k <= 0 keeps all; else logits below the k-th largest become -inf (ties kept)."""
    if k <= 0:
        return logits
    kth = torch.topk(logits, k)[0][..., -1, None]
    return torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)


def top_p_logits(logits, p):
    """`top_p_logits`: the smallest descending prefix reaching p is kept (the first always), rest -inf."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.scatter(torch.zeros_like(logits, dtype=torch.bool), -1, sorted_idx, remove)
    return logits.masked_fill(mask, float("-inf"))


def sample_with_temperature_topk_topp(logits, temperature=1.0, top_k=0, top_p=1.0):
    """`sample_with_temperature_topk_topp`: (token, token_prob, probs) over [B, T]. logits / T (skipped at
    T == 1), top_k then top_p, softmax, one multinomial draw per position over [B*T, V].
    Extension: temperature == 0 is greedy (argmax of the filtered logits; probs = filtered softmax at T=1)."""
    shape = logits.shape[:-1]
    logits = logits.reshape(-1, logits.shape[-1])
    if temperature != 1.0 and temperature != 0:
        logits = logits / temperature
    if top_k > 0:
        logits = top_k_logits(logits, top_k)
    if top_p < 1.0:
        logits = top_p_logits(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    if temperature == 0:
        token = torch.argmax(logits, dim=-1, keepdim=True)
    else:
        token = torch.multinomial(probs, num_samples=1)
    token_prob = torch.gather(probs, -1, token)
    return token.view(*shape), token_prob.view(*shape), probs.view(*shape, -1)


def eb_select(probs, mask_index, eb_threshold):
    """EB-Sampler (Ben-Hamu et al., decoding.md §11.1) for one row: H = entropy of each masked position's
    full predictive distribution (the processed probs used for sampling); sort ascending (stable, ties by
    position); take the largest prefix U with sum(H_U) - max(H_U) <= eb_threshold, at least one position.
    Returns the bool transfer row."""
    entropy = torch.special.entr(probs.float()).sum(-1)           # -sum p log p, 0 log 0 = 0
    idx = mask_index.nonzero().flatten()
    order = torch.sort(entropy[idx], stable=True)
    # For the prefix of the n smallest, sum(H_U) - max(H_U) is the sum of the n - 1 smallest: an exclusive
    # cumulative sum, nondecreasing, so the admissible prefixes are exactly those with excl <= threshold.
    excl = torch.cat([order.values.new_zeros(1), torch.cumsum(order.values, 0)[:-1]])
    n = max(1, int((excl <= eb_threshold).sum()))
    transfer = torch.zeros_like(mask_index)
    transfer[idx[order.indices[:n]]] = True
    return transfer


# --------------------------------------------------------------------------- block sampler

@torch.no_grad()
def sdar_block_diffusion_generate(model, input_ids, mask_id, gen_length=128, block_length=8, denoising_steps=8,
                                  temperature=1.0, top_k=0, top_p=1.0, remasking_strategy='low_confidence_dynamic',
                                  confidence_threshold=0.85, eb_threshold=None, stopping_criteria_idx=None,
                                  counts=None):
    """Mirror of JetAstra/SDAR `block_diffusion_generate` for input_ids [1, P]. Returns (x, nfe): x is the
    whole canvas [1, ceil((P + G) / B) * B] (blocks aligned to position 0, so up to B - 1 tokens beyond
    P + G; undecoded blocks stay MASK after an early stop); nfe counts every model call (prefill, denoising
    and store forwards), and `counts` (a dict, optional) receives them separately.

    Prefill: the P // B full prompt blocks in one store_kv forward. Each later block (the partial prompt
    block first, decoded with its MASKs): up to denoising_steps + 1 iterations; with no MASK left, one
    store_kv forward and stop; else a store_kv=False forward, one sample per block position, and
    - 'sequential': the window [first MASK, first MASK + quota[step]);
    - 'low_confidence_static': top-quota[step] of p(x0) with -inf off the MASKs;
    - 'low_confidence_dynamic': every MASK with p > threshold if at least quota[step] of them, else top-quota.
    As written by the authors, top-quota picks -inf (non-MASK: prompt or committed) positions and rewrites
    them with the fresh sample when quota[step] exceeds the MASKs left (a partial prompt block with
    quota > 1, or the dynamic rule after committing ahead of the schedule); and an index error follows if
    MASKs remain at step == denoising_steps. denoising_steps >= block_length (quotas <= 1) avoids both.
    - 'entropy_bounded': NOT the official branch (it takes the entropy of the scalar p(x0) summed over the
      block and uses an undefined `transfer_index`): the EB-Sampler rule of `eb_select`. It commits at
      least one MASK per step, so a block may need B denoising steps; a block whose loop ends without its
      store forward (denoising_steps < block_length) raises here when a later block would need the cache
      (the authors' loop would go on with a cache missing that block).
    Extension: temperature == 0 is greedy (see sample_with_temperature_topk_topp).
    Stop: after each block, if any id of stopping_criteria_idx appears in x[:, P:].
    """
    assert input_ids.shape[0] == 1, "the authors' sampler takes one prompt"
    device = input_ids.device
    P = input_ids.shape[1]
    num_blocks = (P + gen_length + block_length - 1) // block_length
    total = num_blocks * block_length
    mask = block_causal_mask(total, block_length, device)
    position_ids = torch.arange(total, device=device)[None]
    x = torch.full((1, total), mask_id, dtype=torch.long, device=device)
    x[:, :P] = input_ids
    prefill_blocks = P // block_length
    pl = prefill_blocks * block_length
    if isinstance(stopping_criteria_idx, int):
        stopping_criteria_idx = [stopping_criteria_idx]
    n = dict(prefill=0, denoise=0, store=0)
    cache = None
    if pl > 0:
        _, cache = model(x[:, :pl], mask[:, :pl, :pl], position_ids[:, :pl], past_key_values=cache, store_kv=True)
        n["prefill"] += 1
    quota = get_num_transfer_tokens(block_length, denoising_steps)

    for b in range(prefill_blocks, num_blocks):
        s, e = b * block_length, (b + 1) * block_length
        cur_x = x[:, s:e].clone()
        cur_mask, cur_pos = mask[:, s:e, :e], position_ids[:, s:e]
        stale = False
        for step in range(denoising_steps + 1):
            mask_index = cur_x == mask_id
            if mask_index.sum() == 0:
                _, cache = model(cur_x, cur_mask, cur_pos, past_key_values=cache, store_kv=True)
                n["store"] += 1
                break
            logits, _ = model(cur_x, cur_mask, cur_pos, past_key_values=cache, store_kv=False)
            n["denoise"] += 1
            x0, x0_p, probs = sample_with_temperature_topk_topp(logits, temperature, top_k, top_p)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            if remasking_strategy == 'sequential':
                first = int(mask_index[0].nonzero().min())
                transfer[0, first: first + int(quota[step])] = True
            elif remasking_strategy == 'low_confidence_static':
                confidence = torch.where(mask_index, x0_p, float("-inf"))
                transfer[0, torch.topk(confidence[0], int(quota[step])).indices] = True
            elif remasking_strategy == 'low_confidence_dynamic':
                confidence = torch.where(mask_index, x0_p, float("-inf"))
                high = confidence[0] > confidence_threshold
                if high.sum() >= quota[step]:
                    transfer[0] = high
                else:
                    transfer[0, torch.topk(confidence[0], int(quota[step])).indices] = True
            elif remasking_strategy == 'entropy_bounded':
                transfer[0] = eb_select(probs[0], mask_index[0], eb_threshold)
            else:
                raise ValueError(f"Unknown remasking strategy: {remasking_strategy}")
            cur_x[transfer] = x0[transfer]
        else:
            stale = True          # the loop ran out without its store forward: the cache lacks block b
        x[:, s:e] = cur_x
        if stopping_criteria_idx is not None and any((x[:, P:] == t).any() for t in stopping_criteria_idx):
            break
        if stale and b + 1 < num_blocks:
            raise RuntimeError(f"block {b} got no store forward in {denoising_steps + 1} iterations")
    if counts is not None:
        counts.update(n)
    return x, sum(n.values())


class UncachedSDAR:
    """Test helper: the same calls as RefSDAR, but the "cache" only records the stored token ids and
    positions, and every call recomputes stored + fed tokens from scratch under the block-causal mask.
    Cached decoding must equal decoding through this wrapper."""

    def __init__(self, model, block_length):
        self.model, self.block_length = model, block_length

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values=None, store_kv=False):
        past_ids, past_pos = past_key_values or (input_ids[:, :0], position_ids[:, :0])
        all_ids, pos = torch.cat([past_ids, input_ids], 1), torch.cat([past_pos, position_ids], 1)
        blk = pos[0] // self.block_length
        logits = self.model(all_ids, (blk[:, None] >= blk[None, :])[None], pos)[0][:, -input_ids.shape[1]:]
        return logits, ((all_ids, pos) if store_kv else past_key_values)


if __name__ == "__main__":
    # Self-checks on a tiny random checkpoint (run: python tests/reference_sdar.py).
    import tempfile
    from checkpoints import load_tiny_state_dict, special_token_ids, write_tiny_sdar

    path = write_tiny_sdar(tempfile.mkdtemp(), head_dim=24)          # head_dim != hidden / heads, like SDAR-4B
    cfg, sd = load_tiny_state_dict(path)
    ids, model = special_token_ids(path), RefSDAR(cfg, sd)
    mask_id, B = ids["mask"], cfg["block_size"]
    torch.manual_seed(0)
    x = torch.randint(0, 256, (1, 16))
    pos, bc = torch.arange(16)[None], block_causal_mask(16, B)
    full = model(x, bc, pos)[0]
    # transformers' Qwen3 on the same tensors: its causal default, and the block-causal mask made additive.
    from transformers import Qwen3Config, Qwen3ForCausalLM
    keys = ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers",
            "intermediate_size", "max_position_embeddings", "vocab_size", "rope_theta", "rms_norm_eps",
            "tie_word_embeddings", "attention_bias"]
    hf = Qwen3ForCausalLM(Qwen3Config(**{k: cfg[k] for k in keys}, attn_implementation="eager")).eval()
    hf.load_state_dict(sd, strict=True)
    with torch.no_grad():
        causal = torch.tril(torch.ones(16, 16, dtype=torch.bool))[None]
        assert torch.allclose(hf(x).logits, model(x, causal, pos)[0], atol=1e-5)
        additive = torch.zeros(1, 1, 16, 16).masked_fill(~bc[:, None], torch.finfo(torch.float32).min)
        assert torch.allclose(hf(x, attention_mask=additive).logits, full, atol=1e-5)
    # Cache: prefill 2 blocks (store), block 3 without storing, store it, block 4: equal to the full forward.
    _, cache = model(x[:, :8], bc[:, :8, :8], pos[:, :8], store_kv=True)
    logits, same = model(x[:, 8:12], bc[:, 8:12, :12], pos[:, 8:12], past_key_values=cache, store_kv=False)
    assert same is cache and len(cache) == cfg["num_hidden_layers"] and cache[0][0].shape[2] == 8
    assert torch.allclose(logits, full[:, 8:12], atol=1e-5)
    _, cache = model(x[:, 8:12], bc[:, 8:12, :12], pos[:, 8:12], past_key_values=cache, store_kv=True)
    assert torch.allclose(model(x[:, 12:], bc[:, 12:, :16], pos[:, 12:], past_key_values=cache)[0], full[:, 12:], atol=1e-5)
    # Generation: cached == recomputed without cache, for every strategy, sampled and greedy; nfe accounting.
    uncached = UncachedSDAR(model, B)
    for P in (8, 6, 3):                                              # block multiple, partial block, no prefill
        prompt = x[:, :P]
        for strategy, eb in (("sequential", None), ("low_confidence_static", None), ("low_confidence_dynamic", None),
                             ("entropy_bounded", 0.0), ("entropy_bounded", 1.0), ("entropy_bounded", 1e9)):
            for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 5, 0.9), (0.0, 0, 1.0)):
                kw = dict(gen_length=12, block_length=B, denoising_steps=B, temperature=temperature, top_k=top_k,
                          top_p=top_p, remasking_strategy=strategy, confidence_threshold=0.3, eb_threshold=eb)
                counts = {}
                torch.manual_seed(1)
                out, nfe = sdar_block_diffusion_generate(model, prompt, mask_id, counts=counts, **kw)
                torch.manual_seed(1)
                want, nfe_u = sdar_block_diffusion_generate(uncached, prompt, mask_id, **kw)
                assert torch.equal(out, want) and nfe == nfe_u and torch.equal(out[:, :P], prompt)
                assert out.shape[1] == -(-(P + 12) // B) * B and (out != mask_id).all()
                decoded = out.shape[1] // B - P // B
                assert counts["prefill"] == int(P >= B) and counts["store"] == decoded
                if strategy in ("sequential", "low_confidence_static") or (eb == 0.0 and top_p == 1.0):
                    assert counts["denoise"] == out.shape[1] - P                    # one MASK per step
                if eb == 1e9:                                                       # a whole block per step
                    assert counts["denoise"] == decoded
    # Greedy, sequential: the first committed token is the argmax at its position over the all-MASK block.
    out, _ = sdar_block_diffusion_generate(model, x[:, :4], mask_id, gen_length=4, block_length=B, denoising_steps=B,
                                           temperature=0.0, remasking_strategy="sequential")
    canvas = torch.cat([x[:, :4], torch.full((1, 4), mask_id)], dim=1)
    assert out[0, 4] == model(canvas, bc[:, :8, :8], pos[:, :8])[0][0, 4].argmax()
    # Stop ids: generation ends after the first block containing one; later blocks stay MASK.
    out, nfe = sdar_block_diffusion_generate(model, x[:, :8], mask_id, gen_length=16, block_length=B,
                                             denoising_steps=B, stopping_criteria_idx=list(range(256)))
    assert (out[:, 12:] == mask_id).all() and nfe == 1 + B + 1
    print("reference_sdar self-checks passed")

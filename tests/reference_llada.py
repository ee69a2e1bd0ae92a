"""Independent reference oracle for LLaDA: forward pass, official sampler, Fast-dLLM samplers.

Written only from the published algorithms, never from the runtime packages (dllm, decoding, cache),
so the runtime can be checked against it. Functions mirror, line by line in behaviour:

- `RefLLaDA`: the LLaDALlamaBlock forward of GSAI-ML LLaDA-8B `modeling_llada.py` as patched by
  NVlabs/Fast-dLLM `llada/model/modeling_llada.py` (past_key_values, replace_position), plus a
  key-padding attention mask with raw positions (models.md §1.3).
- `llada_generate`: ML-GSAI/LLaDA `generate.py::generate` @ b7e6c35 (decoding.md §2).
- `fastdllm_generate`, `fastdllm_generate_with_prefix_cache`, `fastdllm_generate_with_dual_cache`:
  NVlabs/Fast-dLLM `llada/generate.py` @ f6b35ec3 `generate`, `generate_with_prefix_cache`,
  `generate_with_dual_cache`, with `get_transfer_index` (threshold) and `get_transfer_index_dynamic`
  (factor) (decoding.md §4, caches.md §1-2). Random-number draws happen in the same order and with
  the same shapes and dtypes as in the authors' code, so seeded runs at temperature > 0 match it.

All prompts in a batch must have the same length (no padding) for the Fast-dLLM functions.
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


# --------------------------------------------------------------------------- model

class RefLLaDA:
    """Plain-math LLaDA forward. `config` holds LLaDA config.json fields; `state_dict` uses LLaDA's
    real names (model.transformer.wte.weight, model.transformer.blocks.N.q_proj.weight, ...)."""

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor]):
        self.d_model = config["d_model"]
        self.n_heads = config["n_heads"]
        self.n_kv_heads = config.get("n_kv_heads") or config["n_heads"]
        self.n_layers = config["n_layers"]
        self.head_dim = self.d_model // self.n_heads
        self.rope_theta = float(config.get("rope_theta", 10000.0))
        self.eps = float(config.get("rms_norm_eps", 1e-5))
        self.w = {k.removeprefix("model.transformer."): v for k, v in state_dict.items()}
        # With weight_tying the LM head is the embedding matrix.
        self.head = self.w["wte.weight"] if config.get("weight_tying") else self.w["ff_out.weight"]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # RMSLayerNorm: upcast to fp32, x * rsqrt(mean(x^2) + eps), cast back, then times weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    def rope(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # NeoX rotate-half RoPE, inv_freq = 1/theta^(arange(0,d,2)/d), all in fp32 (rope_full_precision).
        d = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=t.device) / d))
        freqs = positions.float()[:, None] * inv_freq[None, :]          # [T, d/2]
        angles = torch.cat([freqs, freqs], dim=-1)                       # [T, d]
        tf = t.float()
        x1, x2 = tf[..., : d // 2], tf[..., d // 2:]
        rotated = torch.cat([-x2, x1], dim=-1)
        return (tf * angles.cos() + rotated * angles.sin()).to(t.dtype)

    def __call__(self, input_ids, attention_mask=None, past_key_values=None, replace_position=None):
        """Returns (logits [B, T, V], present) with present[layer] = (k_preRoPE, v) of shape
        [B, n_kv_heads, key_len, head_dim] for the full key sequence.

        - attention_mask: [B, key_len] 0/1 key-padding mask (0 = key excluded); positions are raw.
        - past_key_values without replace_position (prefix cache): new K/V are appended after the
          past; queries get positions [key_len - T, key_len).
        - with replace_position ([B, L] or [L] bool, same row for all batch items; dual cache): the
          fed tokens' K/V overwrite the past at the marked indices (a copy; the caller's cache is
          not modified) and queries get positions [block_end - T, block_end), block_end = last
          marked index + 1.
        """
        B, T = input_ids.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        x = self.w["wte.weight"][input_ids]
        present = []
        for n in range(self.n_layers):
            p = f"blocks.{n}."
            h = self.rms_norm(x, self.w[p + "attn_norm.weight"])
            q = (h @ self.w[p + "q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
            k = (h @ self.w[p + "k_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
            v = (h @ self.w[p + "v_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
            block_end = None
            if past_key_values is not None:
                past_k, past_v = past_key_values[n]
                if replace_position is None:
                    k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                else:
                    rp = replace_position if replace_position.dim() == 1 else replace_position[0]
                    idx = rp.nonzero().flatten()
                    k_all, v_all = past_k.clone(), past_v.clone()
                    k_all[:, :, idx], v_all[:, :, idx] = k, v
                    k, v = k_all, v_all
                    block_end = int(idx.max()) + 1
            present.append((k, v))                       # cached BEFORE RoPE
            key_len = k.shape[2]
            q_end = key_len if block_end is None else block_end
            q = self.rope(q, torch.arange(q_end - T, q_end, device=q.device))
            k = self.rope(k, torch.arange(key_len, device=k.device))
            if KV != H:                                  # GQA
                k = k.repeat_interleave(H // KV, dim=1)
                v = v.repeat_interleave(H // KV, dim=1)
            # Explicit attention in fp32: softmax(q k^T / sqrt(d) + bias) v.
            scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(hd)
            if attention_mask is not None:
                keep = attention_mask.to(torch.float32)[:, None, None, :]
                scores = scores + (1.0 - keep) * torch.finfo(torch.float32).min
            att = (torch.softmax(scores, dim=-1) @ v.float()).to(x.dtype)
            att = att.transpose(1, 2).reshape(B, T, H * hd)
            x = x + att @ self.w[p + "attn_out.weight"].T
            # MLP: ff_out(silu(ff_proj(n)) * up_proj(n)), n = ff_norm(x).
            h = self.rms_norm(x, self.w[p + "ff_norm.weight"])
            gate = torch.nn.functional.silu(h @ self.w[p + "ff_proj.weight"].T)
            x = x + (gate * (h @ self.w[p + "up_proj.weight"].T)) @ self.w[p + "ff_out.weight"].T
        logits = self.rms_norm(x, self.w["ln_f.weight"]) @ self.head.T   # no shift, no scaling
        return logits, present


# --------------------------------------------------------------------------- shared primitives

def add_gumbel_noise(logits, temperature):
    """LLaDA `add_gumbel_noise`: float64 exp(logits) / (-log U)^T; the same tensor at T == 0."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


def get_num_transfer_tokens(block_mask_index, steps):
    """LLaDA `get_num_transfer_tokens`: n // S per step, first n % S steps get one more. [B, S]."""
    n = block_mask_index.sum(dim=1)
    quota = torch.zeros(n.shape[0], steps, dtype=torch.int64, device=n.device) + (n // steps)[:, None]
    for row in range(n.shape[0]):
        quota[row, : int(n[row] % steps)] += 1
    return quota


def _topk_commit(transfer, row, confidence_row, k):
    """Mark the k highest-confidence positions of one row (torch.topk, as the authors do)."""
    if k > 0:
        transfer[row, torch.topk(confidence_row, k=k).indices] = True


# --------------------------------------------------------------------------- official LLaDA

@torch.no_grad()
def llada_generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128,
                   temperature=0., cfg_scale=0., remasking='low_confidence', mask_id=126336,
                   eos_id=126081, eot_id=126348, logits_eos_inf=False, confidence_eos_eot_inf=False):
    """Mirror of ML-GSAI/LLaDA generate.py::generate. Returns the canvas x [B, P + gen_length]."""
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    if attention_mask is not None:   # left padding: ones over the generation region
        attention_mask = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype,
                                                               device=attention_mask.device)], dim=-1)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks

    for b in range(num_blocks):
        block_end = P + (b + 1) * block_length
        quota = get_num_transfer_tokens(x[:, block_end - block_length: block_end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0.:
                # Unconditional copy: prompt positions set to MASK; one forward at 2x batch.
                # (The authors' code raises NameError here when attention_mask is None; we pass None.)
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                am = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
                cond, uncond = torch.chunk(model(torch.cat([x, un_x], dim=0), attention_mask=am)[0], 2, dim=0)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x, attention_mask=attention_mask)[0]
            if logits_eos_inf:
                logits[:, :, eos_id] = NEG_INF
            logits_with_noise = add_gumbel_noise(logits, temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if confidence_eos_eot_inf:
                # The authors' chained assignment `lwn[:,:,eos] = logits[:,:,eot] = -inf`:
                # left target first, then right. At T == 0 lwn IS logits, so both ids hit `logits`;
                # at T > 0 only eot reaches `logits` (the one used for confidence below).
                logits_with_noise[:, :, eos_id] = NEG_INF
                logits[:, :, eot_id] = NEG_INF
            if remasking == 'low_confidence':
                p = torch.softmax(logits, dim=-1)       # in the logits' own dtype here
                x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            elif remasking == 'random':
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, block_end:] = NEG_INF               # nothing right of the current block
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, NEG_INF)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(B):
                _topk_commit(transfer, row, confidence[row], int(quota[row, i]))
            x[transfer] = x0[transfer]
    return x


# --------------------------------------------------------------------------- Fast-dLLM

def _select(logits, temperature, remasking, mask_index, x, quota, threshold, factor):
    """Fast-dLLM `get_transfer_index` (quota or threshold) / `get_transfer_index_dynamic` (factor).
    mask_index marks the selectable positions (MASKs of the current block). Returns (x0, transfer)."""
    x0 = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)
    if remasking == 'low_confidence':
        p = torch.softmax(logits.to(torch.float64), dim=-1)   # float64 in Fast-dLLM
        x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
    elif remasking == 'random':
        x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
    else:
        raise NotImplementedError(remasking)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, NEG_INF)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    for row in range(x0.shape[0]):
        m = int(mask_index[row].sum())
        if factor is not None:
            # get_transfer_index_dynamic: thresholds 1 - f/(n+1), n = 1..m, the first forced to -1;
            # cut = first failing 0-based index (m - 1 if none fails); bump 0 or m-1 by one.
            if m == 0:
                continue                                   # a row with no masks commits nothing
            conf_sorted = torch.sort(confidence[row][mask_index[row]], descending=True).values
            thresholds = [-1.0] + [1 - factor / (n + 1) for n in range(2, m + 1)]
            cut = next((i for i in range(m) if conf_sorted[i] < thresholds[i]), m - 1)
            if cut == 0 or cut == m - 1:
                cut += 1
            _topk_commit(transfer, row, confidence[row], cut)
        elif threshold is not None:
            # Rank all m masked positions; rank 0 always commits, others iff conf >= threshold.
            if m == 0:
                continue
            ranked = torch.topk(confidence[row], k=m).indices
            transfer[row, ranked[0]] = True
            for pos in ranked[1:]:
                if confidence[row, pos] >= threshold:
                    transfer[row, pos] = True
        else:
            _topk_commit(transfer, row, confidence[row], int(quota[row]))
    return x0, transfer


def _setup(prompt, steps, gen_length, block_length, mask_id):
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    return x, P, num_blocks, steps // num_blocks


def _quota_at(quota, i, threshold, factor):
    return quota[:, i] if threshold is None and factor is None else None


def _block_start_step(model, x, e, quota, temperature, remasking, mask_id, threshold, factor):
    """Step 0 of a cached block: full forward, decode from its logits, return the K/V (present)."""
    logits, present = model(x)
    mask_index = x == mask_id
    mask_index[:, e:] = False
    x0, transfer = _select(logits, temperature, remasking, mask_index, x,
                           _quota_at(quota, 0, threshold, factor), threshold, factor)
    x[transfer] = x0[transfer]
    return present


@torch.no_grad()
def fastdllm_generate(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.,
                      remasking='low_confidence', mask_id=126336, threshold=None, factor=None):
    """Mirror of Fast-dLLM llada/generate.py::generate (no cache). Returns (x, nfe)."""
    x, P, num_blocks, spb = _setup(prompt, steps, gen_length, block_length, mask_id)
    nfe = 0
    for b in range(num_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        quota = get_num_transfer_tokens(x[:, s:e] == mask_id, spb)
        i = 0
        while True:                                      # one full forward per step
            nfe += 1
            mask_index = x == mask_id
            logits = model(x)[0]
            mask_index[:, e:] = False
            x0, transfer = _select(logits, temperature, remasking, mask_index, x,
                                   _quota_at(quota, i, threshold, factor), threshold, factor)
            x[transfer] = x0[transfer]
            i += 1
            if (x[:, s:e] == mask_id).sum() == 0:        # batch-wide check, as in the authors' code
                break
    return x, nfe


@torch.no_grad()
def fastdllm_generate_with_prefix_cache(model, prompt, steps=128, gen_length=128, block_length=128,
                                        temperature=0., remasking='low_confidence', mask_id=126336,
                                        threshold=None, factor=None):
    """Mirror of Fast-dLLM generate_with_prefix_cache. Returns (x, nfe)."""
    x, P, num_blocks, spb = _setup(prompt, steps, gen_length, block_length, mask_id)
    nfe = 0
    for b in range(num_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        quota = get_num_transfer_tokens(x[:, s:e] == mask_id, spb)
        # Step 0: full forward; decode from its logits; keep the K/V of [0, s) only.
        present = _block_start_step(model, x, e, quota, temperature, remasking, mask_id, threshold, factor)
        prefix = [(k[:, :, :s], v[:, :, :s]) for k, v in present]
        nfe += 1
        i = 1
        while (x[:, s:e] == mask_id).sum() != 0:
            nfe += 1
            mask_index = x[:, s:] == mask_id
            mask_index[:, block_length:] = False
            # Feed x[:, s:] (block + all later MASKs) against the frozen prefix cache.
            logits = model(x[:, s:], past_key_values=prefix)[0]
            add_gumbel_noise(logits, temperature)        # unused draw kept from the authors' code (RNG)
            x0, transfer = _select(logits, temperature, remasking, mask_index, x[:, s:],
                                   _quota_at(quota, i, threshold, factor), threshold, factor)
            x[:, s:][transfer] = x0[transfer]
            i += 1
    return x, nfe


@torch.no_grad()
def fastdllm_generate_with_dual_cache(model, prompt, steps=128, gen_length=128, block_length=128,
                                      temperature=0., remasking='low_confidence', mask_id=126336,
                                      threshold=None, factor=None):
    """Mirror of Fast-dLLM generate_with_dual_cache. Returns (x, nfe)."""
    x, P, num_blocks, spb = _setup(prompt, steps, gen_length, block_length, mask_id)
    nfe = 0
    for b in range(num_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        quota = get_num_transfer_tokens(x[:, s:e] == mask_id, spb)
        # Step 0: full forward caching K/V of ALL positions (prefix and MASK suffix).
        cache = _block_start_step(model, x, e, quota, temperature, remasking, mask_id, threshold, factor)
        nfe += 1
        replace_position = torch.zeros_like(x, dtype=torch.bool)
        replace_position[:, s:e] = True
        i = 1
        while (x[:, s:e] == mask_id).sum() != 0:
            nfe += 1
            mask_index = x[:, s:e] == mask_id
            # Feed only the block; its K/V replace the cache at [s, e) (the rest stays frozen).
            logits = model(x[:, s:e], past_key_values=cache, replace_position=replace_position)[0]
            x0, transfer = _select(logits, temperature, remasking, mask_index, x[:, s:e],
                                   _quota_at(quota, i, threshold, factor), threshold, factor)
            x[:, s:e][transfer] = x0[transfer]
            i += 1
    return x, nfe


if __name__ == "__main__":
    # Self-checks on a tiny random checkpoint (run: python tests/reference_llada.py).
    import tempfile
    from checkpoints import load_tiny_state_dict, special_token_ids, write_tiny_llada

    path = write_tiny_llada(tempfile.mkdtemp(), n_kv_heads=2)
    ids, model = special_token_ids(path), RefLLaDA(*load_tiny_state_dict(path))
    torch.manual_seed(0)
    x = torch.randint(0, 250, (2, 24))
    x[:, 12:] = ids["mask"]
    full, present = model(x)
    # With an unchanged canvas, both caches reproduce the full forward exactly.
    prefix = [(k[:, :, :12], v[:, :, :12]) for k, v in present]
    assert torch.allclose(model(x[:, 12:], past_key_values=prefix)[0], full[:, 12:], atol=1e-5)
    rp = torch.zeros_like(x, dtype=torch.bool)
    rp[:, 12:16] = True
    assert torch.allclose(model(x[:, 12:16], past_key_values=present, replace_position=rp)[0], full[:, 12:16], atol=1e-5)
    # Left padding + key mask: RoPE is relative, so real tokens see the same logits as unpadded.
    padded = torch.cat([torch.full((2, 3), ids["pad"]), x], dim=1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(x)], dim=1)
    assert torch.allclose(model(padded, attention_mask=mask)[0][:, 3:], full, atol=1e-4)
    prompt, kw = x[:, :12], dict(steps=16, gen_length=16, block_length=8, mask_id=ids["mask"])
    out = llada_generate(model, prompt, eos_id=ids["eos"], eot_id=ids["eot"], **kw)
    assert (out != ids["mask"]).all()
    for fn in (fastdllm_generate, fastdllm_generate_with_prefix_cache, fastdllm_generate_with_dual_cache):
        for th, fc in ((None, None), (0.5, None), (None, 1.0)):
            out, nfe = fn(model, prompt, threshold=th, factor=fc, **kw)
            assert (out != ids["mask"]).all() and (nfe == 16 if th is None and fc is None else 2 <= nfe <= 16)
            print(f"{fn.__name__:40s} threshold={th} factor={fc} nfe={nfe}")
    print("reference_llada self-checks passed")

"""GPU checks (run on an accelerator only; skipped elsewhere), on the bundled zoo models:

- the graph path (CUDA graphs replayed by the runner) emits exactly the eager path's tokens
  (`enforce_eager=True`, the same kernels launched one by one) for every strategy x cache of every family, in
  bfloat16 and float32, with batches padded to their bucket (3 rows -> 4) and rows finishing early;
- in float32 a row of a padded batch gets the tokens it gets alone, and CUDA matches the CPU;
- the fused kernels match their eager definitions on the device;
- the step scheduler's merged forwards, graphed, give each request its tokens alone (float32).
"""
from __future__ import annotations

import pytest
import torch

from dllm import LLM, SamplingParams
from dllm.cache import CACHES

pytestmark = pytest.mark.gpu

STRATEGIES = ("reference", "threshold", "factor")
FAMILIES = {"tiny-llada": "llada", "tiny-dream": "dream", "tiny-sdar": "sdar"}


def _caches(family: str) -> list[str]:
    attention = "block_causal" if family == "sdar" else "full"
    return [name for name, cls in CACHES.items() if attention in cls.attentions]


def _messages(n: int = 3) -> list[list[dict]]:
    from dllm.eval.tasks import get_task
    from dllm.eval.tasks.chat import to_messages
    return [to_messages(p) for p in get_task("arith").generate("test", n)]


def _params(family: str, strategy: str) -> SamplingParams:
    if family == "sdar":
        steps = {"steps": 4} if strategy == "reference" else {}
        return SamplingParams(max_tokens=48, block_length=4, temperature=0, **steps)
    return SamplingParams(max_tokens=64, block_length=16, temperature=0)


_LLMS: dict = {}


def _llm(model: str, cache: str, strategy: str, dtype: str, eager: bool) -> LLM:
    key = (model, cache, strategy, dtype, eager)
    if key not in _LLMS:
        _LLMS.clear() if len(_LLMS) > 8 else None
        _LLMS[key] = LLM(model, cache=cache, strategy=strategy, device="cuda", dtype=dtype, enforce_eager=eager)
    return _LLMS[key]


CASES = [(m, c, s) for m, f in FAMILIES.items() for c in _caches(f) for s in STRATEGIES]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("model,cache,strategy", CASES)
def test_graphs_emit_the_eager_tokens(model, cache, strategy, dtype):
    family = FAMILIES[model]
    sp = _params(family, strategy)
    messages = _messages()
    graph = _llm(model, cache, strategy, dtype, eager=False)
    # twice: the first run captures (second use of each shape), the second replays every shape
    graph.chat(messages, sp)
    got = [o.token_ids for o in graph.chat(messages, sp)]
    want = [o.token_ids for o in _llm(model, cache, strategy, dtype, eager=True).chat(messages, sp)]
    assert got == want
    if cache != "elastic":   # Elastic-Cache plans have per-layer hooks: they always run eagerly
        assert graph.engine.runner.stats()["graphs"] > 0


@pytest.mark.parametrize("model,cache", [("tiny-llada", "dual"), ("tiny-llada", "dkv"), ("tiny-llada", "none"),
                                         ("tiny-dream", "dual"), ("tiny-sdar", "block")])
def test_graphed_merged_forwards_give_each_request_its_tokens_alone_in_float32(model, cache):
    """Staggered arrivals through the step scheduler with graphs on: cohorts' forwards of one shape run as one
    graphed call over the pool's rows (filler rows between them), twice so the second pass replays the captured
    merged graphs, and every request gets the tokens it gets alone."""
    from test_scheduler import staggered_arrivals

    llm = LLM(model, cache=cache, strategy="reference", device="cuda", dtype="float32",
              max_batch_size=6)
    for _ in range(2):
        results = staggered_arrivals(llm, model == "tiny-sdar")
        for rid, (prompt, params, output) in results.items():
            assert output.outputs[0].token_ids == llm.generate([prompt], params)[0].outputs[0].token_ids, rid
    assert any(key[-1] for key in llm.engine.runner.graphs), "no merged forward was captured"


@pytest.mark.parametrize("model", list(FAMILIES))
def test_padded_rows_get_their_tokens_alone_in_float32(model):
    family = FAMILIES[model]
    cache = "block" if family == "sdar" else "dual"
    llm = _llm(model, cache, "threshold", "float32", eager=False)
    sp = _params(family, "threshold")
    messages = _messages(3)
    batch = [o.token_ids for o in llm.chat(messages, sp)]
    batch = [o.token_ids for o in llm.chat(messages, sp)]
    alone = [llm.chat([m], sp)[0].token_ids for m in messages]
    assert batch == alone


@pytest.mark.parametrize("model,cache", [("tiny-llada", "dual"), ("tiny-dream", "dual"), ("tiny-sdar", "block")])
def test_cuda_matches_cpu_in_float32(model, cache):
    """The device's kernels (rotary with the K/V store and q/k norms, fused norms) against the CPU's eager ops."""
    sp = SamplingParams(max_tokens=32, block_length=8 if model != "tiny-sdar" else 4, temperature=0)
    messages = _messages(3)
    cpu = LLM(model, cache=cache, strategy="threshold", device="cpu", dtype="float32").chat(messages, sp)
    gpu = LLM(model, cache=cache, strategy="threshold", device="cuda", dtype="float32").chat(messages, sp)
    assert [o.token_ids for o in cpu] == [o.token_ids for o in gpu]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8)])
def test_prepared_masks_attend_as_boolean_masks_on_the_device(dtype, heads, kv_heads):
    """The mask a forward prepares once (additive, stacked for grouped heads) against the boolean mask SDPA
    converts itself, on whichever kernel the device picks (cuDNN for bf16 on Hopper), with a long left padding
    (whole tiles of hidden keys before the first visible one) and keys hidden past each row's end."""
    from dllm.attention import attend, prepare_mask
    g = torch.Generator(device="cuda").manual_seed(0)
    b, lq, lk, d = 4, 8, 640, 128
    q = torch.randn(b, lq, heads, d, device="cuda", generator=g).to(dtype).transpose(1, 2).contiguous()
    k, v = (torch.randn(b, kv_heads, lk, d, device="cuda", generator=g).to(dtype) for _ in range(2))
    cols = torch.arange(lk, device="cuda")
    pad = torch.tensor([0, 130, 300, 500], device="cuda")[:, None]
    end = torch.tensor([600, 520, 640, 560], device="cuda")[:, None]
    mask = ((cols >= pad) & (cols < end))[:, None, None, :].expand(b, 1, lq, lk).clone()
    mask[:, :, :, 505:510] &= torch.rand(b, 1, lq, 5, device="cuda", generator=g) > 0.5   # rows differ
    got = attend(q, k, v, prepare_mask(mask, heads // kv_heads, lq, dtype))
    want = attend(q, k, v, mask)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want) if dtype == torch.float32 else (got.float() - want.float()).abs().max() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_match_eager_definitions_on_the_device(dtype):
    from dllm import ops
    assert ops.triton is not None
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(5, 7, 4096, device="cuda", generator=g).to(dtype)
    d = torch.randn(5, 7, 4096, device="cuda", generator=g).to(dtype)
    w = torch.randn(4096, device="cuda", generator=g).to(dtype)
    for weight_fp32 in (False, True):
        total, normed = ops.add_rms_norm(x, d, w, 1e-5, weight_fp32)
        assert torch.equal(total, x + d)
        want = ops.rms_norm_eager(x + d, w, 1e-5, weight_fp32).float()
        assert ((normed.float() - want).norm() / want.norm()).item() < (1e-6 if dtype == torch.float32 else 1e-2)
    gu = torch.randn(3, 9, 2 * 1000, device="cuda", generator=g).to(dtype)
    gate, up = gu.chunk(2, -1)
    want = (torch.nn.functional.silu(gate) * up).float()
    assert ((ops.silu_mul(gu).float() - want).norm() / want.norm()).item() < 1e-5
    cos, sin = ops.rope_table(512, 128, 10000.0, torch.device("cuda"))
    qkv = torch.randn(2, 33, 8 + 2 + 2, 128, device="cuda", generator=g).to(dtype)
    q, k = qkv[:, :, :8], qkv[:, :, 8:10]
    pos = torch.randint(0, 512, (2, 33), device="cuda", generator=g)
    for full in (True, False):
        qr, kr = ops.rope(q, k, pos, cos, sin, full)
        c, s = cos[pos][:, :, None], sin[pos][:, :, None]
        assert torch.equal(qr, ops.rope_eager(q, c, s, full)) and torch.equal(kr, ops.rope_eager(k, c, s, full))
        # the rotated keys and the values straight into K/V buffers at per-row columns (the runner's form)
        v = qkv[:, :, 10:]
        columns = torch.stack([torch.randperm(600, device="cuda", generator=g)[:33] for _ in range(2)])
        kb = torch.randn(2, 2, 600, 128, device="cuda", generator=g).to(dtype)
        vb = torch.randn(2, 2, 600, 128, device="cuda", generator=g).to(dtype)
        want_kb, want_vb = kb.clone(), vb.clone()
        ops.store_kv(want_kb, want_vb, columns, ops.rope_eager(k, c, s, full).transpose(1, 2), v.transpose(1, 2))
        for head_major in (False, True):
            got = ops.rope_store(q, k, v, pos, cos, sin, full, None, kb, vb, columns, head_major)
            assert torch.equal(got, qr) and (got.transpose(1, 2) if head_major else got).is_contiguous()
            assert torch.equal(kb, want_kb) and torch.equal(vb, want_vb)
        for weight_fp32 in (False, True):   # q/k norms fused into the rotary kernel vs the two kernels apart
            qw = torch.randn(128, device="cuda", generator=g).to(dtype)
            kw = torch.randn(128, device="cuda", generator=g).to(dtype)
            qr, kr = ops.rope(q, k, pos, cos, sin, full, (qw, kw, 1e-6, weight_fp32))
            wq, wk = ops.rope(ops.rms_norm(q, qw, 1e-6, weight_fp32), ops.rms_norm(k, kw, 1e-6, weight_fp32),
                              pos, cos, sin, full)
            for got, want in ((qr, wq), (kr, wk)):   # equal but for the order of a float32 sum of squares
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                if dtype == torch.float32:            # (which moves most float32 results by an ulp or so)
                    assert err < 1e-6, err
                else:                                 # (which a bf16 rounding hides almost always)
                    assert err < 1e-3 and (got == want).float().mean().item() > 0.98


@pytest.mark.parametrize("family", ["ar", "tidar"])  # deterministic objectives (no noise draws)
def test_training_gradients_on_the_device_match_the_cpu(family):
    """The fused kernels have no backward: a training forward on CUDA must take the eager ops, so its gradients
    are the CPU's (float32). Before this held, GPU training silently left every layer below a kernel untrained."""
    from dllm.models.core import Transformer
    from dllm.train.data import Batch
    from dllm.train.objectives import OBJECTIVES
    from dllm.train.trainer import TrainConfig, _init, arch_for
    cfg = TrainConfig(family=family, out="unused", tokenizer="unused", hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=128, seq_len=24)
    grads = []
    for device in ("cpu", "cuda"):
        model = Transformer(arch_for(cfg, 128))
        _init(model, 0)                       # on the CPU (its generator is the model's device's), then moved
        model.to(device)
        ids = torch.randint(4, 128, (3, 24), generator=torch.Generator().manual_seed(1)).to(device)
        batch = Batch(ids=ids, prompt_len=torch.tensor([5, 8, 3], device=device),
                      answer_len=torch.tensor([19, 16, 21], device=device))
        loss = OBJECTIVES[family](model, batch, 1, **cfg.objective_options)
        loss.backward()
        grads.append({n: p.grad.cpu() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        err = ((grads[1][name] - g).norm() / g.norm().clamp(min=1e-12)).item()
        assert err < 1e-4, (name, err, g.norm().item(), grads[1][name].norm().item())

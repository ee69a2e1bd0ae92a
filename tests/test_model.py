"""Model core and LLaDA loading: logits equal a plain reference computation, both checkpoint layouts load, the
real LLaDA-8B config and weight index map onto the core exactly."""
from __future__ import annotations

import json

import pytest
import torch

from dllm.cache.base import CachePolicy
from dllm.canvas import Canvas
from dllm.models import load_model
from dllm.models.core import Transformer
from dllm.models.registry import adapter_for


def _logits(loaded, ids, key_valid=None, positions=None):
    n = ids.shape[1]
    positions = torch.arange(n).expand_as(ids) if positions is None else positions
    mask = None if key_valid is None else key_valid[:, None, None, :]

    class Plan:  # full attention with key padding, no cache
        attn_mask = mask

        @staticmethod
        def kv(layer, k, v):
            return k, v
    return loaded.model(ids, positions, Plan())


def test_logits_match_plain_reference(tiny_llada, ref_model):
    loaded = load_model(tiny_llada, device="cpu", dtype="float32")
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    want, _ = ref_model(ids)
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=1e-4, atol=1e-4)


def test_padded_logits_match_reference_on_real_tokens(tiny_llada, ref_model):
    """Left padding with a key-padding mask: real tokens see what they would see unpadded (RoPE is relative,
    so skipping pad positions changes nothing on them)."""
    loaded = load_model(tiny_llada, device="cpu", dtype="float32")
    spec = loaded.spec
    rows = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
    canvas = Canvas(rows, max_tokens=4, block_length=4, spec=spec, device=torch.device("cpu"))
    got = _logits(loaded, canvas.tokens, canvas.key_valid, canvas.positions)
    for i, row in enumerate(rows):
        alone, _ = ref_model(canvas.tokens[i:i + 1, canvas.gen_start - len(row):])
        torch.testing.assert_close(got[i:i + 1, canvas.gen_start - len(row):], alone, rtol=1e-4, atol=1e-4)


def test_sharded_and_single_file_checkpoints_load_identically(tiny_llada, tiny_llada_sharded):
    index = json.loads((tiny_llada_sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    a = load_model(tiny_llada, device="cpu").model.state_dict()
    b = load_model(tiny_llada_sharded, device="cpu").model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                            ("float32", torch.float32), ("auto", torch.float32)])
def test_dtypes(tiny_llada, dtype, expected):
    loaded = load_model(tiny_llada, device="cpu", dtype=dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {expected}
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(_logits(loaded, ids).float()).all()


def test_spec_comes_from_the_checkpoint(tiny_llada):
    spec = load_model(tiny_llada, device="cpu").spec
    cfg = json.loads((tiny_llada / "config.json").read_text())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llada))
    assert spec.mask_id == cfg["mask_token_id"]
    assert set(spec.stop_ids) == {cfg["eos_token_id"], tok.convert_tokens_to_ids("<|eot_id|>")}
    assert spec.pad_id == cfg["pad_token_id"] and spec.max_length == cfg["max_sequence_length"]


def test_real_llada_8b_config_and_weight_index_map_onto_the_core(real_checkpoints):
    """Every tensor of the real LLaDA-8B-Instruct index maps to a core parameter of the right count, and the
    parameter count equals the index's byte size at 2 bytes a parameter."""
    ckpt = real_checkpoints / "LLaDA-8B-Instruct"
    cfg = json.loads((ckpt / "config.json").read_text())
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    adapter = adapter_for(cfg)
    arch = adapter.arch_config(cfg)
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (4096, 32, 32, 32, 128)
    assert (arch.intermediate_size, arch.vocab_size, arch.rope_theta, arch.rms_norm_eps) == (12288, 126464, 500000.0, 1e-5)
    assert arch.num_parameters * 2 == index["metadata"]["total_size"]
    with torch.device("meta"):
        params = dict(Transformer(arch).named_parameters())
    mapped = [adapter.map_name(n) for n in index["weight_map"]]
    assert None not in mapped
    assert sorted(mapped) == sorted(params)


def test_cache_buffers_hold_the_real_shape(real_checkpoints):
    cfg = json.loads((real_checkpoints / "LLaDA-8B-Instruct/config.json").read_text())
    arch = adapter_for(cfg).arch_config(cfg)
    from dllm.models.spec import ModelSpec
    policy = CachePolicy()
    spec = ModelSpec(family="llada", mask_id=1, stop_ids=(2,), pad_id=2)
    policy.allocate(2, 16, arch, spec, torch.bfloat16, torch.device("meta"))
    assert len(policy.buffers.k) == 32 and policy.buffers.k[0].shape == (2, 32, 16, 128)

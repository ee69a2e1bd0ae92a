"""The real checkpoints' metadata (configs, weight indexes, tokenizer configs in tests/data; no weights): every family's
config and tensor names map onto the core exactly, ids come from the checkpoint, and what cannot load says why."""
from __future__ import annotations

import json

import pytest
import torch

from checkpoints import with_stand_in_vocab

from dllm import LLM
from dllm.errors import ModelNotFoundError, UnsupportedModelError
from dllm.models.core import Transformer
from dllm.models.loader import load_tokenizer
from dllm.models.registry import adapter_for

CHECKPOINTS = {
    "LLaDA-8B-Instruct": ("llada", (4096, 32, 32, 32, 128)),
    "Dream-v0-Instruct-7B": ("dream", (3584, 28, 28, 4, 128)),
    "SDAR-4B-Chat": ("sdar", (2560, 36, 32, 8, 128)),
    "SDAR-8B-Chat": ("sdar", (4096, 36, 32, 8, 128)),
}


def _read(ckpt, name):
    return json.loads((ckpt / name).read_text())


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_config_and_weight_index_map_onto_the_core(real_checkpoints, name):
    family, dims = CHECKPOINTS[name]
    ckpt = real_checkpoints / name
    cfg, index = _read(ckpt, "config.json"), _read(ckpt, "model.safetensors.index.json")
    adapter = adapter_for(cfg)
    arch = adapter.arch_config(cfg)
    assert adapter.family == family
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == dims
    assert arch.num_parameters * 2 == index["metadata"]["total_size"]  # bf16 checkpoints: 2 bytes a parameter
    with torch.device("meta"):
        params = dict(Transformer(arch).named_parameters())
    mapped = [adapter.map_name(n) for n in index["weight_map"]]
    assert None not in mapped and sorted(mapped) == sorted(params)


@pytest.fixture(scope="module")
def sdar_4b(tmp_path_factory):
    """SDAR-4B-Chat's real metadata with a stand-in vocabulary of the real size (tests/data/README.md)."""
    return with_stand_in_vocab("SDAR-4B-Chat", tmp_path_factory.mktemp("sdar") / "SDAR-4B-Chat")


def test_sdar_spec_and_tokenizer_from_the_real_files(sdar_4b):
    ckpt = sdar_4b
    cfg, gen = _read(ckpt, "config.json"), _read(ckpt, "generation_config.json")
    tok = load_tokenizer(ckpt)
    spec = adapter_for(cfg).spec(cfg, gen, tok)
    assert spec.mask_id == cfg["mask_token_id"] == tok.convert_tokens_to_ids("<|MASK|>")
    assert spec.stop_ids == tuple(gen["eos_token_id"])
    assert spec.native_block_size == cfg["block_size"] and spec.attention == "block_causal"
    assert spec.defaults["block_length"] == cfg["block_size"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_dream_spec_from_the_real_config(real_checkpoints):
    ckpt = real_checkpoints / "Dream-v0-Instruct-7B"
    cfg, gen = _read(ckpt, "config.json"), _read(ckpt, "generation_config.json")
    spec = adapter_for(cfg).spec(cfg, gen, None)
    assert spec.mask_id == cfg["mask_token_id"] and spec.shift_logits and spec.attention == "full"
    assert spec.stop_ids == (gen["eos_token_id"],)
    assert spec.defaults["alg"] == gen["alg"] and spec.defaults["eps"] == gen["eps"]


def test_dream_custom_tokenizer_needs_remote_code(real_checkpoints):
    with pytest.raises(UnsupportedModelError, match=r"custom code \(DreamTokenizer\); pass trust_remote_code=True"):
        LLM(str(real_checkpoints / "Dream-v0-Instruct-7B"))


def test_checkpoint_without_weights_says_so(sdar_4b):
    with pytest.raises(ModelNotFoundError, match="missing shard"):
        LLM(str(sdar_4b))


def test_sdar_moe_is_refused_clearly(real_checkpoints):
    cfg = _read(real_checkpoints / "SDAR-4B-Chat", "config.json")
    cfg.update(model_type="sdar_moe", architectures=["SDARMoeForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="SDAR MoE checkpoints .* are not supported yet"):
        adapter_for(cfg).arch_config(cfg)

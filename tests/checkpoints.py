"""Tiny LLaDA, Dream and SDAR checkpoints in the real Hugging Face layout, for loader and parity tests.

`write_tiny_llada(path, ...)` writes a directory that looks like GSAI-ML/LLaDA-8B-Instruct on the
hub, only small:

- config.json with every field of the real LLaDA-8B-Instruct config.json (read from
  ../shared/data/checkpoints/LLaDA-8B-Instruct/config.json beside the checkout when present, else the built-in copy
  below), the model dimensions overridden, and vocab/special ids set to the tiny tokenizer's ids;
- generation_config.json (bos/eos ids);
- weights under LLaDA's real parameter names (`model.transformer.wte.weight`,
  `model.transformer.blocks.N.q_proj.weight`, ...), either one `model.safetensors` or
  `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`;
- a byte-level fast tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json) with
  LLaDA's special-token names and LLaDA's real chat template, loadable by
  `transformers.AutoTokenizer.from_pretrained(path)`.

`write_tiny_dream(path, ...)` (Dream-org/Dream-v0-Instruct-7B) and `write_tiny_sdar(path, ...)`
(JetLM/SDAR-4B-Chat) do the same for the Qwen2- and Qwen3-based families; see the section at the end.

`load_tiny_state_dict(path)` reads the config and all weights back (used by the reference oracles);
`special_token_ids(path)` returns the special-token ids of any of the three families.
This module does not import anything from the runtime packages (dllm, decoding, cache).
"""
from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import os  # noqa: E402

# The real checkpoint files live in the project's shared data directory beside the checkout.
REAL_DIR = pathlib.Path(os.environ.get("DLLM_SHARED_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared")) \
    / "data" / "checkpoints" / "LLaDA-8B-Instruct"

# Built-in copy of GSAI-ML/LLaDA-8B-Instruct config.json (used only if REAL_DIR is absent).
LLADA_8B_INSTRUCT_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288, "mlp_ratio": 4,
    "model_type": "llada", "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
    "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
    "vocab_size": 126464, "weight_tying": False,
}

# Chat template of LLaDA-8B-Instruct (tokenizer_config.json, field chat_template), verbatim.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

# Special tokens with LLaDA's names, in this order after the 256 byte tokens.
BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
SPECIAL_TOKENS = [BOS, EOS, MASK, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
NUM_BYTE_TOKENS = 256


def _real_config() -> dict:
    path = REAL_DIR / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    return json.loads(json.dumps(LLADA_8B_INSTRUCT_CONFIG))  # deep copy


def _real_chat_template() -> str:
    path = REAL_DIR / "tokenizer_config.json"
    if path.is_file():
        return json.loads(path.read_text())["chat_template"]
    return LLADA_CHAT_TEMPLATE


def build_tokenizer() -> Tokenizer:
    """Byte-level tokenizer with no merges: every byte (so every ASCII char, newline included) is
    one token, words are several tokens; special tokens are single ids after the 256 bytes."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _tokenizer_files(path: pathlib.Path, tok: Tokenizer) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return special ids."""
    tok.save(str(path / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {str(ids[t]): dict(content=t, **entry, special=True) for t in SPECIAL_TOKENS},
        "bos_token": BOS,
        "chat_template": _real_chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": EOS,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": dict(content=BOS, **entry), "eos_token": dict(content=EOS, **entry),
                   "pad_token": dict(content=EOS, **entry)}
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return ids


def _random_state_dict(cfg: dict, seed: int, dtype: torch.dtype, norm_std: float) -> dict[str, torch.Tensor]:
    """Seeded random weights under LLaDA's real names.

    Linear layers use std 1/sqrt(fan_in) so attention and MLP visibly mix positions; embedding
    and head std 0.5 make logits peaked (logit std ~ 0.5*sqrt(d_model)), so greedy
    decoding is not dominated by ties. Norm weights are 1 (+ optional N(0, norm_std) jitter)."""
    g = torch.Generator().manual_seed(seed)
    d, hidden, vocab = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    kv_dim = cfg["n_kv_heads"] * (d // cfg["n_heads"])

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    def linear(out_f, in_f):
        return normal(out_f, in_f, std=in_f ** -0.5)

    def norm():
        return 1.0 + normal(d, std=norm_std) if norm_std > 0 else torch.ones(d)

    sd = {"model.transformer.wte.weight": normal(vocab, d, std=0.5)}
    for n in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{n}."
        sd[p + "attn_norm.weight"] = norm()
        sd[p + "q_proj.weight"] = linear(d, d)
        sd[p + "k_proj.weight"] = linear(kv_dim, d)
        sd[p + "v_proj.weight"] = linear(kv_dim, d)
        sd[p + "attn_out.weight"] = linear(d, d)
        sd[p + "ff_norm.weight"] = norm()
        sd[p + "ff_proj.weight"] = linear(hidden, d)   # gate (SiLU applied)
        sd[p + "up_proj.weight"] = linear(hidden, d)   # up
        sd[p + "ff_out.weight"] = linear(d, hidden)    # down
    sd["model.transformer.ln_f.weight"] = norm()
    if not cfg["weight_tying"]:
        sd["model.transformer.ff_out.weight"] = normal(vocab, d, std=0.5)
    # Like a trained LLaDA, never (in practice) predict <|mdm_mask|>: shrink its output row 10x.
    # (A sampled x0 == MASK would leave the position masked and stall the step schedules.)
    head = sd["model.transformer.wte.weight" if cfg["weight_tying"] else "model.transformer.ff_out.weight"]
    head[cfg["mask_token_id"]] *= 0.1
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def _write_weights(path: pathlib.Path, sd: dict[str, torch.Tensor], num_shards: int) -> None:
    meta = {"format": "pt"}
    if num_shards == 1:
        save_file(sd, str(path / "model.safetensors"), metadata=meta)
        return
    names = sorted(sd)
    if num_shards > len(names):
        raise ValueError(f"num_shards={num_shards} > number of tensors ({len(names)})")
    # Round-robin over the sorted names, so every shard holds at least one tensor.
    weight_map = {}
    for i in range(num_shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[i::num_shards]
        save_file({n: sd[n] for n in chunk}, str(path / fname), metadata=meta)
        weight_map.update({n: fname for n in chunk})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tiny_llada(path, *, seed: int = 0, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 4,
                     n_layers: int = 2, mlp_hidden_size: int = 128, max_sequence_length: int = 512,
                     rope_theta: float = 500000.0, num_shards: int = 1, dtype: torch.dtype = torch.float32,
                     weight_tying: bool = False, norm_std: float = 0.0) -> pathlib.Path:
    """Write a tiny random LLaDA checkpoint directory at `path` and return it as a Path."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids = _tokenizer_files(path, build_tokenizer())
    vocab = -(-(max(ids.values()) + 1) // 8) * 8   # tokenizer size rounded up to a multiple of 8

    cfg = _real_config()
    cfg.update(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=n_layers,
               mlp_hidden_size=mlp_hidden_size, max_sequence_length=max_sequence_length,
               rope_theta=float(rope_theta), vocab_size=vocab, embedding_size=vocab,
               weight_tying=bool(weight_tying), mask_token_id=ids[MASK], eos_token_id=ids[EOS],
               pad_token_id=ids[EOS])
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_cfg = {"_from_model_config": True, "bos_token_id": ids[BOS], "eos_token_id": ids[EOS],
               "transformers_version": "4.38.2"}
    (path / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")

    _write_weights(path, _random_state_dict(cfg, seed, dtype, norm_std), num_shards)
    return path


def load_tiny_state_dict(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read back (config dict, state_dict) from a directory written by write_tiny_llada."""
    path = pathlib.Path(path)
    cfg = json.loads((path / "config.json").read_text())
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(path / f)))
    return cfg, sd


def special_token_ids(path) -> dict[str, int]:
    """Convenience: {'bos', 'eos', 'pad', 'mask', 'eot', 'start_header', 'end_header'} -> id for LLaDA;
    for Dream / SDAR directories (config.json model_type "Dream" / "sdar") see `qwen_special_token_ids`."""
    family = _family_of(path)
    if family is not None:
        return qwen_special_token_ids(path, family)
    tok = Tokenizer.from_file(str(pathlib.Path(path) / "tokenizer.json"))
    names = ["bos", "eos", "mask", "start_header", "end_header", "eot"]
    ids = {n: tok.token_to_id(t) for n, t in zip(names, SPECIAL_TOKENS)}
    ids["pad"] = ids["eos"]
    return ids

"""Tiny LLaDA, Dream and SDAR checkpoints in the real Hugging Face layout, for loader and parity tests.

`write_tiny_llada(path, ...)` writes a directory that looks like GSAI-ML/LLaDA-8B-Instruct on the
hub, only small:

- config.json with every field of the real LLaDA-8B-Instruct config.json (committed in
  tests/data/checkpoints/LLaDA-8B-Instruct/), the model dimensions overridden, and vocab/special ids set to the
  tiny tokenizer's ids;
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
`special_token_ids(path)` returns the special-token ids of any of the three families;
`with_stand_in_vocab(name, dst)` copies a real metadata folder and adds a vocabulary of the real size, so that
its tokenizer loads (see tests/data/README.md).
This module does not import anything from the runtime packages (dllm, decoding, cache).
"""
from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# The real checkpoints' metadata (no weights), committed with the tests: see tests/data/README.md.
DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
REAL_DIR = DATA_DIR / "checkpoints" / "LLaDA-8B-Instruct"

# Special tokens with LLaDA's names, in this order after the 256 byte tokens.
BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
SPECIAL_TOKENS = [BOS, EOS, MASK, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
NUM_BYTE_TOKENS = 256


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the tiny checkpoints copy the real checkpoints' metadata "
                                "committed in tests/data/checkpoints (see tests/data/README.md)")
    return path


def _real_config() -> dict:
    return json.loads(_require(REAL_DIR / "config.json").read_text())


def _real_chat_template() -> str:
    return json.loads(_require(REAL_DIR / "tokenizer_config.json").read_text())["chat_template"]


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


# --------------------------------------------------------------------------- Dream and SDAR

# Real metadata folders (beside LLaDA's).
CHECKPOINTS_DIR = REAL_DIR.parent

# Per family: the real folder; the tiny tokenizer's added tokens (real name, `special` flag as in the real
# added_tokens_decoder), given ids 256, 257, ... in the real tokenizer's id order; and the real ids of those
# tokens (models.md §2.4, §3.4), used to remap every *_token_id field of the real config files.
FAMILIES = {
    "dream": dict(folder="Dream-v0-Instruct-7B", model_type="Dream",
                  tokens=[("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                          ("<|beginoftext|>", True), ("<|mask|>", True)],
                  real_ids=[151643, 151644, 151645, 151665, 151666],
                  keys=["eos", "im_start", "im_end", "bos", "mask"]),
    "sdar": dict(folder="SDAR-4B-Chat", model_type="sdar",
                 tokens=[("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                         ("<think>", False), ("</think>", False), ("<|MASK|>", False)],
                 real_ids=[151643, 151644, 151645, 151667, 151668, 151669],
                 keys=["eos", "im_start", "im_end", "think", "end_think", "mask"]),
}


def _real_metadata(family: str) -> dict:
    """config / generation_config / tokenizer_config (no added_tokens_decoder) / special_tokens_map /
    chat template of the real checkpoint, from tests/data/checkpoints."""
    d = CHECKPOINTS_DIR / FAMILIES[family]["folder"]
    read = lambda name: json.loads(_require(d / name).read_text())  # noqa: E731
    meta = {k: read(f"{k}.json") for k in ("config", "generation_config", "tokenizer_config", "special_tokens_map")}
    meta["tokenizer_config"].pop("added_tokens_decoder", None)
    if (d / "chat_template.jinja").is_file():
        meta["chat_template_jinja"] = (d / "chat_template.jinja").read_text()
    return meta


def _remap_token_ids(cfg: dict, id_map: dict[int, int]) -> dict:
    """Replace every real special-token id (`*_token_id` fields, int or list) by the tiny tokenizer's id."""
    for key, val in cfg.items():
        if key.endswith("_token_id") and val is not None:
            cfg[key] = [id_map[v] for v in val] if isinstance(val, list) else id_map[val]
    return cfg


def _qwen_tokenizer_files(path: pathlib.Path, family: str, meta: dict) -> dict[str, int]:
    """Byte-level tokenizer like build_tokenizer() with the family's added tokens after the 256 bytes, and
    tokenizer_config.json / special_tokens_map.json derived from the real ones: the real fields, minus the
    remote-code auto_map, with a standard fast class and only the tokens this vocabulary has."""
    spec = FAMILIES[family]
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    for content, special in spec["tokens"]:        # one call each: ids follow the list order
        added = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    tok.save(str(path / "tokenizer.json"))
    names = [t for t, _ in spec["tokens"]]
    ids = {t: tok.token_to_id(t) for t in names}
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)

    tc = json.loads(json.dumps(meta["tokenizer_config"]))
    tc.pop("auto_map", None)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["added_tokens_decoder"] = {str(ids[t]): dict(content=t, **entry, special=s) for t, s in spec["tokens"]}
    tc["additional_special_tokens"] = [t for t in tc.get("additional_special_tokens", []) if t in ids]
    if "chat_template_jinja" in meta:                 # SDAR ships the template in both places
        tc["chat_template"] = meta["chat_template_jinja"]
        (path / "chat_template.jinja").write_text(meta["chat_template_jinja"])
    (path / "tokenizer_config.json").write_text(json.dumps(dict(sorted(tc.items())), indent=2, ensure_ascii=False) + "\n")

    stm = {}
    for key, val in meta["special_tokens_map"].items():   # drop names this vocab lacks (SDAR's "<MASK>")
        if key == "additional_special_tokens":
            stm[key] = [t for t in val if t in ids]
        elif (val["content"] if isinstance(val, dict) else val) in ids:
            stm[key] = val
    (path / "special_tokens_map.json").write_text(json.dumps(stm, indent=2, ensure_ascii=False) + "\n")
    return ids


def _qwen_state_dict(cfg: dict, family: str, seed: int, dtype: torch.dtype, norm_std: float,
                     mask_id: int) -> dict[str, torch.Tensor]:
    """Seeded random weights under the real Qwen2 (Dream: q/k/v biases) / Qwen3 (SDAR: per-head
    q_norm/k_norm) names. Same scheme as _random_state_dict: linear std 1/sqrt(fan_in), embedding and head
    std 0.5 (peaked logits), norms 1 + N(0, norm_std), Dream biases N(0, 0.2); MASK's head row shrunk 10x."""
    g = torch.Generator().manual_seed(seed)
    d, ff, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads          # Dream has no head_dim field: hidden // heads

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    def linear(out_f, in_f):
        return normal(out_f, in_f, std=in_f ** -0.5)

    def norm(n):
        return 1.0 + normal(n, std=norm_std) if norm_std > 0 else torch.ones(n)

    sd = {"model.embed_tokens.weight": normal(vocab, d, std=0.5)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        sd[p + "input_layernorm.weight"] = norm(d)
        for name, out_f in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
            sd[p + f"self_attn.{name}_proj.weight"] = linear(out_f, d)
            if family == "dream":
                sd[p + f"self_attn.{name}_proj.bias"] = normal(out_f, std=0.2)
        sd[p + "self_attn.o_proj.weight"] = linear(d, heads * hd)
        if family == "sdar":
            sd[p + "self_attn.q_norm.weight"] = norm(hd)
            sd[p + "self_attn.k_norm.weight"] = norm(hd)
        sd[p + "post_attention_layernorm.weight"] = norm(d)
        sd[p + "mlp.gate_proj.weight"] = linear(ff, d)
        sd[p + "mlp.up_proj.weight"] = linear(ff, d)
        sd[p + "mlp.down_proj.weight"] = linear(d, ff)
    sd["model.norm.weight"] = norm(d)
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = normal(vocab, d, std=0.5)
    sd["lm_head.weight" if "lm_head.weight" in sd else "model.embed_tokens.weight"][mask_id] *= 0.1
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def _write_tiny_qwen(path, family: str, dims: dict, seed: int, num_shards: int, dtype: torch.dtype,
                     norm_std: float) -> pathlib.Path:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec, meta = FAMILIES[family], _real_metadata(family)
    ids = _qwen_tokenizer_files(path, family, meta)
    id_map = {real: ids[t] for real, (t, _) in zip(spec["real_ids"], spec["tokens"])}
    vocab = -(-(max(ids.values()) + 1) // 8) * 8      # tokenizer size rounded up to a multiple of 8

    cfg = meta["config"]
    cfg.update(dims, vocab_size=vocab, max_window_layers=dims["num_hidden_layers"],
               torch_dtype=str(dtype).removeprefix("torch."))
    (path / "config.json").write_text(json.dumps(_remap_token_ids(cfg, id_map), indent=2) + "\n")
    gen = _remap_token_ids(meta["generation_config"], id_map)
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    mask_id = ids[spec["tokens"][-1][0]]
    _write_weights(path, _qwen_state_dict(cfg, family, seed, dtype, norm_std, mask_id), num_shards)
    return path


def write_tiny_dream(path, *, seed: int = 0, hidden_size: int = 64, num_attention_heads: int = 4,
                     num_key_value_heads: int = 2, num_hidden_layers: int = 2, intermediate_size: int = 128,
                     max_position_embeddings: int = 512, num_shards: int = 1, dtype: torch.dtype = torch.float32,
                     tie_word_embeddings: bool = False, norm_std: float = 0.1) -> pathlib.Path:
    """Tiny random Dream-v0-Instruct-7B: config.json (model_type "Dream", architectures ["DreamModel"], every
    real field), generation_config.json, Qwen2 weights with q/k/v biases, byte-level fast tokenizer with
    Dream's special tokens and Qwen2.5 chat template. rope_theta stays the real 1e6."""
    dims = dict(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                num_key_value_heads=num_key_value_heads, num_hidden_layers=num_hidden_layers,
                intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                tie_word_embeddings=bool(tie_word_embeddings))
    return _write_tiny_qwen(path, "dream", dims, seed, num_shards, dtype, norm_std)


def write_tiny_sdar(path, *, seed: int = 0, hidden_size: int = 64, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, head_dim: int = 16, num_hidden_layers: int = 2,
                    intermediate_size: int = 128, block_size: int = 4, max_position_embeddings: int = 512,
                    num_shards: int = 1, dtype: torch.dtype = torch.float32, tie_word_embeddings: bool = False,
                    norm_std: float = 0.1) -> pathlib.Path:
    """Tiny random SDAR-4B-Chat: config.json (model_type "sdar", architectures ["SDARForCausalLM"], every real
    field), generation_config.json (eos [<|im_end|>, <|endoftext|>]), Qwen3 weights with q_norm/k_norm,
    byte-level fast tokenizer (mask_token <|MASK|>), chat_template.jinja. rope_theta stays the real 1e6."""
    dims = dict(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                num_key_value_heads=num_key_value_heads, head_dim=head_dim, num_hidden_layers=num_hidden_layers,
                intermediate_size=intermediate_size, block_size=block_size,
                max_position_embeddings=max_position_embeddings, tie_word_embeddings=bool(tie_word_embeddings))
    return _write_tiny_qwen(path, "sdar", dims, seed, num_shards, dtype, norm_std)


def _family_of(path) -> str | None:
    """'dream' / 'sdar' from config.json's model_type; None for anything else (LLaDA)."""
    cfg = pathlib.Path(path) / "config.json"
    model_type = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    return next((f for f, spec in FAMILIES.items() if spec["model_type"] == model_type), None)


def qwen_special_token_ids(path, family: str | None = None) -> dict[str, int]:
    """Dream: {'eos', 'pad', 'im_start', 'im_end', 'bos' (<|beginoftext|>), 'mask'};
    SDAR: {'eos', 'pad', 'im_start', 'im_end', 'think', 'end_think', 'mask'} -> id (pad = eos)."""
    spec = FAMILIES[family or _family_of(path)]
    tok = Tokenizer.from_file(str(pathlib.Path(path) / "tokenizer.json"))
    ids = {key: tok.token_to_id(t) for key, (t, _) in zip(spec["keys"], spec["tokens"])}
    ids["pad"] = ids["eos"]
    return ids


def with_stand_in_vocab(name: str, dst) -> pathlib.Path:
    """A copy of tests/data/checkpoints/<name> whose tokenizer loads: the real BPE vocabulary (MBs) is not committed,
    so `vocab.json` gets the 256 byte-level symbols and placeholders up to the first added token's id, and an empty
    `merges.txt`. The added tokens of the real tokenizer_config.json then get their real ids (a tokenizer numbers
    added tokens after its vocabulary), and the chat template is the real one."""
    src, dst = DATA_DIR / "checkpoints" / name, pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    added = json.loads((src / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    first_added = min(int(i) for i in added)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"<placeholder_{i}>": i for i in range(len(vocab), first_added)})
    (dst / "vocab.json").write_text(json.dumps(vocab))
    (dst / "merges.txt").write_text("#version: 0.2\n")
    return dst


def break_after(run, steps: int, message: str = "poisoned"):
    """Make a decoding run's strategy raise RuntimeError(message) from its (steps + 1)-th step on (a fault that
    strikes mid-run, after some events were already streamed); returns the run."""
    real_step, count = run.strategy.step, [0]

    def step(*args, **kwargs):
        count[0] += 1
        if count[0] > steps:
            raise RuntimeError(message)
        return real_step(*args, **kwargs)
    run.strategy.step = step
    return run

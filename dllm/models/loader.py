"""Loading a checkpoint: a local directory in the Hugging Face layout or a hub id, `config.json` (+
`generation_config.json`), `*.safetensors` (single or sharded with `model.safetensors.index.json`) and the
tokenizer through `transformers.AutoTokenizer`.

The family adapter is picked from config.json by the registry; this module only moves bytes.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dllm.errors import InvalidParameterError, ModelNotFoundError, UnsupportedModelError
from dllm.models.core import Transformer
from dllm.models.registry import adapter_for
from dllm.models.spec import ArchConfig, ModelSpec
from dllm.parallel import TPInfo, shard_slices, take_shard

logger = logging.getLogger(__name__)

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64,
}


@dataclass
class LoadedModel:
    model: Transformer
    spec: ModelSpec
    tokenizer: object
    path: Path
    arch: ArchConfig


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidParameterError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cpu":
        return _cpu_device(dev)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("CUDA was requested but no GPU is available here; pass device='cpu' (CLI: --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidParameterError(f"{dev} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidParameterError(f"device {dev.type!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def _cpu_device(dev: torch.device) -> torch.device:
    """`cpu` and `cpu:0` are the one CPU device (safetensors and some kernels reject an index); `cpu:N` for N > 0
    names nothing, and is not a way to pick cores."""
    if dev.index not in (None, 0):
        raise InvalidParameterError(f"device {str(dev)!r} does not exist: PyTorch has one CPU device ('cpu'); to limit "
                                    "the cores it uses, set OMP_NUM_THREADS")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if str(dtype).lower() not in _DTYPES:
        names = ", ".join(dict.fromkeys(str(t).removeprefix("torch.") for t in _DTYPES.values()))
        raise InvalidParameterError(f"unknown dtype {dtype!r}; use one of auto, {names}")
    return _DTYPES[str(dtype).lower()]


def resolve_path(model: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, a bundled zoo model by name, or a hub id (downloaded with huggingface_hub)."""
    from dllm.zoo import bundled_path
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        hint = f" (here: {str(path.parent)!r})" if (path.parent / "config.json").is_file() else ""
        raise ModelNotFoundError(f"model {str(model)!r} is a file; pass the checkpoint directory that holds "
                                 f"config.json{hint}")
    if bundled_path(str(model)) is not None:
        return bundled_path(str(model))
    text = str(model)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_hub_id:
        raise ModelNotFoundError(f"model directory {text!r} does not exist; pass a checkpoint directory or a hub id like GSAI-ML/LLaDA-8B-Instruct")
    from dllm.models.hub import download
    return download(text, revision)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    tok_cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    custom = (tok_cfg.get("auto_map") or {}).get("AutoTokenizer")
    import transformers
    builtin = hasattr(transformers, str(tok_cfg.get("tokenizer_class")))  # e.g. SDAR names Qwen2Tokenizer
    if custom and not builtin and not trust_remote_code:
        raise UnsupportedModelError(
            f"the tokenizer of {path} is custom code ({tok_cfg.get('tokenizer_class', custom)}); pass "
            "trust_remote_code=True (CLI: --trust-remote-code) to allow it to run")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoConfig warns that it does not know our families' model_type
    try:
        with warnings.catch_warnings():  # ...and about config fields of the checkpoints' transformers version
            warnings.simplefilter("ignore", FutureWarning)
            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UnsupportedModelError(
            f"cannot load the tokenizer from {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
            "the directory needs tokenizer.json or vocab files and tokenizer_config.json"
            + ("" if trust_remote_code else ", or pass trust_remote_code=True (CLI: --trust-remote-code) for a custom tokenizer class")) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return tok


LOAD_FORMATS = ("safetensors", "dummy")


@dataclass
class Checkpoint:
    """What config.json says, before any weight is read."""

    config: dict
    generation_config: dict
    adapter: object
    arch: ArchConfig


def inspect_checkpoint(path: Path) -> Checkpoint:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json; pass a Hugging Face checkpoint directory")
    cfg = read_json(path / "config.json")
    gen_cfg = read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    adapter = adapter_for(cfg, where=str(path))
    return Checkpoint(cfg, gen_cfg, adapter, adapter.arch_config(cfg))


def load_model(model: str | Path, *, dtype="auto", device="auto", revision: str | None = None,
               trust_remote_code: bool = False, load_format: str = "safetensors", skip_tokenizer_init: bool = False,
               seed: int = 0, tp: TPInfo = TPInfo()) -> LoadedModel:
    """Resolve, read and build. `load_format="dummy"` fills the real shape with random weights instead of
    reading safetensors (benchmarks; vLLM's option of the same name); `skip_tokenizer_init` loads no tokenizer
    (prompts must then be token ids, and outputs carry no text). With `tp` of size > 1 only this rank's shard
    is built and read (slices straight from the safetensors files)."""
    if load_format not in LOAD_FORMATS:
        raise InvalidParameterError(f"unknown load_format {load_format!r}; use one of {', '.join(LOAD_FORMATS)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = resolve_path(model, revision)
    ckpt = inspect_checkpoint(path)
    cfg, gen_cfg, adapter, arch = ckpt.config, ckpt.generation_config, ckpt.adapter, ckpt.arch
    tokenizer = None if skip_tokenizer_init else load_tokenizer(path, trust_remote_code)
    spec = adapter.spec(cfg, gen_cfg, tokenizer)
    with torch.device("meta"):
        net = Transformer(arch, tp)
    if load_format == "dummy":
        _init_random(net, dev, dt, seed)
    else:
        _load_safetensors(net, path, adapter, dev, dt)
    net.eval().requires_grad_(False)
    logger.info("loaded %s (%s, %.2fB parameters) on %s as %s", path, adapter.family, arch.num_parameters / 1e9, dev, dt)
    return LoadedModel(net, spec, tokenizer, path, arch)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ModelNotFoundError(f"{path} is missing shard(s) {missing[:3]} named in model.safetensors.index.json; re-download the checkpoint")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path} has no *.safetensors weights; dllm loads safetensors checkpoints only")
    return files


def _load_safetensors(net: Transformer, path: Path, adapter, device: torch.device, dtype: torch.dtype) -> None:
    from safetensors import safe_open
    unknown = []
    for file in _weight_files(path):
        state = {}
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                ours = adapter.map_name(name)
                if ours is None:
                    unknown.append(name)
                    continue
                rule = shard_slices(ours, net.cfg, net.tp)
                if rule is None:
                    state[ours] = f.get_tensor(name).to(dtype)
                else:   # read only this rank's rows / columns
                    part = f.get_slice(name)
                    state[ours] = (part[rule[1]] if rule[0] == 0 else part[:, rule[1]]).to(dtype)
        _check_shapes(net, state, file)
        net.load_state_dict(state, strict=False, assign=True)
    if unknown:
        raise UnsupportedModelError(f"{path} holds tensors the {adapter.family} layout does not have, e.g. {unknown[:3]}; is it a {adapter.family} checkpoint?")
    if net.cfg.tie_word_embeddings:
        net.lm_head.weight = net.embed.weight
    missing = [n for n, p in net.named_parameters() if p.is_meta]
    if missing:
        raise UnsupportedModelError(f"{path} lacks weights the {adapter.family} layout needs, e.g. {missing[:3]} (in dllm's names); the checkpoint is incomplete")


def _check_shapes(net: Transformer, state: dict, file: Path) -> None:
    params = dict(net.named_parameters())
    for name, tensor in state.items():
        want = params[name].shape
        if tensor.shape != want:
            raise UnsupportedModelError(f"{file.name}: tensor for {name} has shape {tuple(tensor.shape)} but config.json implies {tuple(want)}")


def _init_random(net: Transformer, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """N(0, 0.02) weights (norms 1), each drawn whole from its own seeded generator and then cut to this
    rank's shard, so that every tensor-parallel size builds the same model."""
    net.to(dtype).to_empty(device=device)
    for i, (name, p) in enumerate(net.named_parameters()):
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
            continue
        rule = shard_slices(name, net.cfg, net.tp)
        shape = list(p.shape)
        if rule is not None:
            shape[rule[0]] = _full_size(name, net.cfg, rule[0], shape[rule[0]])
        gen = torch.Generator(device=device).manual_seed(seed * 100003 + i)
        full = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
        p.data.copy_(take_shard(full, rule))


def _full_size(name: str, arch, dim: int, local: int) -> int:
    """The unsharded size of `name`'s dimension `dim` (this rank holds `local` of it)."""
    d = arch.head_dim
    module = name.split(".")[-2]
    if module in ("q_proj", "o_proj"):
        return arch.num_heads * d
    if module in ("k_proj", "v_proj"):
        return arch.num_kv_heads * d
    if module in ("gate_proj", "up_proj", "down_proj"):
        return arch.intermediate_size
    if module in ("embed", "lm_head"):
        return arch.vocab_size
    return local

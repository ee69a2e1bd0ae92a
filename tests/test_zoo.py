"""The bundled zoo: every model loads by name through the public API, offline, and reaches its accuracy bar with
its family's reference sampler at one token a step; the training code lowers the loss in a short CPU run.

The bars (arith >= 95%, gsm-lite >= 90%, code-lite >= 80%) were measured on 200 held-out problems a task on a GPU
(model cards); CI re-checks them on the first 10 of those problems to stay within its time budget (a one-token-a-step
reference sampler over 128 tokens is the slowest thing the suite runs: at 20 problems these three tests were over
half of CI's test time)."""
from __future__ import annotations

import json

import pytest
import torch

from dllm import LLM, SamplingParams
from dllm.zoo import MODELS_DIR, ZOO_MODELS

BARS = {"arith": 0.95, "gsm-lite": 0.90, "code-lite": 0.80}
CI_PROBLEMS = 10


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)  # the zoo models are large enough to use both cores
    yield
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream", "tiny-sdar"])
def test_zoo_model_reaches_its_bar(name):
    from dllm.zoo.evaluate import evaluate
    results = evaluate(name, settings=("reference",), num_problems=CI_PROBLEMS, device="cpu")
    for r in results:
        assert r.accuracy >= BARS[r.task], f"{name} {r.task}: {r.accuracy:.2f} < {BARS[r.task]}"


def test_tiny_tidar_reaches_its_bar_at_three_tokens_a_forward():
    """tiny-tidar decoded by TiDAR (greedy verification: its tokens are its AR decoding's) holds the bars and
    commits at least 3 tokens per forward on every task (issue 17's target; the card has 200 problems a task)."""
    from dllm.zoo.evaluate import evaluate
    for r in evaluate("tiny-tidar", settings=("tidar",), num_problems=CI_PROBLEMS, device="cpu"):
        assert r.accuracy >= BARS[r.task], f"tiny-tidar {r.task}: {r.accuracy:.2f} < {BARS[r.task]}"
        assert r.tokens_per_forward >= 3, f"tiny-tidar {r.task}: {r.tokens_per_forward} tokens per forward"


def test_tiny_ar_reaches_its_bar_through_transformers():
    """tiny-ar greedy through `AutoModelForCausalLM.generate`, with the zoo tokenizer read as written."""
    from dllm.zoo.evaluate import evaluate_ar
    for r in evaluate_ar("tiny-ar", num_problems=CI_PROBLEMS, device="cpu"):
        assert r.accuracy >= BARS[r.task], f"tiny-ar {r.task}: {r.accuracy:.2f} < {BARS[r.task]}"


def test_tiny_ar_tokenizer_is_the_zoo_tokenizer():
    """tiny-ar shares token ids and splitting with the diffusion models when loaded with `load_tokenizer`
    (AutoTokenizer would build Qwen2Tokenizer for model_type qwen2 and split text differently)."""
    from dllm.zoo.tokenizer import load_tokenizer
    text = "What is 37 + 751?\n7 + 1 + 0 = 8, carry 0: 8\ndef f(x_1):\n    return x_1 * 2"
    ids = load_tokenizer(MODELS_DIR / "tiny-ar").encode(text)
    assert ids == load_tokenizer(MODELS_DIR / "tiny-llada").encode(text)
    assert ids == LLM("tiny-llada").tokenizer.encode(text, add_special_tokens=False)


def test_zoo_layouts_and_sizes():
    families = {"tiny-llada": "llada", "tiny-dream": "Dream", "tiny-sdar": "sdar", "tiny-ar": "qwen2",
                "tiny-tidar": "tidar"}
    total = 0
    for name in ZOO_MODELS:
        path = MODELS_DIR / name
        assert json.loads((path / "config.json").read_text())["model_type"] == families[name]
        size = sum(f.stat().st_size for f in path.iterdir())
        assert max(f.stat().st_size for f in path.iterdir()) <= 16 * 2**20
        assert size <= 12 * 2**20, f"{name} is {size / 2**20:.1f} MiB"
        assert (path / "README.md").is_file() and (path / "loss.png").is_file()
        total += size
    assert total <= 56 * 2**20


def test_default_model_answers_offline():
    llm = LLM(strategy="reference")
    assert llm.loaded.path == MODELS_DIR / "tiny-llada"
    out = llm.chat([{"role": "user", "content": "What is 17 + 25?"}], SamplingParams(max_tokens=64))[0]
    assert out.text.strip().endswith("#### 42")


def test_tiny_ar_loads_in_transformers_with_the_cores_logits():
    """tiny-ar is a plain Qwen2 causal LM: transformers loads it, and its logits are the core's under a causal mask."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from dllm.models.core import Transformer
    from dllm.models.qwen import map_qwen_name, qwen_arch
    path = MODELS_DIR / "tiny-ar"
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    core = Transformer(qwen_arch(json.loads((path / "config.json").read_text()), "ar", qkv_bias=True, qk_norm=False))
    core.load_state_dict({map_qwen_name(k): v.float() for k, v in load_file(str(path / "model.safetensors")).items()})
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))

    class Causal:
        attn_mask = torch.ones(24, 24, dtype=torch.bool).tril()[None, None]

        def kv(self, layer, k, v):
            return k, v
    with torch.no_grad():
        torch.testing.assert_close(core(ids, torch.arange(24).expand(2, 24), Causal()), hf(ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_short_cpu_training_lowers_the_loss(tmp_path, family):
    from dllm.train.trainer import TrainConfig, train
    from dllm.zoo.tokenizer import save_tokenizer
    from transformers import AutoTokenizer
    tok_dir = tmp_path / "tokenizer"
    save_tokenizer(AutoTokenizer.from_pretrained(str(MODELS_DIR / "tiny-llada")), tok_dir)
    cfg = TrainConfig(family=family, out=str(tmp_path / "m"), tokenizer=str(tok_dir), steps=60, batch_size=16,
                      hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      tasks={"arith": 300, "gsm-lite": 300}, seq_len=160, warmup=10, lr=3e-3, log_every=10, device="cpu")
    path = train(cfg)
    losses = [v for _, v in json.loads((path / "training.json").read_text())["loss"]]
    assert sum(losses[-2:]) / 2 < 0.7 * losses[0]
    assert LLM(str(path)).generate("hi", SamplingParams(max_tokens=8, block_length=4))[0].metrics.nfe >= 1

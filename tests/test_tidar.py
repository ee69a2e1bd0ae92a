"""TiDAR: the family, the training objective and the decoding loop, against independent oracles.

- Greedy TiDAR decoding emits exactly the tokens of greedy AR decoding of the same weights, where the reference is
  a straightforward loop over a full uncached forward of transformers' Qwen2ForCausalLM (batched rows of many
  prompt lengths, stop tokens, drafts from the model and drafts forced to every acceptance length).
- Exact cache: the AR logits of every step equal those of a full uncached forward of the same sequence.
- The training mask and loss against a loop-by-loop re-implementation.
- Speculative rejection sampling keeps the AR distribution (joint of two committed tokens, 200k draws).
- Bad options are one-line errors; the bundled model decodes through the CLI and a live server as through the API.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm import LLM, SamplingParams
from dllm.errors import DllmError
from dllm.zoo import MODELS_DIR, bundled_path

ZOO_TOKENIZER = MODELS_DIR / "tiny-ar"


def write_tiny_tidar(path: pathlib.Path, seed: int = 0, draft_length: int = 3) -> pathlib.Path:
    """A random TiDAR checkpoint (Qwen2 names, q/k/v biases) with the zoo tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ZOO_TOKENIZER / name, path / name)
    h, layers, heads, kv, d, ffn, vocab = 64, 2, 4, 2, 16, 128, 1024
    cfg = {"architectures": ["TiDARForCausalLM"], "model_type": "tidar", "mask_token_id": 1, "attention_bias": True,
           "draft_length": draft_length, "block_size": draft_length + 1, "hidden_size": h, "intermediate_size": ffn,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d,
           "vocab_size": vocab, "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
           "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 4, "eos_token_id": 0,
           "pad_token_id": 0}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 0], "pad_token_id": 0}))
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, fan: torch.randn(*shape, generator=g) / fan ** 0.5  # noqa: E731
    sd = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g), "model.norm.weight": torch.ones(h),
          "lm_head.weight": rnd(vocab, h, fan=h) * 4}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
                   p + "self_attn.q_proj.weight": rnd(heads * d, h, fan=h), p + "self_attn.q_proj.bias": rnd(heads * d, fan=h),
                   p + "self_attn.k_proj.weight": rnd(kv * d, h, fan=h), p + "self_attn.k_proj.bias": rnd(kv * d, fan=h),
                   p + "self_attn.v_proj.weight": rnd(kv * d, h, fan=h), p + "self_attn.v_proj.bias": rnd(kv * d, fan=h),
                   p + "self_attn.o_proj.weight": rnd(h, heads * d, fan=heads * d),
                   p + "mlp.gate_proj.weight": rnd(ffn, h, fan=h), p + "mlp.up_proj.weight": rnd(ffn, h, fan=h),
                   p + "mlp.down_proj.weight": rnd(h, ffn, fan=ffn)})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def tiny_tidar(tmp_path_factory) -> pathlib.Path:
    return write_tiny_tidar(tmp_path_factory.mktemp("tidar") / "tiny-tidar")


def hf_model(path: pathlib.Path):
    """transformers' Qwen2ForCausalLM on the checkpoint's weights: the independent causal forward."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = json.loads((path / "config.json").read_text())
    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "mask_token_id", "draft_length",
                                                      "block_size", "attention_bias")}
    model = Qwen2ForCausalLM(Qwen2Config(**keep, attn_implementation="eager")).float().eval()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()})
    return model


def greedy_ar(model, prompt: list[int], max_tokens: int, stops: set[int]) -> list[int]:
    """Greedy AR decoding by a full uncached forward per token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
            if t in stops:
                break
    return out


PROMPTS = [[5, 77, 300, 12], [9], list(range(40, 71)), [600, 601, 602, 603, 604, 605, 17], [250, 251]]


def _stops(llm: LLM, extra: list[int]) -> set[int]:
    return set(llm.spec.stop_ids) | set(extra)


def test_greedy_tidar_equals_greedy_ar_of_the_same_weights(tiny_tidar):
    hf = hf_model(tiny_tidar)
    llm = LLM(str(tiny_tidar), strategy="tidar", device="cpu")
    ar = LLM(str(tiny_tidar), strategy="ar", device="cpu")
    no_bonus = LLM(str(tiny_tidar), strategy="tidar", device="cpu", strategy_options={"bonus_token": False})
    # a stop token the random model emits early for some rows: row-dependent finishing inside a step
    first = [greedy_ar(hf, p, 24, set())[:6] for p in PROMPTS]
    stop = first[0][4]
    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop])
    want = [greedy_ar(hf, p, 24, _stops(llm, [stop])) for p in PROMPTS]
    got = [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]
    got_ar = [o.token_ids for o in ar.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]
    assert got == want
    assert got_ar == want
    assert [o.token_ids for o in no_bonus.generate([{"prompt_token_ids": p} for p in PROMPTS], params)] == want
    assert len(want[0]) == 5 and any(len(w) == 24 for w in want)


class _Oracle:
    """Forces each step's drafts to the reference continuation, corrupted from a random index on, so that every
    acceptance length 0..k occurs; records each step's fed sequence and AR logits for the exact-cache check."""

    def __init__(self, refs: dict, seed: int = 0):
        self.refs, self.rng, self.steps, self.branches = refs, random.Random(seed), [], []
        self.seqs = None

    def install(self, monkeypatch):
        from dllm.decoding.tidar_run import TiDARRun
        take, step = TiDARRun._take_drafts, TiDARRun._step
        oracle = self

        def take_drafts(run, pre, accepted, after_token):
            if oracle.seqs is not None and len(oracle.branches) < 8:
                oracle.branches.append((oracle.seqs, pre.clone(), accepted.clone(), run.drafts.shape[1]))
            take(run, pre, accepted, after_token)
            k = run.drafts.shape[1]
            for i, row in enumerate(run.rows):
                ref = oracle.refs[tuple(run.prompts[i])]
                m = len(row.token_ids)
                true = (ref[m:m + k] + [7] * k)[:k]
                cut = oracle.rng.randint(0, k)
                forced = true[:cut] + [(t + 1) % 1000 + 5 for t in true[cut:]]
                run.drafts[i] = torch.tensor(forced)

        def traced_step(run):
            seqs = [run.prompts[i] + row.token_ids + run.drafts[i].tolist() for i, row in enumerate(run.rows)]
            oracle.seqs = seqs
            step(run)
            oracle.steps.append((seqs, run.last_ar_logits.clone(), run.drafts.shape[1]))

        monkeypatch.setattr(TiDARRun, "_take_drafts", take_drafts)
        monkeypatch.setattr(TiDARRun, "_step", traced_step)


@pytest.mark.parametrize("bonus_token", [True, False])
def test_every_acceptance_length_with_an_exact_cache(tiny_tidar, monkeypatch, bonus_token):
    hf = hf_model(tiny_tidar)
    llm = LLM(str(tiny_tidar), strategy="tidar", device="cpu", strategy_options={"bonus_token": bonus_token})
    refs = {tuple(p): greedy_ar(hf, p, 40, set()) for p in PROMPTS}
    oracle = _Oracle(refs)
    oracle.install(monkeypatch)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=40, temperature=0,
                                                                                    ignore_eos=True))
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == refs[tuple(p)]
        assert o.metrics.nfe < 40                    # accepted drafts saved forwards
    accepted = {n for o in outs for n in [o.metrics.strategy_stats["accepted_tokens"]]}
    assert max(accepted) > 0
    # exact cache: each step's AR rows (the pending token and the drafts) equal a full uncached forward
    with torch.no_grad():
        for seqs, logits, k in oracle.steps:
            for i, seq in enumerate(seqs):
                full = hf(torch.tensor([seq])).logits[0, -(k + 1):]
                torch.testing.assert_close(logits[i], full, rtol=1e-4, atol=1e-4)
    assert len(oracle.steps) > 5
    # pre-drafts: the chosen branch's MASK rows equal a plain forward of [prefix it sees, k+1 MASKs] with the
    # training layout (prefix causal, the MASK block bidirectional and seeing the whole prefix)
    core = llm.loaded.model
    for seqs, pre, accepted, k in oracle.branches:
        for i, seq in enumerate(seqs):
            j = int(accepted[i])
            prefix = seq[:len(seq) - k + j]
            n, size = len(prefix), k + 1
            mask = torch.ones(n + size, n + size, dtype=torch.bool).tril()
            mask[n:, n:] = True

            class Plan:
                attn_mask = mask[None, None]

                def kv(self, layer, k_, v_):
                    return k_, v_
            ids = torch.tensor([prefix + [llm.spec.mask_id] * size])
            with torch.no_grad():
                want = core(ids, torch.arange(n + size)[None], Plan())[0, n:]
            torch.testing.assert_close(pre[i, j], want, rtol=1e-4, atol=1e-4)
    assert oracle.branches


def test_batch_composition_does_not_change_a_row(tiny_tidar):
    llm = LLM(str(tiny_tidar), strategy="tidar", device="cpu")
    params = SamplingParams(max_tokens=16, temperature=0)
    alone = llm.generate([{"prompt_token_ids": PROMPTS[2]}], params)[0].token_ids
    together = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)[2].token_ids
    assert alone == together


def test_bundled_tiny_tidar_gives_ar_tokens_in_fewer_forwards():
    """On the bundled tiny-tidar: TiDAR's tokens are its AR decoding's, in fewer forwards (its accuracy bars and
    tokens per forward: tests/test_zoo.py)."""
    path = bundled_path("tiny-tidar")
    llm, ar = LLM(str(path), strategy="tidar", device="cpu"), LLM(str(path), strategy="ar", device="cpu")
    msgs = [[{"role": "user", "content": q}] for q in ("What is 12 + 30?", "What is 7 * 8?", "What is 100 - 1?")]
    params = SamplingParams(max_tokens=48, temperature=0)
    got, want = llm.chat(msgs, params), ar.chat(msgs, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(w.metrics.nfe == len(w.token_ids) for w in want)
    assert sum(len(o.token_ids) for o in got) / sum(o.metrics.nfe for o in got) > 3


# ---------------------------------------------------------------------------------------------- training


def _loop_mask(n: int, b: int) -> torch.Tensor:
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = j <= i                                        # clean: causal
            m[n + i, j] = j < (i // b) * b                          # MASK: the clean tokens before its block
            m[n + i, n + j] = i // b == j // b                      # MASK: its own block
    return m


def test_training_mask_and_loss_against_a_loop_reimplementation():
    import torch.nn.functional as F
    from dllm.models.core import Transformer
    from dllm.models.spec import ArchConfig
    from dllm.train.data import Batch
    from dllm.train.objectives import tidar, tidar_mask
    for n, b in ((10, 3), (12, 4), (7, 9)):
        assert torch.equal(tidar_mask(n, b), _loop_mask(n, b))
    torch.manual_seed(0)
    arch = ArchConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=64,
                      qkv_bias=True)
    model = Transformer(arch)
    n, b, mask_id, alpha = 12, 4, 1, 0.7
    ids = torch.randint(2, 64, (3, n))
    batch = Batch(ids, torch.tensor([3, 5, 1]), torch.tensor([9, 7, 11]))
    got = tidar(model, batch, mask_id, block_size=b, alpha=alpha)

    class Plan:
        attn_mask = _loop_mask(n, b)[None, None]

        def kv(self, layer, k, v):
            return k, v
    x = torch.cat([ids, torch.full_like(ids, mask_id)], 1)
    pos = torch.arange(n).repeat(2)[None].expand(3, -1)
    logits = model(x, pos, Plan())
    ar_terms, diff_terms = [], []
    for r in range(3):
        p = int(batch.prompt_len[r])
        for i in range(p, n):                  # response tokens: AR predicts x_i from position i - 1 ...
            ar_terms.append(F.cross_entropy(logits[r, i - 1], ids[r, i]))
            diff_terms.append(F.cross_entropy(logits[r, n + i], ids[r, i]))   # ... the MASK at i predicts x_i
    want = (alpha * torch.stack(ar_terms).mean() + torch.stack(diff_terms).mean()) / (1 + alpha)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_short_cpu_training_from_an_ar_checkpoint(tmp_path):
    from dllm.train.trainer import TrainConfig, train
    cfg = TrainConfig(family="tidar", out=str(tmp_path / "m"), tokenizer=str(ZOO_TOKENIZER), steps=3, batch_size=4,
                      init_from=str(MODELS_DIR / "tiny-ar"), tasks={"arith": 50}, draft_length=4, device="cpu")
    path = train(cfg)
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["draft_length"], config["block_size"]) == ("tidar", 4, 5)
    record = json.loads((path / "training.json").read_text())
    assert record["previous"][0]["config"]["family"] == "ar"
    # started from tiny-ar: the AR half already answers, so the first loss is about half the diffusion loss alone
    assert record["loss"][0][1] < 5
    out = LLM(str(path), strategy="tidar", device="cpu").chat([[{"role": "user", "content": "What is 2 + 3?"}]],
                                                               SamplingParams(max_tokens=32, temperature=0))[0]
    assert out.metrics.nfe >= 1


# ---------------------------------------------------------------------------------------------- sampling


def test_rejection_sampling_keeps_the_ar_distribution():
    from dllm.decoding.tidar import verify_sample
    torch.manual_seed(0)
    v, k, n = 4, 2, 200_000
    p = torch.softmax(torch.randn(k + 1, v, dtype=torch.float64) * 1.5, -1)
    q = torch.softmax(torch.randn(k, v, dtype=torch.float64) * 1.5, -1)
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True) for i in range(k)], 1)   # [N, k]
    accepted, token = verify_sample(drafts, q.expand(n, -1, -1), p.expand(n, -1, -1),
                                    torch.rand(n, k, dtype=torch.float64), [None] * n)
    committed = torch.cat([drafts, torch.zeros(n, 1, dtype=torch.long)], 1)
    committed.scatter_(1, accepted[:, None], token[:, None])
    # the first two committed tokens (rows that committed at least two) and the first token of every row
    joint = torch.zeros(v, v, dtype=torch.float64)
    two = accepted >= 1
    joint.index_put_((committed[two, 0], committed[two, 1]), torch.ones(int(two.sum()), dtype=torch.float64),
                     accumulate=True)
    first = torch.bincount(committed[:, 0], minlength=v).double() / n
    assert (first - p[0]).abs().max() < 0.006
    # given that d_1 was accepted, the second token must still follow p_1 (p_1 does not depend on the first here)
    second = joint / joint.sum(1, keepdim=True)
    assert (second - p[1]).abs().max() < 0.02
    assert 0 < float(two.double().mean()) < 1


def test_sampling_runs_seeded_and_reproducible(tiny_tidar):
    llm = LLM(str(tiny_tidar), strategy="tidar", device="cpu")
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    a = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], params)
    b = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


# ---------------------------------------------------------------------------------------------- errors


def test_bad_options_are_one_line_errors(tiny_tidar):
    cases = [
        lambda: LLM(str(tiny_tidar), strategy="tidar", strategy_options={"draft_length": -2}, device="cpu"),
        lambda: LLM(str(tiny_tidar), strategy="tidar", strategy_options={"draft_len": 4}, device="cpu"),
        lambda: LLM(str(tiny_tidar), strategy="tidar", strategy_options={"bonus_token": "maybe"}, device="cpu"),
        lambda: LLM(str(tiny_tidar), strategy="ar", strategy_options={"draft_length": 4}, device="cpu"),
        lambda: LLM(str(tiny_tidar), strategy="reference", device="cpu"),
        lambda: LLM("tiny-llada", strategy="tidar", device="cpu"),
        lambda: LLM(str(tiny_tidar), strategy="tidar", device="cpu").generate("hi", SamplingParams(top_k=5)),
        lambda: LLM(str(tiny_tidar), strategy="tidar", cache="prefix", device="cpu"),
    ]
    for case in cases:
        with pytest.raises(DllmError) as info:
            case()
        assert "\n" not in str(info.value)


def test_next_drafts_come_from_the_accepted_branch_after_the_committed_tokens():
    """Branch j's rows sit at positions n+j+1..n+j+k+1: after the AR token (at n+j+1) the drafts are rows 1..k;
    without the bonus token a fully accepted row's next drafts start at n+k+1, rows 0..k-1 of branch k."""
    from types import SimpleNamespace
    from dllm.decoding.tidar_run import TiDARRun
    k, v = 3, 50
    pre = torch.zeros(2, k + 1, k + 1, v)
    for j in range(k + 1):
        for r in range(k + 1):
            pre[:, j, r, 10 * j + r] = 1.0          # argmax names (branch, row)
    run = SimpleNamespace(k=k, device=torch.device("cpu"), temperature=0, rows=[], drafts=None)
    TiDARRun._take_drafts(run, pre, torch.tensor([1, 3]), torch.tensor([True, False]))
    assert run.drafts.tolist() == [[11, 12, 13], [30, 31, 32]]


def test_cli_and_server_decode_with_tidar(tmp_path):
    """The bundled tiny-tidar through `dllm generate` and a live `dllm serve` (the official openai client,
    streamed): the API's tokens and text."""
    import openai
    from test_server import API_KEY, MODEL, ServerProcess
    question = "What is 12 + 30?"
    msgs = [{"role": "user", "content": question}]
    want = LLM("tiny-tidar", strategy="tidar", device="cpu").chat([msgs], SamplingParams(max_tokens=48, temperature=0))[0]
    r = subprocess.run([sys.executable, "-m", "dllm.cli", "generate", "--model", "tiny-tidar", "--strategy", "tidar",
                        "--chat", "--max-tokens", "48", "--temperature", "0", "--device", "cpu", "--json"],
                       input=question, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == want.token_ids
    srv = ServerProcess(bundled_path("tiny-tidar"), tmp_path / "serve.log", "--api-key", API_KEY, "--strategy", "tidar")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=48, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text
    finally:
        srv.stop()

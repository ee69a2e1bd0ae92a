"""Python API: prompt forms, chat template, and one clear error for each kind of bad input."""
from __future__ import annotations

import json
import shutil

import pytest

from dllm import LLM, DllmError, SamplingParams
from dllm.errors import InvalidParameterError, ModelNotFoundError, UnsupportedModelError


def test_prompt_forms_agree(llm_factory):
    llm = llm_factory()
    sp = SamplingParams(max_tokens=8, block_length=4, ignore_eos=True)
    ids = llm.tokenizer.encode("hello")
    by_text = llm.generate("hello", sp)[0]
    by_ids = llm.generate(ids, sp)[0]
    by_dict = llm.generate({"prompt_token_ids": ids}, sp)[0]
    assert by_text.token_ids == by_ids.token_ids == by_dict.token_ids
    assert by_text.prompt == "hello" and by_text.prompt_token_ids == ids


def test_chat_uses_the_checkpoint_template(llm_factory):
    llm = llm_factory()
    msgs = [{"role": "user", "content": "  hi  "}]
    text = llm.apply_chat_template(msgs)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    out = llm.chat(msgs, SamplingParams(max_tokens=8, block_length=4))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode(text, add_special_tokens=False)
    assert out.prompt_token_ids.count(llm.tokenizer.convert_tokens_to_ids("<|startoftext|>")) == 1
    two = llm.chat([msgs, msgs + [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "x"}]],
                   SamplingParams(max_tokens=8, block_length=4))
    assert len(two) == 2


def test_per_prompt_params_keep_order(llm_factory):
    llm = llm_factory()
    sps = [SamplingParams(max_tokens=8, block_length=4, ignore_eos=True),
           SamplingParams(max_tokens=12, block_length=4, ignore_eos=True),
           SamplingParams(max_tokens=8, block_length=4, ignore_eos=True)]
    outs = llm.generate(["a", "b", "c"], sps)
    assert [len(o.token_ids) for o in outs] == [8, 12, 8]
    assert outs[0].token_ids == llm.generate("a", sps[0])[0].token_ids


def test_defaults_from_checkpoint(llm_factory):
    out = llm_factory().generate("x", SamplingParams(ignore_eos=True))[0]
    assert len(out.token_ids) == 128  # LLaDA's default generation length; block 32, steps 128


@pytest.mark.parametrize("kwargs,message", [
    ({"max_tokens": 30, "block_length": 8}, "not divisible by block_length 8"),
    ({"max_tokens": 32, "block_length": 8, "steps": 6}, "not a multiple of the number of blocks 4"),
    ({"max_tokens": 600}, "exceeds the model's context of 512"),
])
def test_bad_lengths(llm_factory, kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        llm_factory().generate("hello", SamplingParams(**kwargs))


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"max_tokens": 2.5}, {"temperature": -1},
                                    {"remasking": "sometimes"}, {"threshold": 1.5}, {"factor": 0},
                                    {"seed": -1}, {"stop_token_ids": ["x"]}, {"block_length": True}])
def test_sampling_params_validate(kwargs):
    with pytest.raises(InvalidParameterError):
        SamplingParams(**kwargs)


def test_strategy_fields_must_match_the_strategy(llm_factory):
    with pytest.raises(InvalidParameterError, match="threshold does not apply to strategy 'reference'"):
        llm_factory().generate("hi", SamplingParams(max_tokens=8, block_length=4, threshold=0.9))


def test_bad_prompts(llm_factory):
    llm = llm_factory()
    with pytest.raises(InvalidParameterError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=8, block_length=4))
    with pytest.raises(InvalidParameterError, match="token ids must be integers"):
        llm.generate([[1, 10**9]], SamplingParams(max_tokens=8, block_length=4))
    with pytest.raises(InvalidParameterError, match="messages must be"):
        llm.chat([{"content": "no role"}])


def test_bad_engine_options(tiny_llada, tmp_path):
    with pytest.raises(InvalidParameterError, match="unknown cache 'lru'; choose one of: none, prefix, dual"):
        LLM(str(tiny_llada), cache="lru")
    with pytest.raises(InvalidParameterError, match="unknown strategy"):
        LLM(str(tiny_llada), strategy="greedy")
    with pytest.raises(InvalidParameterError, match="unknown dtype"):
        LLM(str(tiny_llada), dtype="int3")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "missing"))


def test_cuda_without_gpu(tiny_llada, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)   # runs (not skips) on a GPU machine too
    with pytest.raises(InvalidParameterError, match="no GPU is available"):
        LLM(str(tiny_llada), device="cuda")


def test_other_family_is_refused(tiny_llada, tmp_path):
    other = tmp_path / "qwen"
    shutil.copytree(tiny_llada, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="model_type 'qwen2'.*supported families: llada"):
        LLM(str(other))


def test_hub_id_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="is not a local directory and not in the local hub cache, and "
                                                 "HF_HUB_OFFLINE is set"):
        LLM("GSAI-ML/LLaDA-8B-Instruct")


def test_incomplete_checkpoint(tiny_llada_sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llada_sharded, broken)
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="missing shard"):
        LLM(str(broken))


def test_dummy_weights_without_tokenizer(tiny_llada):
    llm = LLM(str(tiny_llada), load_format="dummy", skip_tokenizer_init=True)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, block_length=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.text == ""
    with pytest.raises(DllmError, match="pass prompts as token ids"):
        llm.generate("text", SamplingParams(max_tokens=8, block_length=4))

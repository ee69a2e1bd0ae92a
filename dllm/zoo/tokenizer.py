"""The zoo's shared tokenizer: a small byte-level BPE trained on the task corpora, with ChatML turns.

Contract:
- special tokens are single ids 0..4, in this order: `<|endoftext|>` (eos and pad), `<|mask|>` (the
  diffusion mask, `mask_token`), `<|im_start|>`, `<|im_end|>` (end of a chat turn), `<|beginoftext|>`
  (bos; nothing adds it automatically);
- every digit is its own token: the pre-tokenizer isolates each digit before BPE, so no merge spans one;
- byte-level, no normaliser, no cleanup of spaces on decode: `decode(encode(text)) == text` for any text;
- `save_tokenizer` writes tokenizer.json, tokenizer_config.json (with the ChatML chat template) and
  special_tokens_map.json, loadable by `transformers.AutoTokenizer.from_pretrained(path)` without
  `trust_remote_code` from the tokenizer directory and from the diffusion models' directories;
- from a directory whose config.json says `model_type: qwen2` (tiny-ar), AutoTokenizer builds transformers'
  `Qwen2Tokenizer`, which keeps the vocabulary but replaces the pre-tokenizer with Qwen2's own, so it splits
  text differently from training: load it with `load_tokenizer(path)` (`PreTrainedTokenizerFast`), which
  reads tokenizer.json as written.

This module knows nothing about models; `tokenizer_corpus` reads the task generators of `eval.tasks`.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS, MASK, IM_START, IM_END, BOS = "<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>"
SPECIAL_TOKENS = (EOS, MASK, IM_START, IM_END, BOS)     # ids 0..4, in this order

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokens, as GPT-2's but with digits apart: one digit; a word (letters and `_`) or a run of other
# symbols, each with one leading space, and with the space after it when a digit follows (so `" carry "`,
# `" = "` and `" return"` are whole tokens and no digit is left with a lone space before it); whitespace, a
# newline keeping the indentation after it.
PRE_TOKEN_PATTERN = r"\p{N}| ?[\p{L}_]+(?: (?=\p{N}))?| ?[^\s\p{L}\p{N}_]+(?: (?=\p{N}))?|\s+(?!\S)|\s+"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on `texts`; see the module docstring for what the result guarantees."""
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special "
                         f"tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    # No model_max_length: the context length is a fact of the model's config, not of the tokenizer.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, mask_token=MASK,
        additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False)


def load_tokenizer(path: str | pathlib.Path) -> PreTrainedTokenizerFast:
    """The zoo tokenizer saved in `path`, exactly as tokenizer.json describes it (see the module docstring)."""
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str | pathlib.Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into directory `path`."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(path / "tokenizer.json"))
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    roles = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "mask_token": MASK}
    config = {
        "add_bos_token": False, "add_eos_token": False,
        "added_tokens_decoder": {str(ids[t]): dict(content=t, **entry) for t in SPECIAL_TOKENS},
        **roles, "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": tok.model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {**{k: dict(content=v, **{e: entry[e] for e in entry if e != "special"}) for k, v in roles.items()},
                   "additional_special_tokens": [IM_START, IM_END]}
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def tokenizer_corpus(num_per_task: int = 5000) -> Iterator[str]:
    """Training texts for the tokenizer: for `num_per_task` train problems of each task in `eval.tasks`,
    the user turn and the assistant turn as the chat template renders them between its special tokens
    (`"user\n" + prompt`, `"assistant\n" + target`). Test problems are never read."""
    from dllm.eval.tasks import TASKS     # eval depends on nothing in dllm; importing here keeps it that way round

    for name in TASKS:
        for problem in TASKS[name]().generate("train", num_per_task):
            yield f"user\n{problem.prompt}"
            yield f"assistant\n{problem.target}"


def build_zoo_tokenizer(vocab_size: int = 1024, num_per_task: int = 5000) -> PreTrainedTokenizerFast:
    """The zoo's tokenizer: `build_tokenizer` over `tokenizer_corpus(num_per_task)`."""
    return build_tokenizer(tokenizer_corpus(num_per_task), vocab_size)

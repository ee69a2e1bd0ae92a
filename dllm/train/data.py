"""Training examples: a task problem rendered with the chat template (prompt) and its worked solution plus the
end-of-turn and end-of-text tokens (response), padded with end-of-text to a fixed length as LLaDA's SFT does
(the model learns to fill the rest of the canvas with EOS)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    ids: torch.Tensor          # [B, L] token ids
    prompt_len: torch.Tensor   # [B] length of each prompt (response starts there)
    answer_len: torch.Tensor   # [B] response tokens before padding (target + end of turn + end of text)


def render(tokenizer, problem, end_of_turn: str) -> tuple[list[int], int, int]:
    """(ids, prompt_len, answer_len) for one problem."""
    from dllm.eval.tasks.chat import to_messages
    prompt = tokenizer.apply_chat_template(to_messages(problem), tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer.encode(prompt, add_special_tokens=False)
    r_ids = tokenizer.encode(problem.target + end_of_turn, add_special_tokens=False) + [tokenizer.eos_token_id]
    return p_ids + r_ids, len(p_ids), len(r_ids)


class ExampleSet:
    """Rendered examples of several tasks, mixed, sampled in seeded random batches of fixed length."""

    def __init__(self, tokenizer, tasks: dict[str, int], seq_len: int, end_of_turn: str, seed: int = 0):
        from dllm.eval.tasks import get_task
        self.rows: list[tuple[list[int], int, int]] = []
        for name, n in tasks.items():
            for problem in get_task(name).generate("train", n):
                ids, p, a = render(tokenizer, problem, end_of_turn)
                if len(ids) <= seq_len:
                    self.rows.append((ids, p, a))
        if not self.rows:
            raise ValueError(f"no example fits seq_len={seq_len}; raise it")
        self.seq_len, self.pad = seq_len, tokenizer.eos_token_id
        self.rng = random.Random(seed)

    def batch(self, size: int, device) -> Batch:
        rows = [self.rows[self.rng.randrange(len(self.rows))] for _ in range(size)]
        ids = torch.full((size, self.seq_len), self.pad, dtype=torch.long)
        for i, (r, _, _) in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        return Batch(ids.to(device), torch.tensor([p for _, p, _ in rows], device=device),
                     torch.tensor([a for _, _, a in rows], device=device))

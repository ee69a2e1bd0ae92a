"""The batch canvas: prompts left-padded so that every row's generation region starts at the same column,
followed by `max_tokens` MASK positions split into blocks.

Positions skip each row's left padding (a row's first real token is position 0), so a row computes the same
attention whatever padding its batch neighbours impose; RoPE depends only on position differences, so this
equals LLaDA's raw-index positions for the unpadded tokens. Pads are excluded as keys.
"""
from __future__ import annotations

import torch

from dllm.models.spec import ModelSpec


class Canvas:
    def __init__(self, prompts: list[list[int]], max_tokens: int, block_length: int, spec: ModelSpec,
                 device: torch.device):
        self.spec = spec
        self.gen_start = max(len(p) for p in prompts)
        self.length = self.gen_start + max_tokens
        self.block_length = block_length
        self.num_blocks = max_tokens // block_length
        rows = [[spec.pad_id] * (self.gen_start - len(p)) + list(p) for p in prompts]
        tokens = torch.full((len(prompts), self.length), spec.mask_id, dtype=torch.long)
        tokens[:, :self.gen_start] = torch.tensor(rows, dtype=torch.long)
        pad = torch.tensor([self.gen_start - len(p) for p in prompts], dtype=torch.long)[:, None]
        cols = torch.arange(self.length)[None, :]
        self.tokens = tokens.to(device)                                   # [B, T]
        self.positions = (cols - pad).clamp(min=0).to(device)             # [B, T]
        self.key_valid = (cols >= pad).to(device) if bool(pad.any()) else None  # [B, T] or None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def block(self, index: int) -> tuple[int, int]:
        start = self.gen_start + index * self.block_length
        return start, start + self.block_length

    def status(self, stop_ids: torch.Tensor) -> tuple[list[int], list[int]]:
        """Per row, offsets in the generation region of the first MASK and of the first committed stop token
        (max_tokens when there is none). One device-to-host transfer."""
        gen = self.tokens[:, self.gen_start:]
        size = gen.shape[1]
        is_mask = gen == self.spec.mask_id
        is_stop = torch.isin(gen, stop_ids)
        first_mask = torch.where(is_mask.any(1), is_mask.int().argmax(1), size)
        first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1), size)
        first_mask, first_stop = torch.stack([first_mask, first_stop]).tolist()
        return first_mask, first_stop

    def select_rows(self, keep: torch.Tensor) -> None:
        self.tokens = self.tokens[keep]
        self.positions = self.positions[keep]
        if self.key_valid is not None:
            self.key_valid = self.key_valid[keep]
            if bool(self.key_valid.all()):
                self.key_valid = None

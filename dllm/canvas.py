"""The batch canvas: each row's prompt followed by MASK positions, rows left-padded to one width, the columns
cut into blocks that every row decodes in step.

Two layouts, by the model's attention:
- full (LLaDA, Dream): prompts right-aligned, so every row's generation region starts at the same column;
  `max_tokens` MASK positions in `max_tokens / block_length` blocks.
- block_causal (SDAR): blocks are aligned to each row's absolute position 0, as SDAR was trained; rows are
  left-padded by whole blocks so that their grids coincide, and the block holding a prompt's last tokens is
  decoded together with the masks that follow them (SDAR's `block_diffusion_generate`). Rows whose prompts end
  at different offsets in a block therefore start generating at different columns.

Positions skip each row's left padding (a row's first real token is position 0), so a row computes the same
attention whatever padding its neighbours impose; for full attention RoPE depends only on position
differences, so this equals LLaDA's raw-index positions for the unpadded tokens. Pads are never attended to
(a pad query attends to itself only, so no attention row is empty).
"""
from __future__ import annotations

import torch

from dllm.models.spec import ModelSpec


class Canvas:
    def __init__(self, prompts: list[list[int]], max_tokens: int, block_length: int, spec: ModelSpec,
                 device: torch.device):
        self.spec, self.block_length, self.max_tokens = spec, block_length, max_tokens
        self.block_causal = spec.attention == "block_causal"
        lengths = [len(p) for p in prompts]
        if self.block_causal:
            first = [n // block_length for n in lengths]                       # each row's first decoded block
            ends = [-(-(n + max_tokens) // block_length) for n in lengths]    # ceil((P + G) / B)
            self.first_block = max(first)
            self.num_blocks = max(e - f for e, f in zip(ends, first))
            pads = [(self.first_block - f) * block_length for f in first]
        else:
            self.first_block, self.num_blocks = 0, max_tokens // block_length
            pads = [max(lengths) - n for n in lengths]
        width = max(p + n for p, n in zip(pads, lengths))
        self.length = (self.first_block + self.num_blocks) * block_length if self.block_causal else width + max_tokens
        tokens = torch.full((len(prompts), self.length), spec.mask_id, dtype=torch.long)
        for i, (pad, prompt) in enumerate(zip(pads, prompts)):
            tokens[i, :pad] = spec.pad_id
            tokens[i, pad:pad + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        pad = torch.tensor(pads, dtype=torch.long)[:, None]
        cols = torch.arange(self.length)[None, :]
        self.tokens = tokens.to(device)                                          # [B, T]
        self.positions = (cols - pad).clamp(min=0).to(device)                    # [B, T]
        self.key_valid = (cols >= pad).to(device) if bool(pad.any()) else None  # [B, T] or None
        self.gen_starts = torch.tensor([p + n for p, n in zip(pads, lengths)], device=device)  # [B]
        self.gen_start_cols = [p + n for p, n in zip(pads, lengths)]  # the same on the host: no sync per step
        self.gen_start = 0 if self.block_causal else width                        # first column of block 0
        self._cols = torch.arange(self.length, device=device)
        # Where each row's canvas ends (absolute column): the whole canvas unless a strategy truncated it
        # (Learn2PD's end-of-text prediction); columns past it are no longer attended to, decoded or emitted.
        self.ends = [self.length] * len(prompts)
        self._ends: torch.Tensor | None = None                                    # [B] on the device, once truncated

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def block(self, index: int) -> tuple[int, int]:
        start = (self.first_block + index) * self.block_length if self.block_causal else self.gen_start + index * self.block_length
        return start, start + self.block_length

    def attn_mask(self, q_start: int, q_end: int, k_end: int, k_start: int = 0) -> torch.Tensor | None:
        """Boolean attention mask for queries at columns [q_start, q_end) over keys [k_start, k_end):
        [B, 1, Lq, Lk] (block-causal) or [B, 1, 1, Lk] (key padding), or None when everything is visible."""
        kcols = self._cols[k_start:k_end]
        if self.block_causal:
            qcols = self._cols[q_start:q_end]
            visible = (kcols[None, :] // self.block_length) <= (qcols[:, None] // self.block_length)   # [Lq, Lk]
            if self.key_valid is None:
                return visible[None, None]
            own = qcols[:, None] == kcols[None, :]
            return (visible[None] & self.key_valid[:, None, k_start:k_end] | own[None])[:, None]
        if self.key_valid is None:
            return None
        return self.key_valid[:, None, None, k_start:k_end]

    def status_tensor(self, stop_ids: torch.Tensor) -> torch.Tensor:
        """Per row, offsets from its generation start of the first MASK and of the first committed stop token
        (max_tokens when there is none): [2, B] on the device (the engine's `StatusRead` brings it over)."""
        offset = self._cols[None, :] - self.gen_starts[:, None]                  # [B, T]
        in_gen = (offset >= 0) & (offset < self.max_tokens)
        if self._ends is not None:
            in_gen &= self._cols[None, :] < self._ends[:, None]
        is_mask = (self.tokens == self.spec.mask_id) & in_gen
        is_stop = torch.isin(self.tokens, stop_ids) & in_gen
        size = torch.full_like(self.gen_starts, self.max_tokens)
        first_mask = torch.where(is_mask.any(1), (offset.masked_fill(~is_mask, self.length)).min(1).values, size)
        first_stop = torch.where(is_stop.any(1), (offset.masked_fill(~is_stop, self.length)).min(1).values, size)
        return torch.stack([first_mask, first_stop])

    def generated(self, rows: list[int] | None = None, region: list[list[int]] | None = None) -> list[list[int]]:
        """The generation regions (max_tokens columns from each row's start) of `rows` (default all), as lists;
        one transfer of just those rows and columns, or none when `region` (`region()` of every row, already on
        the host) is given."""
        rows = list(range(self.batch_size)) if rows is None else rows
        if region is not None:
            lo = min(self.gen_start_cols)
            return [region[r][self.gen_start_cols[r] - lo:self.gen_start_cols[r] - lo + self.max_tokens] for r in rows]
        starts = [self.gen_start_cols[r] for r in rows]
        lo, hi = min(starts), max(starts) + self.max_tokens
        block = self.tokens[rows, lo:hi].tolist()
        return [r[s - lo:s - lo + self.max_tokens] for r, s in zip(block, starts)]

    def region(self) -> torch.Tensor:
        """Every row's tokens over the columns that hold some row's generation region, on the device."""
        lo = min(self.gen_start_cols)
        return self.tokens[:, lo:max(self.gen_start_cols) + self.max_tokens]

    def sizes(self) -> list[int]:
        """Per row, how many generated positions it can still hold (max_tokens, fewer once truncated)."""
        return [min(self.max_tokens, e - s) for e, s in zip(self.ends, self.gen_start_cols)]

    def alive(self, lo: int, hi: int) -> torch.Tensor | None:
        """[B, hi - lo] bool: columns still inside each row's canvas; None when no row was truncated."""
        if self._ends is None:
            return None
        return self._cols[None, lo:hi] < self._ends[:, None]

    def truncate(self, ends: list[int | None]) -> None:
        """End row r's canvas at absolute column ends[r] (None: unchanged); its keys past it are hidden."""
        changed = False
        for r, end in enumerate(ends):
            if end is not None and end < self.ends[r]:
                self.ends[r], changed = max(end, self.gen_start_cols[r]), True
        if not changed:
            return
        self._ends = torch.tensor(self.ends, device=self.tokens.device)
        valid = self._cols[None, :] < self._ends[:, None]
        self.key_valid = valid if self.key_valid is None else self.key_valid & valid

    def block_done(self, first_mask: list[int], end: int) -> bool:
        """Whether no row has a MASK before column `end` (within its first max_tokens generated positions)."""
        return all(m >= end - s for m, s in zip(first_mask, self.gen_start_cols))

    def select_rows(self, keep: torch.Tensor) -> None:
        self.tokens = self.tokens[keep]
        self.positions = self.positions[keep]
        self.gen_starts = self.gen_starts[keep]
        rows = keep.tolist()
        self.gen_start_cols = [self.gen_start_cols[i] for i in rows]
        self.ends = [self.ends[i] for i in rows]
        if self._ends is not None:
            self._ends = self._ends[keep]
        if self.key_valid is not None:
            self.key_valid = self.key_valid[keep]
            if bool(self.key_valid.all()):
                self.key_valid = None

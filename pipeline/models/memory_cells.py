"""What one segment step does for each memory kind: inputs around the segment, next memory state.

A cell is a plain object (not an nn.Module): it calls the decoder's backbone and, for armt, its
wrapped layers, so every parameter is still read inside its own module's forward (ZeRO-3).
``step`` returns the final (post-norm) hidden states at the segment's positions and the next
state; states are tuples of tensors with the batch first, so they can be checkpointed, batched
and detached uniformly.
"""

from __future__ import annotations

import torch
from torch import nn

from .associative import AssociativeLayer

State = tuple[torch.Tensor, ...]


class MemoryTokens(nn.Module):
    """Learned memory embeddings [m, d]; called, never read directly, so ZeRO-3 gathers them."""

    def __init__(self, num_tokens: int, hidden_size: int, init_std: float):
        super().__init__()
        self.num_tokens = num_tokens
        self.init_std = init_std
        self.weight = nn.Parameter(torch.randn(num_tokens, hidden_size) * init_std)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


def _positions(*ranges: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(start, start + length, device=device) for start, length in ranges]).unsqueeze(0)


class SegmentCell:
    """``none`` and ``full``: the segment alone (positions from ``offset``), no state."""

    def __init__(self, backbone: nn.Module, segment_len: int):
        self.backbone = backbone
        self.segment_len = segment_len

    def begin(self, batch_size: int, device: torch.device) -> State:
        """The state before the first segment (called once per forward: it calls the memory modules)."""
        return ()

    def _run(self, embeds: torch.Tensor, positions: torch.Tensor, cache=None):
        out = self.backbone(inputs_embeds=embeds, position_ids=positions.expand(embeds.shape[0], -1),
                            past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state, out.past_key_values

    def step(self, state: State, segment: torch.Tensor, write: bool, cache=None, offset: int = 0):
        hidden, cache = self._run(segment, _positions((offset, segment.shape[1]), device=segment.device), cache)
        return hidden, state, cache


class RecurrentCell(SegmentCell):
    """``rmt``: [read memory ; segment ; write memory]; the next memory is the output at the write positions.

    Positions are fixed: read 0..m-1, segment m.., write m+L..m+L+m-1 (L = segment_len), so a
    short last segment does not move the memory's positions.
    """

    def __init__(self, backbone: nn.Module, segment_len: int, tokens: MemoryTokens):
        super().__init__(backbone, segment_len)
        self.tokens = tokens
        self.m = tokens.num_tokens

    def begin(self, batch_size: int, device: torch.device) -> State:
        return (self.tokens(batch_size),)

    def step(self, state: State, segment: torch.Tensor, write: bool, cache=None, offset: int = 0):
        (memory,) = state
        m, length = self.m, segment.shape[1]
        read = offset == 0  # a continuation (generation with a KV cache) already holds the read memory
        parts = ([memory] if read else []) + [segment] + ([memory] if write else [])
        ranges = ([(0, m)] if read else []) + [(m + offset, length)] + ([(m + self.segment_len, m)] if write else [])
        hidden, cache = self._run(torch.cat(parts, dim=1), _positions(*ranges, device=segment.device), cache)
        start = m if read else 0
        next_state = (hidden[:, start + length:],) if write else state
        return hidden[:, start:start + length], next_state, cache


class AssociativeCell(SegmentCell):
    """``armt``: [segment ; write tokens]; each wrapped layer reads its matrix memory and writes it."""

    def __init__(self, backbone: nn.Module, segment_len: int, tokens: MemoryTokens, layers: list[AssociativeLayer],
                 hidden_size: int):
        super().__init__(backbone, segment_len)
        self.tokens = tokens
        self.layers = layers
        self.hidden_size = hidden_size
        self.write_tokens: torch.Tensor | None = None

    def begin(self, batch_size: int, device: torch.device) -> State:
        self.write_tokens = self.tokens(1)
        return tuple(t for layer in self.layers for t in layer.empty_state(batch_size, self.hidden_size, device))

    def step(self, state: State, segment: torch.Tensor, write: bool, cache=None, offset: int = 0):
        batch, length = segment.shape[:2]
        m = self.write_tokens.shape[1] if write else 0
        for i, layer in enumerate(self.layers):
            layer.state, layer.num_write, layer.next_state = (state[2 * i], state[2 * i + 1]), m, None
        try:
            parts = [segment] + ([self.write_tokens.expand(batch, -1, -1)] if write else [])
            ranges = [(offset, length)] + ([(self.segment_len, m)] if write else [])
            hidden, cache = self._run(torch.cat(parts, dim=1), _positions(*ranges, device=segment.device), cache)
            next_state = tuple(t for layer in self.layers for t in layer.next_state) if write else state
        finally:
            for layer in self.layers:
                layer.state, layer.num_write, layer.next_state = None, 0, None
        return hidden[:, :length], next_state, cache

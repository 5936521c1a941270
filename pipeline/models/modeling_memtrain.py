"""Memory-augmented decoders (RMT, ARMT, no memory, full attention) as one Hugging Face causal LM.

The file reads top to bottom like a transformers modeling file:

1. the memory kinds, one ``nn.Module`` per ``config.memory_kind``, each owning its parameters, its
   position layout, its segment step and its state, all registered in ``MEMORY_KINDS``;
2. the segment loop: per-segment loss inside each step, exact truncated BPTT, segment checkpointing;
3. padding: left/right padded rows are moved to a common start and back;
4. the model, ``MemoryModelForCausalLM``: HF ``forward`` and ``generate``.

Self-contained: this file, ``fused_head.py`` and ``configuration_memtrain.py`` are copied next to exported weights, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without memtrain.

ZeRO-3: a parameter is only read inside the forward of the module that owns it. Every memory kind's
step is its ``forward``; ARMT's per-layer parameters live in ``AssociativeLayer`` wrappers that the
backbone calls (ARMT's diagonal order stacks every layer's weights, so it never runs on partitioned
weights: ``AssociativeMemory.diagonal``). States are tuples of tensors with the batch first (checkpointed, stacked and
detached uniformly), passed in and returned explicitly; nothing is stored on modules.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_memtrain import MemoryModelConfig
from .fused_head import IGNORE_INDEX, HeadGradients, attach_head_gradients, linear_cross_entropy

EPS = 1e-5
State = tuple[torch.Tensor, ...]


def positions(*ranges: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Position ids [1, sum of lengths] of consecutive (start, length) ranges."""
    return torch.cat([torch.arange(start, start + length, device=device) for start, length in ranges]).unsqueeze(0)


def run_backbone(backbone: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor, **layer_kwargs) -> torch.Tensor:
    """Final (post-norm) hidden states of the decoder's backbone under its causal mask, no KV cache."""
    out = backbone(inputs_embeds=embeds, position_ids=position_ids.expand(embeds.shape[0], -1), use_cache=False,
                   **layer_kwargs)
    return out.last_hidden_state


# ---------------------------------------------------------------------------------------------
# 1. Memory kinds
# ---------------------------------------------------------------------------------------------


class MemoryKind(nn.Module):
    """What one segment step does: the inputs around the segment, their positions, the next state.

    ``forward(backbone, state, segment, write)`` -> (hidden [B, len, d] at the segment's positions,
    next state). ``state`` is None before the first segment (the kind builds its initial state there,
    inside its forward, so ZeRO-3 gathers the parameters it reads); ``write`` is False for the last
    segment of a pass (nothing reads its memory).
    """

    carries_state = False  # a state flows from segment to segment (truncated BPTT applies)
    whole_sample = False  # one step over the whole input instead of one per segment

    def __init__(self, config: MemoryModelConfig, decoder: PreTrainedModel | None = None):
        super().__init__()
        self.segment_len = config.segment_len

    @classmethod
    def check(cls, config: MemoryModelConfig, sample_len: int | None = None) -> None:
        """Raise ValueError if ``config`` (and a training sample of ``sample_len`` tokens) cannot work."""
        used = config.segment_len + cls.reserved_positions(config.num_memory_tokens)
        if used > config.max_positions:
            raise ValueError(f"segment_len {config.segment_len} + memory positions {used - config.segment_len} = "
                             f"{used} exceeds the decoder's {config.max_positions} positions")

    @staticmethod
    def reserved_positions(num_memory_tokens: int) -> int:
        """Positions a segment spends on memory tokens."""
        return 0

    def step_len(self, total: int) -> int:
        """Tokens per step for an input of ``total`` tokens."""
        return self.segment_len

    def reset_parameters(self) -> None:
        """(Re)initialise this kind's own parameters (called by the model's ``_init_weights``)."""

    def forward(self, backbone: nn.Module, state: State | None, segment: torch.Tensor, write: bool):
        raise NotImplementedError

    def run(self, backbone: nn.Module, embeds: torch.Tensor, state: State | None = None,
            keep: int = 0) -> tuple[torch.Tensor, State | None]:
        """Final hidden states [B, T, d] of every position of ``embeds`` read after ``state`` (inference: no
        loss, no truncation), and the state that step ``keep`` reads (``state`` itself for 0)."""
        spans = _spans(embeds.shape[1], self.step_len(embeds.shape[1]))
        hidden, kept = [], state
        for k, (start, end) in enumerate(spans):
            if k == keep:
                kept = state
            out, state = self(backbone, state, embeds[:, start:end], k < len(spans) - 1)
            hidden.append(out)
        return torch.cat(hidden, dim=1), kept

    def one_pass(self, backbone: nn.Module, total: int) -> bool:
        """Whether the loss over ``total`` tokens comes from one ``run`` (then split per segment) instead of
        a checkpointable step per segment."""
        return self.whole_sample


class NoMemory(MemoryKind):
    """``none``: each segment alone at positions 0..len-1; no state (the baseline)."""

    def forward(self, backbone, state, segment, write):
        hidden = run_backbone(backbone, segment, positions((0, segment.shape[1]), device=segment.device))
        return hidden, ()


class FullAttention(NoMemory):
    """``full``: plain attention over the whole input in one step (the upper reference)."""

    whole_sample = True

    def __init__(self, config, decoder=None):
        super().__init__(config)
        self.max_positions = config.max_positions

    @classmethod
    def check(cls, config, sample_len=None):
        if sample_len is not None and sample_len > config.max_positions:
            raise ValueError(f"full attends over data.segment_len * data.n_segments = {sample_len} tokens but the "
                             f"decoder has {config.max_positions} positions")

    def step_len(self, total):
        if total > self.max_positions:
            raise ValueError(f"full attention over {total} tokens exceeds the decoder's {self.max_positions} positions")
        return max(total, 1)


WRITE_MODES = ("paper", "norm", "gated")


class RecurrentMemory(MemoryKind):
    """``rmt``: inputs [read memory ; segment ; write memory]; the next memory comes from the outputs at
    the write positions (``write_memory``). The initial memory is a learned parameter [m, d].

    Positions are fixed: read 0..m-1, segment m.., write m+L..m+L+m-1 (L = segment_len), so a short
    last segment does not move the memory's positions.

    ``config.memory_write``, how the outputs h at the write positions become the next memory:
    ``paper``: h as is, the final (post-norm) hidden states (Bulatov et al. 2022). Their row norm is
    ~sqrt(d) (~13 at d = 128 after training) against ~0.7 for a token embedding: read memory enters
    the next segment an order of magnitude louder than any token.
    ``norm``: RMS-normalised h times a learned per-channel gain initialised at the memory init std
    (the embedding std), so memory enters at a token embedding's scale.
    ``gated``: m' = m + z * (norm(h) - m), z = sigmoid(W h + b) per channel (W = 0, b = 0 at the
    start): a learned keep-or-replace of each memory channel, written at the embedding scale.
    memtrain builds with ``norm`` (``memory.write``), by measurement on real text (66 KJV books,
    GPT-2 2x128, 300 steps; README "Memory on real text"): with 128-token segments ``paper`` is 23%
    worse than no memory in every segment, ``norm`` 11%; with 64-token segments both beat no memory
    (``paper`` by 3%, ``norm`` by 1%). The config's default stays ``paper`` so an export saved
    before the setting existed loads as the model it was.

    How it is trained matters more than the write. Trained on whole samples from the first step, a
    randomly initialised decoder learns language more slowly when it reads memory (segment 0 is as
    far behind as the rest; with the read memory frozen at its initial value, i.e. a learned prefix,
    it is not). memtrain therefore trains with ``train.curriculum: auto`` and
    ``train.curriculum_split`` by default: 1-segment chains first (the read memory is the initial
    memory), then 2, 3, ... up to ``n_segments``, every token kept. Same 128-token setting: rmt
    goes from 12% worse than no memory to 2% better in every segment; at 64-token segments, where
    whole samples did not hurt, the curriculum costs 3-4%; with a pretrained decoder rmt matches no
    memory with or without it. What memory itself carries at this scale is small: scoring the
    trained model with its memory reset at every segment costs 0.1-1% ppl in segments >= 1 after
    300 steps, 1.1-1.7% after 600.

    Under that curriculum the memory's own parameters (the initial memory, the write gain) train at
    0.1x the decoder's LR (``train.memory_lr_scale``, applied by the optimizer's param groups, not
    here; on whole samples from the first step 0.1x is far worse and the default is 1x). AdamW moves
    every parameter by about the LR per step whatever its scale, and these start at the embedding
    std (0.02): at the decoder's LR they can outgrow the tokens they sit beside within tens of
    steps. Over three seeds (same KJV setting, 128-token segments) rmt at 1x is level with no
    memory (mean ppl ratio 0.999: 0.978 / 1.017 / 1.002), at 0.1x 1.8% better (0.953 / 1.001 /
    0.992) and better than 1x on every seed; 0.03x and 0 (a frozen random memory) fall between,
    10x is 6% worse.
    """

    carries_state = True

    def __init__(self, config: MemoryModelConfig, decoder: PreTrainedModel | None = None):
        super().__init__(config)
        hidden = config.decoder_config.hidden_size
        self.num_tokens = config.num_memory_tokens
        self.init_std = memory_init_std(config)
        self.write_mode = config.memory_write
        self.weight = nn.Parameter(torch.randn(self.num_tokens, hidden) * self.init_std)
        if self.write_mode != "paper":
            self.write_gain = nn.Parameter(torch.full((hidden,), self.init_std))
        if self.write_mode == "gated":
            self.write_gate = nn.Parameter(torch.zeros(hidden, hidden))
            self.write_gate_bias = nn.Parameter(torch.zeros(hidden))

    @classmethod
    def check(cls, config, sample_len=None):
        super().check(config, sample_len)
        if config.memory_write not in WRITE_MODES:
            raise ValueError(f"memory_write must be one of {WRITE_MODES}, got {config.memory_write!r}")

    @staticmethod
    def reserved_positions(num_memory_tokens):
        return 2 * num_memory_tokens

    def reset_parameters(self):
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.write_mode != "paper":
            nn.init.constant_(self.write_gain, self.init_std)
        if self.write_mode == "gated":
            nn.init.zeros_(self.write_gate)
            nn.init.zeros_(self.write_gate_bias)

    def write_memory(self, written: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The next memory [B, m, d] from the final hidden states at the write positions and the read memory."""
        if self.write_mode == "paper":
            return written
        rms = torch.rsqrt(written.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(written.dtype)
        normed = written * rms * self.write_gain
        if self.write_mode == "norm":
            return normed
        z = torch.sigmoid(F.linear(written, self.write_gate, self.write_gate_bias))
        return memory + z * (normed - memory)

    def forward(self, backbone, state, segment, write):
        batch, length = segment.shape[:2]
        m = self.num_tokens
        memory = self.weight.unsqueeze(0).expand(batch, -1, -1) if state is None else state[0]
        parts = [memory, segment] + ([memory] if write else [])
        ranges = [(0, m), (m, length)] + ([(m + self.segment_len, m)] if write else [])
        hidden = run_backbone(backbone, torch.cat(parts, dim=1), positions(*ranges, device=segment.device))
        next_state = (self.write_memory(hidden[:, m + length:], memory),) if write else (memory,)
        return hidden[:, m:m + length], next_state


def dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """Deterministic parameter-free projection (Schlag et al. 2021): [..., d] -> [..., 2 * d * nu], >= 0."""
    x = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    rolled = torch.cat([x.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    return x.repeat(*([1] * (x.dim() - 1)), nu) * rolled


def layer_hidden(out: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states a decoder layer returns (alone, or first of a tuple in older transformers)."""
    return out[0] if isinstance(out, tuple) else out


class AssociativeState:
    """ARMT's per-layer memories for one segment step, handed to every ``AssociativeLayer`` through the
    backbone's layer kwargs (as a KV cache is): layer i reads ``inputs[i]`` = (A [B, d_key, d],
    z [B, d_key]) and, when the step has ``num_write`` write tokens, leaves its update in ``outputs[i]``."""

    def __init__(self, state: State, num_write: int):
        self.inputs = [state[i:i + 2] for i in range(0, len(state), 2)]
        self.outputs: list[State | None] = [None] * len(self.inputs)
        self.num_write = num_write

    def next_state(self) -> State:
        return tuple(t for layer_state in self.outputs for t in layer_state)


class AssociativeLayer(nn.Module):
    """Wraps decoder layer ``layer_idx``: read this layer's matrix memory before it, write it after it.

    Rodkin et al. 2024 (ARMT). With phi = L2-normalised DPFP features:

        read  (every token x):       x <- x + A^T q / (z . q + eps),   q = phi(W_q x)
        write (write tokens w):      k = phi(W_k w), v = W_v w, beta = sigmoid(W_b w + b)
              A <- A + sum_i beta_i k_i (v_i - A^T k_i / (z . k_i + eps))^T      (delta rule)
              z <- z + sum_i gamma_i k_i,  gamma = clip(1 - (z . k + eps) / |k|^2, 0, 1)  (no gradient)

    W_v starts at zero, as published; the other projections at ``init_std``.
    """

    def __init__(self, layer: nn.Module, layer_idx: int, hidden_size: int, d_mem: int, nu: int, init_std: float):
        super().__init__()
        self.layer = layer
        self.layer_idx = layer_idx
        self.nu = nu
        self.read_query = nn.Parameter(torch.randn(d_mem, hidden_size) * init_std)
        self.write_key = nn.Parameter(torch.randn(d_mem, hidden_size) * init_std)
        self.write_value = nn.Parameter(torch.zeros(hidden_size, hidden_size))
        self.write_gate = nn.Parameter(torch.randn(1, hidden_size) * init_std)
        self.write_gate_bias = nn.Parameter(torch.zeros(1))

    def _features(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.normalize(dpfp(F.linear(x, weight).float(), self.nu), dim=-1)

    @staticmethod
    def _lookup(keys: torch.Tensor, matrix: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        denom = torch.einsum("bk,btk->bt", norm, keys).unsqueeze(-1) + EPS
        return torch.bmm(keys, matrix) / denom, denom

    def forward(self, hidden_states: torch.Tensor, *args,
                armt_memory: AssociativeState | DiagonalPass | None = None, **kwargs):
        if armt_memory is None:
            raise RuntimeError("AssociativeLayer called without armt_memory (call it through the memory model)")
        if isinstance(armt_memory, DiagonalPass):
            return armt_memory(self.layer_idx, hidden_states, args, kwargs)
        matrix, norm = armt_memory.inputs[self.layer_idx]
        read, _ = self._lookup(self._features(hidden_states, self.read_query), matrix, norm)
        out = self.layer(hidden_states + read.to(hidden_states.dtype), *args, **kwargs)
        if armt_memory.num_write:
            armt_memory.outputs[self.layer_idx] = self._write(layer_hidden(out)[:, -armt_memory.num_write:],
                                                              matrix, norm)
        return out

    def _write(self, tokens: torch.Tensor, matrix: torch.Tensor, norm: torch.Tensor) -> State:
        keys = self._features(tokens, self.write_key)
        values = F.linear(tokens, self.write_value).float()
        gate = torch.sigmoid(F.linear(tokens, self.write_gate, self.write_gate_bias).float())
        old_values, denom = self._lookup(keys, matrix, norm)
        new_info = (1 - denom / (keys.pow(2).sum(-1, keepdim=True) + EPS)).clamp(0, 1).detach()
        matrix = matrix + torch.einsum("btk,btd->bkd", keys, gate * (values - old_values))
        norm = norm + (new_info * keys).sum(dim=1)
        return matrix, norm


class _LayerCall(Exception):
    """Stops a recording pass at the first layer with what the backbone hands its layers."""

    def __init__(self, layer_args: tuple, layer_kwargs: dict):
        super().__init__("layer call recorded")
        self.layer_args, self.layer_kwargs = layer_args, layer_kwargs


class DiagonalPass:
    """ARMT's cells in diagonal order (Sivtsov et al. 2025), as the ``armt_memory`` of two backbone calls.

    Cell (s, l), layer l on segment s, needs only cell (s, l - 1) (its input) and cell (s - 1, l) (the
    memory it reads): the cells of an anti-diagonal s + l = t are independent, and run as one call of
    the layer vmapped over the stacked weights of their layers (``torch.func``), S + L - 1 calls
    instead of S * L. Every segment has the same layout (padded to L + m tokens: causal attention keeps
    the padding from the real tokens), so every cell takes the same layer arguments. The backbone
    keeps its own work around the layers, whatever the decoder: the first call, on one segment,
    stops at layer 0 and records those arguments (causal mask, position embeddings...); the second,
    on every segment stacked along the batch, has layer 0 run the whole schedule and return the top
    layer's outputs, which the other layers pass through to the backbone's final norm.
    """

    def __init__(self, layers: nn.ModuleList, state: State, num_segments: int, num_write: int, keep: int):
        self.layers, self.num_segments, self.num_write, self.keep = layers, num_segments, num_write, keep
        self.matrices, self.norms = list(state[0::2]), list(state[1::2])
        self.kept: list[State | None] = [None] * len(layers)  # per layer: the memory segment ``keep`` reads
        self.layer_args: tuple | None = None  # recorded by the first call (then the cells' arguments)
        self.layer_kwargs: dict = {}
        self.top: torch.Tensor | tuple | None = None

    def __call__(self, layer_idx: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | tuple:
        if self.layer_args is None:
            raise _LayerCall(args, kwargs)
        if layer_idx == 0:
            with warnings.catch_warnings():  # CPU's fused attention has no vmap rule: it loops over the cells
                warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                self.top = self._run(hidden)
        return self.top

    def _cell(self, params: dict, buffers: dict, hidden: torch.Tensor, matrix: torch.Tensor,
              norm: torch.Tensor) -> tuple[torch.Tensor | tuple, torch.Tensor, torch.Tensor]:
        """One cell, with layer 0 as the template that functional_call fills with a layer's weights."""
        memory = AssociativeState((matrix, norm), self.num_write)
        out = functional_call(self.layers[0], (params, buffers), (hidden, *self.layer_args),
                              {**self.layer_kwargs, "armt_memory": memory})
        return out, *memory.outputs[0]

    def _run(self, hidden: torch.Tensor) -> torch.Tensor | tuple:
        """Top-layer outputs [S * B, T, d] of the segments' layer-0 inputs ``hidden`` [S * B, T, d]."""
        n_segments, n_layers = self.num_segments, len(self.layers)
        inputs = hidden.unflatten(0, (n_segments, -1))
        params, buffers = stack_module_state(list(self.layers))
        cells = vmap(self._cell)
        latest: list[torch.Tensor | None] = [None] * n_layers  # layer l's output on the last diagonal
        tops, out = [], None
        for t in range(n_segments + n_layers - 1):
            lo, hi = max(0, t - n_segments + 1), min(t, n_layers - 1)  # layer l runs segment t - l
            x = torch.stack(([inputs[t]] if lo == 0 else []) + latest[max(lo, 1) - 1:hi])
            out, matrices, norms = cells({k: v[lo:hi + 1] for k, v in params.items()},
                                         {k: v[lo:hi + 1] for k, v in buffers.items()}, x,
                                         torch.stack(self.matrices[lo:hi + 1]), torch.stack(self.norms[lo:hi + 1]))
            if lo <= t - self.keep <= hi:
                self.kept[t - self.keep] = (self.matrices[t - self.keep], self.norms[t - self.keep])
            self.matrices[lo:hi + 1], self.norms[lo:hi + 1] = matrices.unbind(), norms.unbind()
            latest[lo:hi + 1] = layer_hidden(out).unbind()
            if hi == n_layers - 1:
                tops.append(latest[-1])
        top = torch.cat(tops)
        return (top,) if isinstance(out, tuple) else top


ARMT_SCHEDULES = ("sequential", "diagonal")


class AssociativeMemory(MemoryKind):
    """``armt``: inputs [segment ; write tokens] at positions 0..len-1 and L..L+m-1; every decoder layer
    (wrapped in ``AssociativeLayer`` by ``__init__``) reads its matrix memory and the write tokens
    update it. State: (A_0, z_0, A_1, z_1, ...), zeros before the first segment, never saved.

    ``config.armt_schedule``: inference runs the (segment, layer) cells ``sequential`` (segment by
    segment, the backbone once per segment) or ``diagonal`` (``DiagonalPass``: an anti-diagonal of cells
    per vmapped layer call). The diagonal order needs ARMT's memory to be per layer: classic RMT's
    memory is the top layer's output, so its segment s + 1 waits for all of segment s and there is
    no diagonal to batch. It applies without gradients, in eval mode (no dropout), with every weight
    in place (not under ZeRO-3, whose partitioned weights only exist inside their own module's
    forward) and to inputs of two segments or more; everything else runs sequentially (training
    too: the stacked copies carry no gradient back to the parameters, and ZeRO-3 gathers one
    module's weights at a time). Measured (bench/model_step.py --armt-diag-only: d = 128, 4 layers,
    64-token segments, 4 memory tokens, batch 1, one thread of a shared 2-core CPU; medians of 3-5
    runs), diagonal over sequential at 8 / 32 / 64 segments: GPT-2 0.98x / 1.18x / 1.08x, Llama
    1.06x / 1.25x / 1.26x, per-segment NLLs within 2.3e-7 (relative). On a CPU a batched matmul is
    no faster per FLOP than a loop of plain ones, and the fused attention has no vmap rule (it
    loops over the cells): the gain is the per-call overhead of the small ops, well short of the
    1.8x Sivtsov et al. report on a GPU. The default stays ``sequential``; the diagonal order holds
    one more copy of the layers' weights and the whole input's hidden states during a forward.
    """

    carries_state = True

    def __init__(self, config: MemoryModelConfig, decoder: PreTrainedModel):
        super().__init__(config)
        self.init_std = memory_init_std(config)
        hidden = config.decoder_config.hidden_size
        self.weight = nn.Parameter(torch.randn(config.num_memory_tokens, hidden) * self.init_std)
        layers = decoder_layers(decoder)
        for i in range(len(layers)):
            layers[i] = AssociativeLayer(layers[i], i, hidden, config.armt_d_mem, config.armt_nu, self.init_std)
        self.state_shapes = [(2 * config.armt_d_mem * config.armt_nu, hidden)] * len(layers)
        self.schedule = config.armt_schedule

    @classmethod
    def check(cls, config, sample_len=None):
        if config.num_memory_tokens < 1:
            raise ValueError("armt writes its memory through memory tokens: num_memory_tokens must be >= 1")
        if config.armt_schedule not in ARMT_SCHEDULES:
            raise ValueError(f"armt_schedule must be one of {ARMT_SCHEDULES}, got {config.armt_schedule!r}")
        super().check(config, sample_len)

    @staticmethod
    def reserved_positions(num_memory_tokens):
        return num_memory_tokens

    def reset_parameters(self):
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def initial_state(self, batch: int, device: torch.device) -> State:
        return tuple(t for d_key, d in self.state_shapes
                     for t in (torch.zeros(batch, d_key, d, device=device), torch.zeros(batch, d_key, device=device)))

    def forward(self, backbone, state, segment, write):
        batch, length = segment.shape[:2]
        state = self.initial_state(batch, segment.device) if state is None else state
        tokens = self.weight.unsqueeze(0).expand(batch, -1, -1) if write else segment[:, :0]
        memory = AssociativeState(state, tokens.shape[1])
        ranges = [(0, length)] + ([(self.segment_len, tokens.shape[1])] if write else [])
        hidden = run_backbone(backbone, torch.cat([segment, tokens], dim=1), positions(*ranges, device=segment.device),
                              armt_memory=memory)
        return hidden[:, :length], memory.next_state() if write else state

    def diagonal(self, backbone: nn.Module, total: int) -> bool:
        """Whether ``total`` tokens run in diagonal order (see the class docstring for when)."""
        return (self.schedule == "diagonal" and total > self.segment_len and not torch.is_grad_enabled()
                and not backbone.training and not any(hasattr(p, "ds_id") for p in backbone.parameters()))

    def one_pass(self, backbone, total):
        return self.diagonal(backbone, total)

    def run(self, backbone, embeds, state=None, keep=0):
        if not self.diagonal(backbone, embeds.shape[1]):
            return super().run(backbone, embeds, state, keep)
        batch, total, width = embeds.shape
        n_segments, length = -(-total // self.segment_len), self.segment_len
        segments = F.pad(embeds, (0, 0, 0, n_segments * length - total)).unflatten(1, (n_segments, length))
        tokens = self.weight.expand(batch, n_segments, -1, -1)
        cells = torch.cat([segments, tokens], dim=2).transpose(0, 1).flatten(0, 1)  # [S * B, L + m, d]
        schedule = DiagonalPass(decoder_layers(backbone), self.initial_state(batch, embeds.device)
                                if state is None else state, n_segments, tokens.shape[2], keep)
        position_ids = positions((0, cells.shape[1]), device=embeds.device)
        try:
            run_backbone(backbone, cells[:batch], position_ids, armt_memory=schedule)
        except _LayerCall as call:  # keep its contents, not the exception (its traceback holds the frames)
            schedule.layer_args, schedule.layer_kwargs = call.layer_args, call.layer_kwargs
        hidden = run_backbone(backbone, cells, position_ids, armt_memory=schedule)
        hidden = hidden.unflatten(0, (n_segments, batch))[:, :, :length].transpose(0, 1).reshape(batch, -1, width)
        kept = state if keep == 0 else tuple(t for layer_state in schedule.kept for t in layer_state)
        return hidden[:, :total], kept


MEMORY_KINDS: dict[str, type[MemoryKind]] = {
    "rmt": RecurrentMemory, "armt": AssociativeMemory, "none": NoMemory, "full": FullAttention}


def memory_kind(config: MemoryModelConfig, sample_len: int | None = None) -> type[MemoryKind]:
    """The checked class of ``config.memory_kind`` (rmt without memory tokens is the no-memory loop)."""
    if config.memory_kind not in MEMORY_KINDS:
        raise ValueError(f"memory_kind must be one of {tuple(MEMORY_KINDS)}, got {config.memory_kind!r}")
    kind = MEMORY_KINDS[config.memory_kind]
    if kind is RecurrentMemory and config.num_memory_tokens == 0:
        kind = NoMemory
    kind.check(config, sample_len)
    return kind


def memory_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The memory's own parameters in ``model`` (any wrapper of a MemoryModelForCausalLM): the memory
    kind's (rmt's initial memory and write gain, armt's write tokens) and ARMT's per-layer read/write
    projections, not the decoder weights they wrap. ``train.memory_lr_scale`` applies to these."""
    found = []
    for module in model.modules():
        if isinstance(module, MemoryKind):
            found += module.parameters()
        elif isinstance(module, AssociativeLayer):
            found += module.parameters(recurse=False)
    return found


def memory_init_std(config: MemoryModelConfig) -> float:
    return config.memory_init_std or getattr(config.decoder_config, "initializer_range", 0.02)


def decoder_layers(decoder: PreTrainedModel) -> nn.ModuleList:
    """The repeated block list of a HF causal LM (``transformer.h``, ``model.layers``, ``gpt_neox.layers``...)."""
    n_layers = decoder.config.num_hidden_layers
    for module in decoder.base_model.children():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"cannot find the {n_layers} decoder layers of {type(decoder).__name__}")


# ---------------------------------------------------------------------------------------------
# 2. The segment loop
# ---------------------------------------------------------------------------------------------
#
# Truncated BPTT with depth d (``bptt_depth``): the loss of segment k sends gradient to segment
# j <= k (its inputs, and through them to every parameter used there) iff ``k - j <= d``; d = -1
# means no limit. The learned initial memory counts as part of segment 0.
#
# Detaching the memory every d segments (the usual shortcut) gives some pairs depth d and others
# depth 0. To be exact per pair, the loop carries a window of memory *versions* with the same value
# but different graphs: version r was detached r segments ago. Segment k runs once on all versions
# stacked along the batch (at most d + 1 of them); the loss reads the deepest version, version r
# feeds version r + 1 of the next segment and version 0 is always a detached copy. This costs up to
# (d + 1)x the compute of a segment when 0 < d < n_segments - 1; d = 0 and d = -1 (or
# d >= n_segments - 1) run a single version.
#
# Each step returns only (next state, hidden states); the head's loss runs after it, outside the
# checkpointed step: fused (``fused_head``: the loss and its gradients in one chunked pass, so the
# backward recomputes only the decoder, and full logits never exist) when the head is a plain
# Linear, else through full logits in a checkpoint of its own. Only (state, NLL sum, count, and the
# gradient at the hidden states) outlive a step: activation memory is flat in the segment count.


@dataclass
class SegmentStats:
    nll: torch.Tensor  # float32 [n_segments]: NLL sums over the batch
    tokens: torch.Tensor  # int64 [n_segments]: counted targets
    token_nll: torch.Tensor | None  # float32 [B, T] in target frame (column t = NLL of target t), or None


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """HF's shift: position t predicts labels[:, t + 1] (across segment boundaries); the last predicts nothing."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def head_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
              per_token: bool) -> tuple[torch.Tensor, ...]:
    """(NLL sum, count[, per-position NLL]) of ``head(hidden)`` against ``targets``, in float32."""
    logits = head(hidden).float()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    nll = nll.view(targets.shape)
    count = (targets != IGNORE_INDEX).sum()
    return (nll.sum(), count, nll) if per_token else (nll.sum(), count)


# what checkpoint_policy="save_matmuls" keeps: the ops that hold most of a segment's FLOPs (linear
# layers lower to mm/addmm, GPT-2's Conv1D to addmm, eager attention to bmm/baddbmm, SDPA to its kernels)
MATMUL_OPS = frozenset({
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default, torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
})


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in MATMUL_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _maybe_checkpoint(policy: str | None, fn: Callable, *args):
    """``fn(*args)``, checkpointed unless ``policy`` is None; ``save_matmuls`` recomputes only the
    pointwise ops in the backward (torch's selective activation checkpointing)."""
    if policy is None:
        return fn(*args)
    if policy == "save_matmuls":
        return checkpoint(fn, *args, use_reentrant=False,
                          context_fn=lambda: create_selective_checkpoint_contexts(_save_matmuls))
    return checkpoint(fn, *args, use_reentrant=False)


class SegmentLoss:
    """Collects (NLL sum, count[, per-position NLL]) per segment and stacks them into SegmentStats.
    ``checkpointing``: the checkpoint policy of an unfused head's loss, None for none."""

    def __init__(self, head: Callable, fused: bool, checkpointing: str | None, per_token: bool):
        self.head, self.checkpointing, self.per_token = head, checkpointing, per_token
        self.grads = HeadGradients() if fused and isinstance(head, nn.Linear) else None
        self.nll, self.counts, self.token_nll = [], [], []

    def add(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        if self.grads is not None:
            stats = linear_cross_entropy(self.head, hidden, targets, self.grads, self.per_token)
        else:
            stats = _maybe_checkpoint(self.checkpointing, lambda h, t: head_loss(self.head, h, t, self.per_token),
                                      hidden, targets)
        self.nll.append(stats[0])
        self.counts.append(stats[1])
        if self.per_token:
            self.token_nll.append(stats[2])

    def stats(self) -> SegmentStats:
        nll = torch.stack(self.nll)
        if self.grads is not None:
            nll = attach_head_gradients(self.head, nll, self.grads)
        return SegmentStats(nll, torch.stack(self.counts), _to_target_frame(self.token_nll) if self.per_token else None)


def _split_versions(state: State, copies: int) -> list[State]:
    return [tuple(t.chunk(copies)[i] for t in state) for i in range(copies)]


def _spans(total: int, step_len: int) -> list[tuple[int, int]]:
    """(start, end) of each step; the last one may be short."""
    return [(start, min(start + step_len, total)) for start in range(0, total, step_len)]


def run_segments(memory: MemoryKind, backbone: nn.Module, loss: SegmentLoss, embeds: torch.Tensor,
                 targets: torch.Tensor, bptt_depth: int, checkpointing: str | None) -> SegmentStats:
    """Loss statistics of a recurrent pass over ``embeds`` [B, T, d] (the last segment may be short);
    ``checkpointing``: the checkpoint policy of each segment step, None for none."""
    batch = embeds.shape[0]
    spans = _spans(embeds.shape[1], memory.step_len(embeds.shape[1]))
    truncated = memory.carries_state and torch.is_grad_enabled() and 0 <= bptt_depth < len(spans) - 1
    versions: list[State | None] = [None]
    for k, (start, end) in enumerate(spans):
        write = k < len(spans) - 1
        copies = len(versions)
        stacked = tuple(torch.cat(parts) for parts in zip(*versions)) if copies > 1 else versions[0]
        segment = embeds[:, start:end]
        segment = segment.repeat(copies, 1, 1) if copies > 1 else segment

        def step(stacked_state, segment, write=write):
            hidden, next_state = memory(backbone, stacked_state, segment, write)
            return next_state, hidden[-batch:]

        next_state, hidden = _maybe_checkpoint(checkpointing, step, stacked, segment)
        loss.add(hidden, targets[:, start:end])
        if not truncated:
            versions = [next_state]
        else:
            outs = _split_versions(next_state, copies)
            versions = [tuple(t.detach() for t in outs[0])] + outs[:min(copies, bptt_depth)]
    return loss.stats()


def run_whole(memory: MemoryKind, backbone: nn.Module, loss: SegmentLoss, embeds: torch.Tensor,
              targets: torch.Tensor, segment_len: int) -> SegmentStats:
    """Loss statistics of one ``run`` over the whole input (full attention; ARMT in diagonal order), still
    reported per segment (there is no segment step to recompute; an unfused head is checkpointed per
    segment)."""
    hidden, _ = memory.run(backbone, embeds)
    for start, end in _spans(embeds.shape[1], segment_len):
        loss.add(hidden[:, start:end], targets[:, start:end])
    return loss.stats()


def _to_target_frame(position_nll: list[torch.Tensor]) -> torch.Tensor:
    """Per-position NLLs (position t predicts target t + 1) -> column t holds the NLL of target t."""
    nll = torch.cat(position_nll, dim=1)
    return torch.cat([torch.zeros_like(nll[:, :1]), nll[:, :-1]], dim=1)


# ---------------------------------------------------------------------------------------------
# 3. Padding
# ---------------------------------------------------------------------------------------------


class Packing:
    """Padded rows (one run of ones per ``attention_mask`` row: left, right or both sides padded) moved to
    start at column 0. In a causal model the tokens after a row's end cannot change its outputs, so a
    packed row computes exactly what the unpadded row would, segment boundaries and memory included."""

    def __init__(self, attention_mask: torch.Tensor):
        mask = attention_mask.bool()
        total = mask.shape[1]
        self.lengths = mask.sum(dim=1)
        starts = mask.int().argmax(dim=1)
        columns = torch.arange(total, device=mask.device)
        run = (columns >= starts[:, None]) & (columns < (starts + self.lengths)[:, None])
        if not bool((run == mask).all()):
            raise ValueError("attention_mask must hold one run of ones per row (left or right padding): "
                             "a memory model reads every token of a segment and cannot skip tokens inside it")
        self.valid = columns[None] < self.lengths[:, None]  # in the packed frame
        self._pack = ((columns[None] + starts[:, None]) % total)
        self._unpack = ((columns[None] - starts[:, None]) % total)

    @staticmethod
    def of(attention_mask: torch.Tensor | None) -> Packing | None:
        """None when nothing is padded."""
        if attention_mask is None or bool(attention_mask.bool().all()):
            return None
        return Packing(attention_mask)

    @staticmethod
    def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        index = index.to(x.device)
        return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return self._gather(x, self._pack)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return self._gather(x, self._unpack)


# ---------------------------------------------------------------------------------------------
# 4. The model
# ---------------------------------------------------------------------------------------------


class SegmentMemoryCache:
    """What ``generate`` carries between forward calls in place of a KV cache: the (packed) ids of the
    first whole segments of every row and the memory state after them. A call whose input starts with
    those ids resumes there, so a new token costs one or two segments, not the whole sequence; any
    other input is recomputed from the start, so the cache can never change a result."""

    is_compileable = False

    def __init__(self, ids: torch.Tensor, state: State | None):
        self.ids, self.state = ids, state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.ids.shape[1]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.ids = self.ids[beam_idx.to(self.ids.device)]
        if self.state is not None:
            self.state = tuple(t[beam_idx.to(t.device)] for t in self.state)

    def resumes(self, ids: torch.Tensor) -> bool:
        n = self.ids.shape[1]
        return ids.shape[0] == self.ids.shape[0] and ids.shape[1] >= n and torch.equal(ids[:, :n], self.ids)


@dataclass
class MemoryModelOutput(ModelOutput):
    """``loss`` = sum(segment_nll) / sum(segment_tokens). Segment k's statistics are the predictions
    made from segment k's positions (targets k*L+1 .. (k+1)*L)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    segment_nll: torch.Tensor | None = None
    segment_tokens: torch.Tensor | None = None
    token_nll: torch.Tensor | None = None
    past_key_values: SegmentMemoryCache | None = None


class MemoryModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A decoder (any HF causal LM that takes ``inputs_embeds``) with segment-level memory.

    ``generate`` is transformers' own: each step runs ``forward`` on the whole sequence, which resumes
    from the memory state after the segments it has already read (``SegmentMemoryCache``; no KV cache
    inside a segment), so generation crosses segment boundaries, writes memory there, and every logits
    processor, stopping criterion, beam search and left-padded batch works as for any causal LM.
    """

    config_class = MemoryModelConfig
    base_model_prefix = "decoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: MemoryModelConfig, decoder: PreTrainedModel | None = None):
        super().__init__(config)
        kind = memory_kind(config)
        if decoder is None:
            decoder = AutoModelForCausalLM.from_config(config.decoder_config)
        else:  # pretrained weights: keep post_init (and ZeRO-3's gathered init) from re-initialising them
            for module in decoder.modules():
                module._is_hf_initialized = True
        self.decoder = decoder
        self.memory = kind(config, decoder)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The decoder initialises itself (it is a PreTrainedModel); AssociativeLayer sets its own values.
        if isinstance(module, MemoryKind):
            module.reset_parameters()

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.decoder.get_output_embeddings()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, inputs_embeds: torch.FloatTensor | None = None,
                return_token_nll: bool = False, logits_to_keep: int = 0, return_dict: bool | None = None,
                num_items_in_batch: int | torch.Tensor | None = None, use_cache: bool = False,
                past_key_values: SegmentMemoryCache | None = None, **kwargs) -> MemoryModelOutput | tuple:
        """input_ids [B, T] (any T; the last segment may be short); ``attention_mask`` [B, T] with one run
        of ones per row (left or right padding); labels [B, T], -100 = not a target, shifted here as in
        HF (position t predicts labels[t + 1]; padded positions never count).

        With labels: the mean ``loss`` (over targets, or ``sum / num_items_in_batch`` as transformers'
        Trainer asks under gradient accumulation), per-segment NLL sums and target counts, and
        ``token_nll`` [B, T] on request; no logits (a long sample's full-vocabulary logits are what the
        segment-wise loss avoids). Without labels: ``logits`` [B, T, V] (the last ``logits_to_keep`` if
        > 0); with ``use_cache`` and ``logits_to_keep=1`` (what ``generate`` asks) also a
        ``SegmentMemoryCache`` to pass back as ``past_key_values`` with the extended input. Other HF
        kwargs (position_ids, output_attentions...) are accepted and ignored: the memory kind lays out
        its own positions.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        packing = Packing.of(attention_mask)
        if packing is not None:
            embeds = packing.pack(embeds)
        backbone, head = self.decoder.base_model, self.get_output_embeddings()
        if labels is None and use_cache and logits_to_keep == 1 and input_ids is not None \
                and not self.memory.whole_sample:
            out = self._next_token_logits(input_ids, packing, past_key_values)
        elif labels is None:
            hidden, _ = self.memory.run(backbone, embeds)
            hidden = packing.unpack(hidden) if packing is not None else hidden
            out = MemoryModelOutput(logits=head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden))
        else:
            if packing is not None:
                labels = packing.pack(labels).masked_fill(~packing.valid.to(labels.device), IGNORE_INDEX)
            out = self._loss(embeds, shift_targets(labels), return_token_nll, num_items_in_batch)
            if packing is not None and out.token_nll is not None:
                out.token_nll = packing.unpack(out.token_nll)
        return out if return_dict is not False else out.to_tuple()

    def _loss(self, embeds: torch.Tensor, targets: torch.Tensor, per_token: bool,
              num_items_in_batch: int | torch.Tensor | None) -> MemoryModelOutput:
        cfg, backbone, head = self.config, self.decoder.base_model, self.get_output_embeddings()
        checkpointing = cfg.checkpoint_policy if cfg.segment_checkpointing and torch.is_grad_enabled() else None
        loss = SegmentLoss(head, cfg.fused_head, checkpointing, per_token)
        if self.memory.one_pass(backbone, embeds.shape[1]):
            stats = run_whole(self.memory, backbone, loss, embeds, targets, cfg.segment_len)
        else:
            stats = run_segments(self.memory, backbone, loss, embeds, targets, cfg.bptt_depth, checkpointing)
        denominator = stats.tokens.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return MemoryModelOutput(loss=stats.nll.sum() / denominator, segment_nll=stats.nll,
                                 segment_tokens=stats.tokens, token_nll=stats.token_nll)

    def _next_token_logits(self, input_ids: torch.LongTensor, packing: Packing | None,
                           cache: SegmentMemoryCache | None) -> MemoryModelOutput:
        """Logits [B, 1, V] at every row's last token, resuming from ``cache`` where it applies."""
        ids = packing.pack(input_ids) if packing is not None else input_ids
        total, segment_len = ids.shape[1], self.config.segment_len
        lengths = packing.lengths if packing is not None else torch.full((ids.shape[0],), total, device=ids.device)
        last = (lengths - 1).clamp(min=0)
        keep = int((last // segment_len).min())  # whole segments before every row's last token
        start, state = (cache.ids.shape[1] // segment_len, cache.state) if cache is not None and cache.resumes(ids) \
            else (0, None)
        embeds = self.get_input_embeddings()(ids[:, start * segment_len:])
        hidden, kept = self.memory.run(self.decoder.base_model, embeds, state, keep - start)
        index = (last - start * segment_len).to(hidden.device)
        hidden = hidden.gather(1, index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1]))
        return MemoryModelOutput(logits=self.get_output_embeddings()(hidden),
                                 past_key_values=SegmentMemoryCache(ids[:, :keep * segment_len], kept))

    # generation: transformers' loop; forward resumes from the SegmentMemoryCache it returned last time

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor,
                                      past_key_values: SegmentMemoryCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      **kwargs) -> dict:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": past_key_values,
                "use_cache": use_cache, "logits_to_keep": 1}


MemoryModelConfig.register_for_auto_class()
MemoryModelForCausalLM.register_for_auto_class("AutoModelForCausalLM")

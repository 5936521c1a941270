"""ARMT's associative memory: one matrix memory per decoder layer, written with a delta rule.

Rodkin et al. 2024, "Associative Recurrent Memory Transformer". Per layer, with DPFP feature map
phi and L2-normalised features:

    read  (every token x, before the layer):  x <- x + A^T q / (z . q + eps),   q = phi(W_q x)
    write (memory tokens w, after the layer):  k = phi(W_k w), v = W_v w, beta = sigmoid(W_b w)
          v_old = A^T k / (z . k + eps)
          A <- A + sum_i beta_i k_i (v_i - v_old_i)^T        (delta rule: replace, not add)
          z <- z + sum_i gamma_i k_i,   gamma = clip(1 - (z . k + eps) / |k|^2, 0, 1)  (no gradient)

A [B, d_key, d] and z [B, d_key] are per batch row. They are plain attributes set by the owner
for each call (``state``, ``num_write``) and read back (``next_state``): never parameters or
buffers, so they are not in the state_dict. The projections are raw parameters initialised in
``__init__`` (W_v at zero, as published), so ZeRO-3's partitioning sees their final values and
the wrapped decoder's own ``_init_weights`` does not touch them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


def dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """Deterministic parameter-free projection (Schlag et al. 2021): [..., d] -> [..., 2 * d * nu], >= 0."""
    x = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    rolled = torch.cat([x.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    return x.repeat(*([1] * (x.dim() - 1)), nu) * rolled


class AssociativeLayer(nn.Module):
    """Wraps one decoder layer: read from this layer's memory before it, write after it."""

    def __init__(self, layer: nn.Module, hidden_size: int, d_mem: int, nu: int, init_std: float):
        super().__init__()
        self.layer = layer
        self.nu = nu
        self.d_key = 2 * d_mem * nu
        self.read_query = nn.Parameter(torch.randn(d_mem, hidden_size) * init_std)
        self.write_key = nn.Parameter(torch.randn(d_mem, hidden_size) * init_std)
        self.write_value = nn.Parameter(torch.zeros(hidden_size, hidden_size))
        self.write_gate = nn.Parameter(torch.randn(1, hidden_size) * init_std)
        self.write_gate_bias = nn.Parameter(torch.zeros(1))
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.num_write = 0
        self.next_state: tuple[torch.Tensor, torch.Tensor] | None = None

    def empty_state(self, batch_size: int, hidden_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(batch_size, self.d_key, hidden_size, device=device),
                torch.zeros(batch_size, self.d_key, device=device))

    def _features(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.normalize(dpfp(F.linear(x, weight).float(), self.nu), dim=-1)

    @staticmethod
    def _lookup(keys: torch.Tensor, matrix: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        denom = torch.einsum("bk,btk->bt", norm, keys).unsqueeze(-1) + EPS
        return torch.bmm(keys, matrix) / denom, denom

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.state is None:
            raise RuntimeError("AssociativeLayer called without a memory state (call it through the memory model)")
        matrix, norm = self.state
        read, _ = self._lookup(self._features(hidden_states, self.read_query), matrix, norm)
        out = self.layer(hidden_states + read.to(hidden_states.dtype), *args, **kwargs)
        if self.num_write:
            hidden = out[0] if isinstance(out, tuple) else out
            self.next_state = self._write(hidden[:, -self.num_write:], matrix, norm)
        return out

    def _write(self, tokens: torch.Tensor, matrix: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._features(tokens, self.write_key)
        values = F.linear(tokens, self.write_value).float()
        gate = torch.sigmoid(F.linear(tokens, self.write_gate, self.write_gate_bias).float())
        old_values, denom = self._lookup(keys, matrix, norm)
        new_info = (1 - denom / (keys.pow(2).sum(-1, keepdim=True) + EPS)).clamp(0, 1).detach()
        matrix = matrix + torch.einsum("btk,btd->bkd", keys, gate * (values - old_values))
        norm = norm + (new_info * keys).sum(dim=1)
        return matrix, norm

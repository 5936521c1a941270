"""Memory semantics: exact truncated BPTT per segment pair, checkpointing equivalence (and what selective
checkpointing saves), ARMT state."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from model_support import SEGMENT_LEN, random_ids, tiny_model

from pipeline.models.modeling_memtrain import MATMUL_OPS, AssociativeLayer

N_SEGMENTS = 5


def reached_segments(model, k: int, embeds: torch.Tensor, segment_nll: torch.Tensor) -> set[int]:
    (grad,) = torch.autograd.grad(segment_nll[k], embeds, retain_graph=True)
    per_segment = grad.abs().view(grad.shape[0], N_SEGMENTS, SEGMENT_LEN, -1).sum(dim=(0, 2, 3))
    return {j for j in range(N_SEGMENTS) if per_segment[j] > 0}


@pytest.mark.parametrize("kind,write", [("rmt", "paper"), ("rmt", "norm"), ("rmt", "gated"), ("armt", "paper")])
@pytest.mark.parametrize("depth", [0, 1, 2, -1])
def test_bptt_depth_is_exact_for_every_segment_pair(kind, write, depth):
    model = tiny_model(kind, "gpt2", f"memory.bptt_depth={depth}", f"memory.write={write}",
                       "model.segment_checkpointing=true").train()
    ids = random_ids(2, N_SEGMENTS)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=ids)
    for k in range(N_SEGMENTS):
        expected = {j for j in range(k + 1) if depth == -1 or k - j <= depth}
        assert reached_segments(model, k, embeds, out.segment_nll) == expected, f"loss of segment {k}"


def test_initial_memory_counts_as_segment_zero():
    model = tiny_model("rmt", "gpt2", "memory.bptt_depth=1").train()
    out = model(random_ids(2, N_SEGMENTS), labels=random_ids(2, N_SEGMENTS))
    reached = [torch.autograd.grad(out.segment_nll[k], model.memory.weight, retain_graph=True)[0].abs().sum() > 0
               for k in range(N_SEGMENTS)]
    assert reached == [True, True, False, False, False]


def grads_of(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,depth,write", [("rmt", -1, "paper"), ("rmt", 1, "paper"), ("rmt", 1, "gated"),
                                              ("armt", -1, "paper"), ("none", -1, "paper"), ("full", -1, "paper")])
def test_checkpointing_gives_the_same_loss_and_gradients(kind, depth, write):
    ids = random_ids(2, 4)
    model = tiny_model(kind, "gpt2", f"memory.bptt_depth={depth}", f"memory.write={write}").train()
    reference_loss, reference = grads_of(model, ids)
    assert len(reference) == len(list(model.parameters()))
    model.config.segment_checkpointing = True
    variants = [grads_of(model, ids)]
    model.config.checkpoint_policy = "save_matmuls"
    variants.append(grads_of(model, ids))
    model.config.checkpoint_policy = "full"
    layered = tiny_model(kind, "gpt2", f"memory.bptt_depth={depth}", f"memory.write={write}",
                         "model.layer_checkpointing=true").train()
    assert all(layer.gradient_checkpointing for layer in layered.decoder.base_model.modules()
               if hasattr(layer, "gradient_checkpointing") and layer is not layered.decoder.base_model)
    variants.append(grads_of(layered, ids))
    for loss, grads in variants:
        torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-6)
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


class MatmulCounter(TorchDispatchMode):
    """Counts the matmul and attention ops (MATMUL_OPS) dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in MATMUL_OPS
        return func(*args, **(kwargs or {}))


def backward_matmuls(model, ids) -> int:
    out = model(ids, labels=ids)
    with MatmulCounter() as counter:
        out.loss.backward()
    return counter.count


@pytest.mark.parametrize("kind,arch", [("rmt", "gpt2"), ("armt", "llama"), ("rmt", "llama")])
def test_save_matmuls_recomputes_no_matmul_in_the_backward(kind, arch):
    ids = random_ids(2, 4)
    model = tiny_model(kind, arch).train()
    counts = {}
    for setting in ("off", "full", "save_matmuls"):
        model.config.segment_checkpointing = setting != "off"
        model.config.checkpoint_policy = "full" if setting == "off" else setting
        counts[setting] = backward_matmuls(model, ids)
    # the backward's own matmuls (the gradients) as without checkpointing; full recomputes the forward's too
    assert counts["save_matmuls"] == counts["off"] < counts["full"], counts


def test_armt_state_is_reset_every_forward_and_never_saved():
    model = tiny_model("armt")
    layers = [m for m in model.modules() if isinstance(m, AssociativeLayer)]
    assert len(layers) == 2
    x, y = random_ids(1, 3, seed=1), random_ids(1, 3, seed=2)
    with torch.no_grad():
        fresh = model(x).logits
        model(y)
        held = [value for layer in layers for value in vars(layer).values() if isinstance(value, (torch.Tensor, tuple))]
        assert not held  # the memory state is passed to the layers, never left on them
        again = model(x).logits
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)
    keys = set(model.state_dict())
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    assert keys <= parameters | buffers
    assert not any(key.endswith(("state", "matrix", "norm_state")) for key in keys)
    assert {k.rsplit(".", 1)[-1] for k in keys if ".h.0." in k and ".layer." not in k} == {
        "read_query", "write_key", "write_value", "write_gate", "write_gate_bias"}


def written_memory(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial memory, the memory written by segment 0) of the first sample."""
    segment = model.get_input_embeddings()(ids[:, :SEGMENT_LEN])
    _, (written,) = model.memory(model.decoder.base_model, None, segment, True)
    return model.memory.weight, written[0]


def test_memory_write_modes_set_the_scale_the_next_segment_reads():
    ids = random_ids(1, 2)
    with torch.no_grad():
        paper = tiny_model("rmt", "gpt2", "memory.write=paper")
        initial, written = written_memory(paper, ids)
        inputs = torch.cat([initial, paper.get_input_embeddings()(ids[0, :SEGMENT_LEN]), initial])[None]
        positions = torch.arange(inputs.shape[1])[None]
        final = paper.decoder.base_model(inputs_embeds=inputs, position_ids=positions).last_hidden_state[0]
        torch.testing.assert_close(written, final[-3:])  # the paper's write: the final hidden states as they are
        token_row = paper.get_input_embeddings().weight.norm(dim=-1).mean()
        assert written.norm(dim=-1).min() > 10 * token_row  # post-norm: ~sqrt(d) per row

        normed = tiny_model("rmt", "gpt2", "memory.write=norm")
        _, written_normed = written_memory(normed, ids)
        expected_row = normed.memory.init_std * 32 ** 0.5  # RMS 1 times the gain, d = 32
        torch.testing.assert_close(written_normed.norm(dim=-1), torch.full((3,), expected_row), rtol=1e-4, atol=0)

        gated = tiny_model("rmt", "gpt2", "memory.write=gated")
        initial, written_gated = written_memory(gated, ids)
        torch.testing.assert_close(written_gated, (initial + written_normed) / 2)  # z = 1/2 at the start


def test_an_unknown_memory_write_is_a_config_error():
    from pipeline.config import load_config
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="memory.write"):
        load_config(None, ["memory.write=scaled"])

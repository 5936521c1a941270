"""The fused, chunked LM head gives the plain head's loss and gradients (fp32 to 1e-5, bf16 as close as
plain bf16 is to fp64), and the memory models give the same loss and gradients with it and without."""

from __future__ import annotations

import pytest
import torch
from model_support import VOCAB, random_ids, tiny_model
from torch import nn

from pipeline.models import fused_head
from pipeline.models.fused_head import IGNORE_INDEX, HeadGradients, attach_head_gradients, linear_cross_entropy
from pipeline.models.modeling_memtrain import head_loss as head_nll

D, V = 24, 97


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Several chunks per call (7 rows at V=97), with a ragged last chunk."""
    monkeypatch.setattr(fused_head, "CHUNK_LOGITS", 7 * V)


def _problem(dtype=torch.float32, bias=False, seed=0):
    """Two 'segments' of hidden states computed from an embedding tied to the head (so the weight's
    gradient has an input and an output part), targets with ignored positions."""
    torch.manual_seed(seed)
    embedding = nn.Embedding(V, D).to(dtype)
    head = nn.Linear(D, V, bias=bias).to(dtype)
    head.weight = embedding.weight
    mix = nn.Linear(D, D).to(dtype)
    ids = torch.randint(0, V, (2, 2, 19))
    targets = torch.randint(0, V, (2, 2, 19))
    targets[:, 0, :5] = IGNORE_INDEX
    targets[1, 1, -3:] = IGNORE_INDEX
    return embedding, head, mix, ids, targets


def _loss_and_grads(fused: bool, dtype=torch.float32, bias=False, per_token=False):
    embedding, head, mix, ids, targets = _problem(dtype, bias)
    params = dict(embedding.named_parameters(), **{f"head.{n}": p for n, p in head.named_parameters()},
                  **{f"mix.{n}": p for n, p in mix.named_parameters()})
    grads = HeadGradients()
    sums, counts, tokens = [], [], []
    for k in range(2):
        hidden = torch.tanh(mix(embedding(ids[:, k])))
        stats = (linear_cross_entropy(head, hidden, targets[:, k], grads, per_token) if fused
                 else head_nll(head, hidden, targets[:, k], per_token))
        sums.append(stats[0])
        counts.append(stats[1])
        if per_token:
            tokens.append(stats[2])
    nll = torch.stack(sums)
    if fused:
        nll = attach_head_gradients(head, nll, grads)
    loss = nll.sum() / torch.stack(counts).sum()
    loss.backward()
    return loss.detach(), nll.detach(), tokens, {n: p.grad for n, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_the_plain_head(bias):
    loss, nll, tokens, grads = _loss_and_grads(True, bias=bias, per_token=True)
    ref_loss, ref_nll, ref_tokens, ref_grads = _loss_and_grads(False, bias=bias, per_token=True)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-5)
    for got, expected in zip(tokens, ref_tokens):
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and "weight" in grads and ("head.bias" in grads) == bias
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-5, msg=name)
        assert grads[name].abs().max() > 1e-4, name


def test_bf16_is_as_close_to_fp64_as_the_plain_bf16_head():
    exact_loss, _, _, exact = _loss_and_grads(False, dtype=torch.float64)
    for fused in (True, False):
        loss, _, _, grads = _loss_and_grads(fused, dtype=torch.bfloat16)
        assert grads["weight"].dtype == torch.bfloat16
        assert abs(float(loss) - float(exact_loss)) < 2e-2, fused
        for name, grad in grads.items():
            error = (grad.double() - exact[name]).abs().max() / exact[name].abs().max()
            assert error < 3e-2, (fused, name, float(error))


def test_no_gradients_without_grad_mode_and_the_same_values():
    _, head, _, _, targets = _problem()
    hidden = torch.randn(2, 19, D)
    with torch.no_grad():
        fused = linear_cross_entropy(head, hidden, targets[:, 0], HeadGradients(), True)
        plain = head_nll(head, hidden, targets[:, 0], True)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-6, atol=1e-5)
    assert int(fused[1]) == int(plain[1]) == int((targets[:, 0] != IGNORE_INDEX).sum())
    torch.testing.assert_close(fused[2], plain[2], rtol=0, atol=1e-5)


def test_unequal_segment_weights_are_refused_when_the_head_is_trained():
    embedding, head, mix, ids, targets = _problem()
    grads = HeadGradients()
    hidden = [torch.tanh(mix(embedding(ids[:, k]))) for k in range(2)]
    nll = attach_head_gradients(head, torch.stack([linear_cross_entropy(head, h, targets[:, k], grads, False)[0]
                                                   for k, h in enumerate(hidden)]), grads)
    with pytest.raises(RuntimeError, match="weighted equally"):
        nll[1].backward(retain_graph=True)
    # a gradient that does not train the head (only the hidden states) is exact for any weighting
    (fused,) = torch.autograd.grad(nll[1], hidden[1], retain_graph=True)
    plain_hidden = hidden[1].detach().requires_grad_(True)
    (plain,) = torch.autograd.grad(head_nll(head, plain_hidden, targets[:, 1], False)[0], plain_hidden)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)


def test_per_token_nll_carries_no_gradient():
    _, head, _, _, targets = _problem()
    hidden = torch.randn(2, 19, D, requires_grad=True)
    _, _, token_nll = linear_cross_entropy(head, hidden, targets[:, 0], HeadGradients(), True)
    with pytest.raises(RuntimeError, match="per-token NLL"):
        token_nll.sum().backward()


def _model_grads(model, ids, labels):
    model.zero_grad()
    out = model(ids, labels=labels, return_token_nll=True)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,overrides", [
    ("rmt", ["model.segment_checkpointing=true"]), ("rmt", ["memory.bptt_depth=1"]),
    ("armt", ["model.segment_checkpointing=true", "model.tie_embeddings=false"]), ("none", []),
    ("full", ["model.segment_checkpointing=true"])])
def test_memory_models_train_the_same_with_the_fused_head(kind, overrides):
    model = tiny_model(kind, "gpt2", *overrides).train()
    ids = random_ids(2, 4)
    labels = ids.clone()
    labels[0, 3:11] = IGNORE_INDEX
    assert model.config.fused_head
    fused, fused_grads = _model_grads(model, ids, labels)
    model.config.fused_head = False
    plain, plain_grads = _model_grads(model, ids, labels)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.segment_nll, plain.segment_nll, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(fused.token_nll.detach(), plain.token_nll.detach(), rtol=0, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() == {n for n, _ in model.named_parameters()}
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert model.get_output_embeddings().weight.shape[0] == VOCAB

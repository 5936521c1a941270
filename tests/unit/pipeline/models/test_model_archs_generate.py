"""Every supported decoder family under rmt/armt, and generation against repeated full forwards."""

from __future__ import annotations

import pytest
import torch
from model_support import SEGMENT_LEN, random_ids, tiny_model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("kind", ["rmt", "armt"])
def test_every_arch_trains_and_reports_per_segment_sums(arch, kind):
    model = tiny_model(kind, arch, "model.segment_checkpointing=true").train()
    ids = random_ids(2, 3)
    out = model(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.segment_nll.sum() / out.segment_tokens.sum(), out.loss)
    assert out.segment_tokens.tolist() == [2 * SEGMENT_LEN] * 2 + [2 * (SEGMENT_LEN - 1)]
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def greedy_by_full_forwards(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Reference: rerun the whole forward for every token, the sequence right-padded to whole segments
    (padding after the last real token cannot change its logits in a causal model)."""
    sequence = prompt
    for _ in range(new_tokens):
        pad = -sequence.shape[1] % SEGMENT_LEN
        padded = torch.cat([sequence, torch.full((sequence.shape[0], pad), 3)], dim=1)
        with torch.no_grad():
            logits = model(padded).logits[:, sequence.shape[1] - 1]
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence


@pytest.mark.parametrize("kind,arch", [("rmt", "gpt2"), ("rmt", "llama"), ("armt", "gpt2"), ("armt", "qwen2"),
                                       ("none", "gpt2"), ("full", "gpt_neox")])
@pytest.mark.parametrize("prompt_len,new_tokens", [(2 * SEGMENT_LEN + 4, 4), (2 * SEGMENT_LEN, 1)])
def test_greedy_generation_matches_repeated_full_forwards(kind, arch, prompt_len, new_tokens):
    model = tiny_model(kind, arch)
    prompt = random_ids(2, 3, seed=5)[:, :prompt_len]
    generated = model.generate(prompt, max_new_tokens=new_tokens)
    assert torch.equal(generated, greedy_by_full_forwards(model, prompt, new_tokens))
    sampled = model.generate(prompt, max_new_tokens=new_tokens, do_sample=True, top_k=1, temperature=0.7)
    assert torch.equal(sampled, generated)


def test_generation_stops_at_eos_and_pads():
    model = tiny_model("rmt")
    prompt = random_ids(2, 2, seed=6)[:, :12]
    free = model.generate(prompt, max_new_tokens=6)
    eos = int(free[0, 13])
    stopped = model.generate(prompt, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert stopped.shape[1] <= free.shape[1]
    for row in range(2):
        hits = (free[row, 12:] == eos).nonzero()
        cut = 12 + (int(hits[0]) + 1 if len(hits) else 6)
        assert torch.equal(stopped[row, :cut], free[row, :cut])
        assert bool((stopped[row, cut:] == 0).all())


def test_generation_defaults_come_from_the_generation_config():
    model = tiny_model("rmt")
    prompt = random_ids(1, 2, seed=7)[:, :12]
    assert model.generate(prompt).shape[1] == 12 + 20  # nothing configured: 20 new tokens
    model.generation_config.max_new_tokens = 3
    model.generation_config.eos_token_id = None
    assert model.generate(prompt).shape[1] == 12 + 3
    assert model.generate(prompt, max_new_tokens=5).shape[1] == 12 + 5  # an argument wins
    greedy = model.generate(prompt)
    model.generation_config.do_sample, model.generation_config.top_k = True, 1  # sampling from the top 1 = greedy
    assert torch.equal(model.generate(prompt), greedy)


def test_generation_rolls_over_into_new_segments_past_the_positions():
    model = tiny_model("rmt")  # 64 positions; 8 + 60 tokens span 9 segments, each writing memory for the next
    prompt = random_ids(1, 1)
    generated = model.generate(prompt, max_new_tokens=60)
    assert generated.shape[1] == 68
    assert torch.equal(generated, greedy_by_full_forwards(model, prompt, 60))

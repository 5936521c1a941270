"""The forward contract every stage builds on: loss, per-segment sums, token NLLs, shapes, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_support import SEGMENT_LEN, VOCAB, random_ids, tiny_config, tiny_model

from pipeline.errors import UserError
from pipeline.models import build_model


@pytest.mark.parametrize("kind,overrides", [("none", ()), ("rmt", ("memory.num_tokens=0",)), ("full", ())])
def test_without_memory_one_segment_is_the_base_model(kind, overrides):
    model = tiny_model(kind, "gpt2", *overrides)
    ids = random_ids(2, 1)
    with torch.no_grad():
        ours = model(ids).logits
        base = model.decoder(input_ids=ids).logits
    torch.testing.assert_close(ours, base, rtol=0, atol=1e-5)


def test_full_attention_is_the_base_model_over_the_whole_sample(ids):
    model = tiny_model("full")
    with torch.no_grad():
        out = model(ids, labels=ids)
        logits = model.decoder(input_ids=ids).logits
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["rmt", "armt", "none", "full"])
def test_segment_sums_add_up_and_token_nll_matches(kind, ids):
    model = tiny_model(kind)
    labels = ids.clone()
    labels[0, 5:9] = -100  # a hole across the first segment boundary
    out = model(ids, labels=labels, return_token_nll=True)
    assert out.logits is None and out.segment_nll.dtype == torch.float32
    assert out.segment_nll.shape == out.segment_tokens.shape == (4,)
    torch.testing.assert_close(out.segment_nll.sum() / out.segment_tokens.sum(), out.loss)
    # segment k counts targets k*L+1 .. (k+1)*L: the last one is the first token of segment k+1
    counted = (labels != -100).clone()
    counted[:, 0] = False
    expected = [int(counted[:, k * SEGMENT_LEN + 1:(k + 1) * SEGMENT_LEN + 1].sum()) for k in range(4)]
    assert out.segment_tokens.tolist() == expected
    assert out.token_nll.shape == ids.shape
    assert bool((out.token_nll[:, 0] == 0).all()) and bool((out.token_nll[~counted] == 0).all())
    per_segment = [out.token_nll[:, k * SEGMENT_LEN + 1:(k + 1) * SEGMENT_LEN + 1].sum() for k in range(4)]
    torch.testing.assert_close(torch.stack(per_segment), out.segment_nll.detach())


@pytest.mark.parametrize("kind", ["rmt", "armt", "none"])
def test_loss_matches_the_logits_path_and_segment_count_may_change(kind):
    model = tiny_model(kind)
    for n_segments in (1, 3):
        ids = random_ids(2, n_segments, seed=n_segments)
        with torch.no_grad():
            out = model(ids, labels=ids)
            logits = model(ids).logits
        assert logits.shape == (2, n_segments * SEGMENT_LEN, VOCAB)
        reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)


def test_memory_carries_information_across_segments():
    model = tiny_model("rmt")
    a, b = random_ids(1, 2, seed=1), random_ids(1, 2, seed=2)
    b[:, SEGMENT_LEN:] = a[:, SEGMENT_LEN:]  # same second segment, different first
    with torch.no_grad():
        la, lb = model(a).logits[:, SEGMENT_LEN:], model(b).logits[:, SEGMENT_LEN:]
    assert not torch.allclose(la, lb)
    none = tiny_model("none")
    with torch.no_grad():
        torch.testing.assert_close(none(a).logits[:, SEGMENT_LEN:], none(b).logits[:, SEGMENT_LEN:])


def test_bad_inputs_and_configs_are_errors():
    model = tiny_model("rmt")
    with pytest.raises(ValueError, match="one run of ones per row"):
        model(random_ids(1, 2), attention_mask=torch.tensor([[1, 0] * SEGMENT_LEN]))
    with pytest.raises(UserError, match="exceeds the decoder's 64 positions"):
        build_model(tiny_config("rmt", "gpt2", "data.segment_len=60"), VOCAB, 1, 2, 0)
    build_model(tiny_config("armt", "gpt2", "data.segment_len=60"), VOCAB, 1, 2, 0)  # armt spends m, not 2m
    with pytest.raises(UserError, match="full attends over"):
        build_model(tiny_config("full", "gpt2", "data.n_segments=9"), VOCAB, 1, 2, 0)
    with pytest.raises(ValueError, match="exceeds the decoder's"):
        tiny_model("full")(random_ids(1, 9))
    with pytest.raises(UserError, match="not divisible"):
        build_model(tiny_config("rmt", "gpt2", "model.num_heads=3"), VOCAB, 1, 2, 0)


def test_a_pretrained_decoder_keeps_its_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.models import decoder_config

    torch.manual_seed(1)
    token_ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base = AutoModelForCausalLM.from_config(decoder_config(tiny_config("rmt", "llama").model, VOCAB, token_ids)).eval()
    base.save_pretrained(tmp_path)
    cfg = tiny_config("rmt", "gpt2", f"model.pretrained={tmp_path}")  # arch and sizes come from the folder
    torch.manual_seed(2)
    model = build_model(cfg, VOCAB, **token_ids).eval()
    assert model.config.decoder_config.model_type == "llama"
    assert model.decoder.config._attn_implementation == "sdpa"
    assert model.config.memory_init_std == pytest.approx(float(base.get_input_embeddings().weight.detach().std()), rel=1e-4)
    ids = random_ids(2, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="token embeddings"):
        build_model(cfg, VOCAB + 1, **token_ids)
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        build_model(tiny_config("rmt", "gpt2", f"model.pretrained={tmp_path / 'missing'}"), VOCAB, **token_ids)

"""``model.lora``: adapters on a pretrained decoder, what trains, and the two exports' weights (one process;
tests/integration/train/test_train_lora.py runs it under 2-rank ZeRO-3)."""

from __future__ import annotations

import pytest
import torch
from model_support import VOCAB, random_ids, tiny_config
from transformers import AutoModelForCausalLM

from pipeline.errors import UserError
from pipeline.models import build_model, decoder_config
from pipeline.models.build import saved_model_config
from pipeline.models.lora import memory_parameters, remove_adapters, save_adapter

TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.target_modules=[c_attn,c_fc]")


def save_base(kind: str, folder) -> dict[str, torch.Tensor]:
    """A randomly initialised tiny GPT-2 saved as a local 'pretrained' folder; its weights."""
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_config(decoder_config(tiny_config(kind).model, VOCAB, TOKEN_IDS))
    base.save_pretrained(folder)
    return {key: value.detach().clone() for key, value in base.state_dict().items()}


def lora_model(kind: str, base_dir, *extra: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_config(kind, "gpt2", f"model.pretrained={base_dir}", *LORA, *extra), VOCAB, **TOKEN_IDS)


def train(model, steps: int = 30) -> list[float]:
    ids = random_ids(4, 3, seed=9)[:, :6].repeat(1, 4)  # a repeating pattern the adapters and memory can learn
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("kind", ["rmt", "armt"])
def test_only_adapters_and_memory_train_and_the_base_stays_bitwise(kind, tmp_path):
    base = save_base(kind, tmp_path / "base")
    model = lora_model(kind, tmp_path / "base")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    memory = {id(p) for p in memory_parameters(model)}
    assert memory and all(p.requires_grad for p in memory_parameters(model))
    assert trainable == {name for name, p in model.named_parameters() if "lora_" in name or id(p) in memory}
    torch.manual_seed(0)
    plain = build_model(tiny_config(kind, "gpt2", f"model.pretrained={tmp_path / 'base'}"), VOCAB, **TOKEN_IDS)
    ids = random_ids(2, 3)
    with torch.no_grad():  # lora_B starts at zero: the adapted model starts as the plain one
        torch.testing.assert_close(model.eval()(ids).logits, plain.eval()(ids).logits, rtol=0, atol=0)

    losses = train(model)
    assert losses[-1] < 0.9 * losses[0], losses
    memory_names = {name for name, p in model.named_parameters() if id(p) in memory}
    frozen = {name.removeprefix("decoder.").replace(".base_layer", "").replace(".layer.", "."): value  # armt wraps
              for name, value in model.state_dict().items()
              if name.startswith("decoder.") and "lora_" not in name and name not in memory_names}
    assert frozen.keys() == base.keys()
    for name, value in base.items():
        assert torch.equal(frozen[name], value), name


@pytest.mark.parametrize("kind", ["rmt", "armt"])
def test_merged_and_adapter_exports_equal_peft_own_merge(kind, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    save_base(kind, tmp_path / "base")
    model = lora_model(kind, tmp_path / "base")
    train(model, steps=10)
    trained = {key: value.detach().clone() for key, value in model.state_dict().items()}
    ids = random_ids(2, 3, seed=5)
    with torch.no_grad():
        adapted = model.eval()(ids).logits

    # the reference: PEFT's own wrapper and merge_and_unload over the same weights
    torch.manual_seed(0)
    plain = build_model(tiny_config(kind, "gpt2", f"model.pretrained={tmp_path / 'base'}"), VOCAB, **TOKEN_IDS)
    reference = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                 fan_in_fan_out=True))
    reference.base_model.model.load_state_dict(trained, strict=True)
    reference = reference.merge_and_unload().eval()

    save_adapter(model, tmp_path / "adapter")
    merged = remove_adapters(model, merge=True).eval()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in key for key in reloaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=0, atol=1e-5)

    unmerged = lora_model(kind, tmp_path / "base")
    unmerged.load_state_dict(trained, strict=True)
    remove_adapters(unmerged, merge=False).save_pretrained(tmp_path / "unmerged")
    restored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "unmerged"),
                                         str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, adapted, rtol=0, atol=1e-5)
        with restored.disable_adapter():  # the adapter matters
            assert not torch.allclose(restored(ids).logits, adapted, atol=1e-3)


def test_the_saved_model_config_rebuilds_the_model_without_the_base_folder(tmp_path):
    save_base("rmt", tmp_path / "base")
    model = lora_model("rmt", tmp_path / "base")
    train(model, steps=3)
    (tmp_path / "model_config.json").write_text(model.config.to_json_string(use_diff=False))
    (tmp_path / "base").rename(tmp_path / "moved")
    cfg = tiny_config("rmt", "gpt2", f"model.pretrained={tmp_path / 'base'}", *LORA)
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        build_model(cfg, VOCAB, **TOKEN_IDS)
    rebuilt = build_model(cfg, VOCAB, **TOKEN_IDS, saved=saved_model_config(tmp_path / "model_config.json"))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.config.to_dict() == model.config.to_dict()
    ids = random_ids(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_bad_lora_settings_are_one_line(tmp_path):
    from pipeline.config import load_config

    save_base("rmt", tmp_path / "base")
    with pytest.raises(UserError, match=r"q_proj, wte2 not among the decoder's adaptable layers \(c_attn, c_fc"):
        lora_model("rmt", tmp_path / "base", "model.lora.target_modules=[c_attn,q_proj,wte2]")
    bad = {"model.lora.rank=4": "model.lora.target_modules: Field required",
           "model.lora.target_modules=[c_attn]": "model.lora fine-tunes a pretrained decoder",
           f"model.pretrained={tmp_path / 'base'} model.lora.target_modules=[]": "at least 1 item",
           f"model.pretrained={tmp_path / 'base'} model.lora.target_modules=[c_attn,c_attn]": "distinct",
           f"model.pretrained={tmp_path / 'base'} model.lora.target_modules=[c_attn] model.lora.rank=0": "rank",
           f"model.pretrained={tmp_path / 'base'} model.lora.target_modules=[c_attn] model.lora.rnak=2":
               "did you mean 'model.lora.rank'",
           "export.lora=both": "export.lora: Input should be 'merged' or 'adapter'"}
    for overrides, message in bad.items():
        with pytest.raises(UserError, match=message) as caught:
            load_config(None, overrides.split())
        assert "\n" not in str(caught.value)

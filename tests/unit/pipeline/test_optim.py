"""The optimizer memtrain builds."""


def test_adamw_is_fused_exactly_when_a_gpu_is_used(monkeypatch) -> None:
    import torch

    from pipeline import launch
    from pipeline.config import load_config
    from pipeline.optim import make_optimizer

    model, train = torch.nn.Linear(4, 4), load_config().train
    assert not make_optimizer(model, train).defaults["fused"]  # DS_ACCELERATOR=cpu in the tests
    monkeypatch.setattr(launch, "has_gpu", lambda: True)  # what a CUDA machine answers
    assert make_optimizer(model, train).defaults["fused"] is True


def memory_model(kind: str):
    import torch
    from tiny import tiny_config

    from pipeline.models import build_model

    cfg = tiny_config("model", f"memory.kind={kind}")
    torch.manual_seed(0)
    return cfg, build_model(cfg, vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


ARMT_PROJECTIONS = {"read_query", "write_key", "write_value", "write_gate", "write_gate_bias"}


def test_memory_parameters_are_the_memory_s_own_and_nothing_of_the_decoder_s() -> None:
    from pipeline.models.modeling_memtrain import memory_parameters

    _, rmt = memory_model("rmt")
    names = {id(p): name for name, p in rmt.named_parameters()}
    assert sorted(names[id(p)] for p in memory_parameters(rmt)) == ["memory.weight", "memory.write_gain"]

    _, armt = memory_model("armt")
    names = {id(p): name for name, p in armt.named_parameters()}
    found = [names[id(p)] for p in memory_parameters(armt)]
    layers = armt.config.decoder_config.num_hidden_layers
    assert "memory.weight" in found and len(found) == 1 + layers * len(ARMT_PROJECTIONS)
    assert {name.rsplit(".", 1)[1] for name in found if name != "memory.weight"} == ARMT_PROJECTIONS
    assert not any(".layer." in name for name in found)  # the wrapped decoder layer is the decoder's

    _, none = memory_model("none")
    assert memory_parameters(none) == []


def test_memory_lr_scale_gives_the_memory_its_own_groups_at_that_scale() -> None:
    import pytest

    from pipeline.models.modeling_memtrain import memory_parameters
    from pipeline.optim import lr_at, make_optimizer, set_lr

    cfg, model = memory_model("rmt")
    same = make_optimizer(model, cfg.train.model_copy(update={"memory_lr_scale": 1.0}))  # the groups of runs before it
    assert [g["weight_decay"] for g in same.param_groups] == [cfg.train.weight_decay, 0.0]

    train = cfg.train.model_copy(update={"memory_lr_scale": 0.1})
    optimizer = make_optimizer(model, train)
    memory = {id(p) for p in memory_parameters(model)}
    in_memory_groups = {id(p) for g in optimizer.param_groups if g["memory"] for p in g["params"]}
    assert in_memory_groups == memory
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert set_lr(optimizer, train, 30) == lr_at(train, 30)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(lr_at(train, 30) * (0.1 if group["memory"] else 1.0))


def test_memory_lr_scale_0_freezes_the_memory_and_trains_the_decoder() -> None:
    import torch

    from pipeline.models.modeling_memtrain import memory_parameters
    from pipeline.optim import make_optimizer, set_lr

    cfg, model = memory_model("rmt")
    train = cfg.train.model_copy(update={"memory_lr_scale": 0.0, "warmup_steps": 0})
    optimizer = make_optimizer(model, train)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(3, 64, (2, cfg.data.segment_len * cfg.data.n_segments))
    for step in range(2):
        set_lr(optimizer, train, step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    memory = {id(p) for p in memory_parameters(model)}
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (id(p) in memory), name


def test_a_resume_across_the_memory_s_group_structure_is_one_line(tmp_path) -> None:
    """The memory's groups exist only at a scale other than 1, so a checkpoint's optimizer state fits
    only a config on the same side of 1; a run saved before the setting existed trained at 1."""
    import json

    import pytest
    import yaml
    from tiny import tiny_config

    from pipeline.errors import UserError
    from pipeline.run_dir import RunDir
    from pipeline.train import check_same_run

    def resume(saved: dict, *overrides: str) -> None:
        cfg = tiny_config("model", f"train.output_dir={tmp_path}", *overrides)
        run = RunDir.of(tmp_path)
        tag = run.checkpoints / "step_00000004"
        tag.mkdir(parents=True, exist_ok=True)
        (tag / "memtrain_state.json").write_text(json.dumps({"step": 4, "world_size": 1}))
        tree = cfg.model_dump(mode="json")
        tree["train"] = {k: v for k, v in tree["train"].items() if k != "memory_lr_scale"} | saved
        run.config.write_text(yaml.safe_dump(tree))
        run.data_manifest.write_text(json.dumps({"tokenizer_hash": "t"}))
        check_same_run(cfg, {"tokenizer_hash": "t"})

    resume({}, "train.memory_lr_scale=1")  # saved before the setting, resumed at 1
    resume({"memory_lr_scale": 0.1}, "train.memory_lr_scale=0.3")  # both with memory groups
    resume({}, "memory.kind=none", "train.memory_lr_scale=0.1")  # no memory parameters: no groups either way
    with pytest.raises(UserError) as refused:
        resume({}, "train.memory_lr_scale=0.1")
    assert "trained with train.memory_lr_scale=1" in str(refused.value)
    assert "resume with --set train.memory_lr_scale=1," in str(refused.value)
    with pytest.raises(UserError) as refused:
        resume({"memory_lr_scale": 0.1}, "train.memory_lr_scale=1")
    assert "resume with --set train.memory_lr_scale=0.1," in str(refused.value)


def test_the_memory_lr_scale_defaults_to_0_1_only_when_training_grows_from_chains() -> None:
    from pipeline.config import load_config

    assert load_config("configs/kjv.yaml").train.memory_lr_scale == 0.1  # auto curriculum, split
    assert load_config("configs/kjv.yaml", ["train.curriculum=[]"]).train.memory_lr_scale == 1.0
    assert load_config("configs/demo.yaml").train.memory_lr_scale == 1.0  # whole samples from step 0
    assert load_config("configs/babilong-demo.yaml").train.memory_lr_scale == 1.0  # QA: never cut
    assert load_config("configs/kjv.yaml", ["train.curriculum_split=false"]).train.memory_lr_scale == 1.0
    assert load_config("configs/kjv.yaml", ["train.memory_lr_scale=0.5"]).train.memory_lr_scale == 0.5

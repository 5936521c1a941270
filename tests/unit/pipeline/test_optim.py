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

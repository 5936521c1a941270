"""pipeline.flops: FLOPs of a step counted once with torch's FlopCounterMode, MFU against the device's peak."""

from __future__ import annotations

import pytest
import torch

from pipeline.flops import Throughput, builtin_peak_tflops, peak_memory_bytes

from model_support import random_ids, tiny_model


def test_known_gpu_peaks_by_name_for_bf16_and_fp16_only() -> None:
    assert builtin_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert builtin_peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.5
    assert builtin_peak_tflops("NVIDIA H100 NVL", "bf16") == 835.5
    assert builtin_peak_tflops("NVIDIA H200", "bf16") == 989.5
    assert builtin_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert builtin_peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert builtin_peak_tflops("NVIDIA L40S", "bf16") == 362.05
    assert builtin_peak_tflops("NVIDIA L40", "bf16") is None  # not taken for an L4
    assert builtin_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") is None  # tensor-core peaks only
    assert builtin_peak_tflops(None, "bf16") is None  # a CPU


def test_a_linear_step_is_three_forwards_counted_once_and_mfu_is_against_the_peak() -> None:
    layer = torch.nn.Linear(64, 32, bias=False)
    throughput = Throughput(world_size=2, peak_tflops=1e-6)
    for _ in range(2):  # two micro-batches of 10 tokens
        with throughput.forward():
            out = layer(torch.randn(10, 64))
        out.sum().backward()  # as in training: outside; the step counts 3x the forward
    first = throughput.metrics(local_tokens=20, step_tokens=40, elapsed_s=0.5)
    assert throughput.flops_per_token == 3 * 2 * 64 * 32  # forward 2*in*out per token, step = 3x
    assert first["tokens_per_s"] == 80
    assert first["tflops_per_s"] == pytest.approx(3 * 2 * 64 * 32 * 40 / 2 / 0.5 / 1e12)
    assert first["mfu"] == pytest.approx(first["tflops_per_s"] / 1e-6)
    assert first["peak_memory_gib"] > 0

    with throughput.forward():  # later steps are not counted (nor slowed down by counting)
        layer(torch.randn(1000, 64))
    assert throughput.flops_per_token == 3 * 2 * 64 * 32
    later = throughput.metrics(local_tokens=40, step_tokens=80, elapsed_s=0.5)
    assert later["tflops_per_s"] == pytest.approx(2 * first["tflops_per_s"])
    assert "mfu" not in Throughput(world_size=1, peak_tflops=None).metrics(1, 1, 1.0)


def test_counting_flops_leaves_the_step_bitwise_unchanged() -> None:
    """The first step of every process is counted: a resumed run must still match one never stopped."""
    model, ids = tiny_model("rmt"), random_ids(2, 3)

    def grads(count: bool) -> list[torch.Tensor]:
        model.zero_grad()
        throughput = Throughput(1, None)
        if not count:
            throughput.flops_per_token = 1.0  # counted already
        with throughput.forward():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert (throughput._counted != []) == count
        return [loss.detach(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)]

    assert all(torch.equal(a, b) for a, b in zip(grads(False), grads(True), strict=True))


def test_peak_memory_is_this_process_peak_rss_on_cpu() -> None:
    before = peak_memory_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    assert peak_memory_bytes() >= before and peak_memory_bytes() > block.numel() * 4

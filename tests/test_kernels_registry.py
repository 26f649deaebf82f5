"""The op registry with both a GPU and native CPU kernels: each tensor goes to the kernel of its device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dsv4cli import kernels
from dsv4cli.formats.official import quantize_fp8_blocks
from dsv4cli.kernels import ByDevice, cpu, ref


def test_by_device_sends_cuda_inputs_to_the_gpu_kernel():
    op = ByDevice(lambda x, y: ("gpu", y), lambda x, y: ("host", y))
    assert op(SimpleNamespace(device=torch.device("cuda", 0)), 1) == ("gpu", 1)
    assert op(torch.zeros(1), y=2) == ("host", 2)


def test_auto_with_a_gpu_keeps_the_native_cpu_kernels_for_host_tensors(monkeypatch):
    pytest.importorskip("triton")
    from dsv4cli.kernels import triton_ops

    try:
        cpu.load()
    except Exception as exc:
        pytest.skip(f"native CPU kernels unavailable: {exc}")
    monkeypatch.setattr(triton_ops, "available", lambda: True)  # as on a machine with a CUDA GPU
    kernels.select("auto")
    names = kernels.active()
    assert names["linear"] == "dsv4cli.kernels.triton_gemm.linear (cuda) + dsv4cli.kernels.cpu.linear (cpu)"
    assert names["moe_experts"].endswith("dsv4cli.kernels.cpu.moe_experts (cpu)")
    assert names["sparse_attn"] == "dsv4cli.kernels.triton_attn.sparse_attn"  # no CPU kernel: Triton alone
    x = torch.randn(2, 256)
    weight, scale = quantize_fp8_blocks(torch.randn(128, 256) * 0.05)
    assert torch.equal(kernels.linear(x, weight, scale, True), cpu.linear(x, weight, scale, True))
    assert torch.allclose(kernels.linear(x, weight, scale, True), ref.linear(x, weight, scale, True), atol=1e-4)


def test_triton_moe_checks_every_experts_format():
    """A layer whose expert 0 is FP4 but expert 1 int3 must not reach the FP4-only grouped kernel."""
    pytest.importorskip("triton")
    from dsv4cli.formats.lowbit import quantize_lowbit
    from dsv4cli.formats.official import quantize_fp4_rows
    from dsv4cli.kernels import triton_ops
    from dsv4cli.kernels.experts import ExpertTable

    def fp4(o, i):
        return quantize_fp4_rows(torch.randn(o, i) * 0.05)

    def int3(o, i):
        return quantize_lowbit(torch.randn(o, i) * 0.05, "int3")

    experts = [(*fp4(64, 64), *fp4(64, 64), *fp4(64, 64)), (*int3(64, 64), *fp4(64, 64), *int3(64, 64))]
    table = ExpertTable.from_experts(experts)
    x, weights, indices = torch.randn(3, 64), torch.rand(3, 2), torch.tensor([[0, 1], [1, 0], [0, 1]])
    out = triton_ops.moe_experts(x, weights, indices, table, 10.0, False)
    assert table.backend_cache["triton_all_fp4"] is False
    assert torch.allclose(out, ref.moe_experts(x, weights, indices, table, 10.0, False))

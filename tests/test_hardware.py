"""Hardware facts: train.precision=auto picks bf16 only where it is fast, and the run records the CPU."""

from __future__ import annotations

import pytest
import torch

from scaletrain import hardware
from scaletrain.config import Precision


@pytest.mark.parametrize(
    "flags,want",
    [
        (["avx2", "fma"], Precision.fp32),  # Zen 3: bf16 matmuls ~1/100 of fp32
        (["avx2", "fma", "avx512f", "avx512_vnni"], Precision.fp32),  # Skylake / Cascade Lake: ~1/5 of fp32
        (["avx2", "fma", "avx512f", "avx512_bf16"], Precision.bf16),  # Zen 4/5, Cooper Lake
        (["avx2", "avx512f", "amx_tile", "amx_bf16"], Precision.bf16),  # Sapphire Rapids
    ],
)
def test_auto_precision_on_a_cpu_is_bf16_only_with_native_bf16_instructions(monkeypatch, flags, want):
    monkeypatch.setattr(hardware, "cpu_info", lambda: {"model": "x", "flags": flags, "cores": 2, "logical_cpus": 2})
    chosen, why = hardware.resolve_precision(Precision.auto, torch.device("cpu"))
    assert chosen == want and why.startswith("auto: this CPU has")


def test_auto_precision_is_bf16_on_cuda_and_an_explicit_setting_is_kept(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_info", lambda: {"model": "x", "flags": [], "cores": 2, "logical_cpus": 2})
    assert hardware.resolve_precision(Precision.auto, torch.device("cuda")) == (Precision.bf16, "auto: CUDA")
    for explicit in (Precision.fp32, Precision.bf16):
        assert hardware.resolve_precision(explicit, torch.device("cpu"))[0] == explicit


def test_the_speed_flags_are_read_from_the_first_processor_of_proc_cpuinfo(monkeypatch):
    text = "processor : 0\nmodel name : Some CPU @ 2GHz\nflags : fpu avx2 avx512f avx512_bf16 sse\n\nprocessor : 1\n"
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: hardware.parse_cpuinfo(text))
    info = hardware.cpu_info()
    assert info["model"] == "Some CPU @ 2GHz" and info["flags"] == ["avx2", "avx512f", "avx512_bf16"]
    assert hardware.cpu_has_native_bf16()

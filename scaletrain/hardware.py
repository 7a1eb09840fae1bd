"""What this machine can do: device choice, CPU model and instruction sets, bf16 capability, peak FLOP/s
(datasheet tables for GPUs, a measured matmul for CPUs), peak memory, and glibc's malloc cache.

Here: facts about the hardware and the knobs that act on the process (malloc), used by the trainer, the
benchmark and the run records. Not here: MFU bookkeeping during training (trainer/metrics), ranks and
process groups (distributed.py).
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from scaletrain.config import BadInput, Precision

# Dense (not sparse) bf16 tensor-core peaks in FLOP/s, from vendor datasheets.
GPU_BF16_PEAK = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores; V100 has no bf16
}
# CPU flags that decide matmul speed: fp32 SIMD width, and whether bf16 has a native dot product
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


class DeviceUnavailable(BadInput, RuntimeError):
    """`train.device` names a device this machine does not have (the message says which, and the fix)."""

    kind = "device"


def pick_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is missing is an error (DeviceUnavailable),
    raised by run.py before any data or model work rather than by the first tensor moved there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    fix = "use train.device=auto (the best device here) or train.device=cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"train.device={name}: CUDA is not available on this machine; {fix}")
        index, count = torch.device(name).index, torch.cuda.device_count()
        if index is not None and index >= count:
            raise DeviceUnavailable(f"train.device={name}: this machine has {count} CUDA device(s), 0..{count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"train.device=mps: MPS (Apple GPU) is not available on this machine; {fix}")
    return torch.device(name)


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The `key : value` lines of the first processor's block of /proc/cpuinfo."""
    block = text.split("\n\n")[0]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}


def _cpuinfo() -> dict[str, str]:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux
        return {}


def cpu_info() -> dict[str, Any]:
    """CPU model, the speed-relevant instruction sets it has, and the cores this process may use."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "flags": [f for f in SPEED_FLAGS if f in flags],
        "cores": usable,
        "logical_cpus": os.cpu_count(),
    }


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX); without them bf16 matmuls
    take a fallback measured at 1/5 (AVX-512) to 1/100 (AVX2) of fp32 speed (experiments/BENCHMARKS.md)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["flags"]))


def resolve_precision(setting: Precision, device: torch.device) -> tuple[Precision, str]:
    """`train.precision` -> fp32 or bf16, and why. `auto` takes bf16 only where it runs faster than fp32: CUDA
    (tensor cores) and CPUs with bf16 dot-product instructions; elsewhere bf16 matmuls are a slow fallback."""
    if setting != Precision.auto:
        return setting, f"train.precision={setting}"
    if device.type == "cuda":
        return Precision.bf16, "auto: CUDA"
    if device.type == "cpu" and cpu_has_native_bf16():
        return Precision.bf16, "auto: this CPU has AVX512-BF16/AMX"
    if device.type == "cpu":
        return Precision.fp32, "auto: this CPU has no AVX512-BF16/AMX, so bf16 matmuls would be a slow fallback"
    return Precision.fp32, f"auto: no bf16 fast path known for {device.type}"


def hardware_info(device: torch.device) -> dict[str, Any]:
    """What run_info.json and the benchmark record about the machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda
        )
    return info


def describe(device: torch.device) -> str:
    """One line naming the hardware a figure came from (printed at start-up and in bench tables)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    c = cpu_info()
    return f"{c['model']}, {c['cores']} cores, {'/'.join(c['flags']) or 'no AVX2'}"


def gpu_peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key in sorted(GPU_BF16_PEAK, key=len, reverse=True):  # most specific name first
        if key in name:
            return GPU_BF16_PEAK[key]
    return None


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int, times: int) -> list[float]:
    """FLOP/s of `times` n^3 matmuls on `device`, one figure per matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = []
    for _ in range(times):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(2 * n**3 / (time.perf_counter() - t0))
    return out


def matmul_peak_size(device: torch.device, dtype: torch.dtype, max_n: int = 2048) -> int:
    """n doubles from 256 up to `max_n` while one matmul takes under 50 ms, so a dtype without a fast path
    (bf16 on CPUs lacking AVX512-BF16: ~0.2 GFLOP/s) is measured in about a second, not minutes."""
    n = 256
    while n < max_n and 2 * n**3 / max(matmul_flops(device, dtype, n, 2)) < 0.05:
        n *= 2
    return n


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, max_n: int = 2048, reps: int = 5) -> float:
    """Median FLOP/s of an n^3 matmul on `device` (n from `matmul_peak_size`, first run discarded): the
    achievable limit MFU is measured against on CPU."""
    n = matmul_peak_size(device, dtype, max_n)
    return statistics.median(matmul_flops(device, dtype, n, reps + 1)[1:])


def peak_flops(
    device: torch.device, dtype: torch.dtype, override_tflops: float | None, measure_cpu: bool
) -> tuple[float | None, str]:
    """The FLOP/s that MFU divides by, and where it came from."""
    if override_tflops:
        return override_tflops * 1e12, "train.matmul_peak_tflops"
    if device.type == "cuda":
        peak = gpu_peak_flops(device)
        name = torch.cuda.get_device_name(device)
        return (peak, f"datasheet dense bf16 peak of {name}") if peak else (None, f"no peak known for {name}")
    if device.type == "cpu" and measure_cpu:
        return measure_matmul_peak(device, dtype), f"measured {dtype} matmul on this CPU"
    return None, f"no peak known for {device.type} (set train.matmul_peak_tflops)"


def memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB -> MiB


# <malloc.h> parameters and glibc's defaults (restored when the cache is switched off again)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_NO_TRIM = -1  # mallopt takes an int; glibc stores it as size_t, so -1 = SIZE_MAX: never trim


def configure_cpu_malloc(cache: bool) -> str:
    """`train.cpu_malloc_cache`: make glibc malloc keep freed memory for reuse; returns what was done.

    Written by hand because no library does it in-process: PyTorch's CPU allocator is plain malloc, and
    glibc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap that free()
    returns to the kernel. Every training step then page-faults its activations in again and the kernel
    zeroes them: 15% of a baseline_10m step on a 2-core Zen 3 EPYC. Two mallopt calls (no mmap, no heap
    trimming) keep the pages, like the caching allocator PyTorch uses on CUDA; RSS stays at its peak.
    jemalloc or tcmalloc through LD_PRELOAD (Intel's CPU tuning guide) work too but need a system package.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return (
            f"CPU malloc cache: not applied (needs glibc; this is {platform.system()} "
            f"{platform.libc_ver()[0] or 'without glibc'})"
        )
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    values = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: _NO_TRIM} if cache else _GLIBC_DEFAULTS
    if not all(mallopt(param, value) == 1 for param, value in values.items()):
        return "CPU malloc cache: mallopt refused the settings; freed memory goes back to the kernel"
    return (
        "CPU malloc cache: on (glibc keeps freed memory; train.cpu_malloc_cache=false to return it)"
        if cache
        else "CPU malloc cache: off (glibc defaults)"
    )

"""What the hardware offers, for training and serving alike: native bf16 on the CPU, which library multiplies
float32 matrices on it, and how many rows to score per forward pass. Kept apart from the trainer so that serving
does not import it."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

EVAL_ROWS_CPU, EVAL_ROWS_GPU = 8192, 65536


CPU_GEMM = ("auto", "onednn", "blas")


def _cpuinfo(key: str) -> str:
    """The first /proc/cpuinfo line's value for ``key`` ("flags", "vendor_id"), or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes of memory the kernel says new allocations can take without swapping (MemAvailable), or None where
    it does not say (not Linux)."""
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo."""
    flags = set(_cpuinfo("flags").split())
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def onednn_fp32() -> bool:
    """Whether float32 matrix products on this CPU go through oneDNN rather than torch's BLAS (MKL).

    MKL runs its AVX2 kernels on a non-Intel CPU: on a 2-core AVX-512 AMD EPYC an MLP's products ran at
    about 190 GFLOP/s through it and 320-460 through oneDNN's, which choose their kernels by the instruction
    set alone (bench/bench_criteo.py). So "auto" is oneDNN on an AMD CPU that has AVX-512, where torch has
    oneDNN's fused linear; the environment variable ``CTRKIT_CPU_GEMM`` (``onednn`` / ``blas``) overrides it.
    The rule reads the hardware, not a timing, so that two processes on one machine compute the same digits
    (an interrupted run resumes exactly)."""
    setting = os.environ.get("CTRKIT_CPU_GEMM", "auto").strip().lower()
    if setting not in CPU_GEMM:
        raise ValueError(f"CTRKIT_CPU_GEMM must be one of {CPU_GEMM}, got {setting!r}")
    usable = (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    if setting != "auto":
        if setting == "onednn" and not usable:
            raise ValueError("CTRKIT_CPU_GEMM=onednn, but this torch has no oneDNN linear")
        return setting == "onednn"
    return usable and _cpuinfo("vendor_id") == "AuthenticAMD" and "avx512f" in _cpuinfo("flags").split()


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
HEAP_BLOCK_MAX = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit systems
KEEP_FREED = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc serve blocks of up to 32 MB from its heap and keep up to 1 GB of freed heap instead of
    handing it back to the kernel; True where that was set.

    A CPU training step allocates and frees the same activation-sized blocks every step, and by default each is
    a fresh mapping that the kernel zero-fills page by page again: a 10 MB transpose took 3.0 ms so and 1.2 ms
    from reused memory, AutoInt's Frappe step 233 and 199 ms at one thread. Linux with glibc only; a ``MALLOC_*``
    setting in the environment is the user's choice and is left alone. Process-wide, so it is made by the CPU
    training step, not on import."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, HEAP_BLOCK_MAX)) and bool(mallopt(m_trim_threshold, KEEP_FREED))


def check_device(name: str) -> torch.device:
    """``name`` as a torch device, or a ValueError saying why it cannot run here: not a device string, CUDA
    asked for on a machine without it, or a ``cuda:N`` beyond the devices torch sees."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def eval_rows(device: str | torch.device, asked: int | None = None) -> int:
    """Rows per forward pass when scoring without gradients: ``asked``, else 8,192 on a CPU, whose caches then
    hold a block's activations (FinalMLP scored Frappe's 57,722 validation rows in 0.47 s in blocks of 4,096 and
    0.94 s in one block), and 65,536 on a GPU, which wants large launches."""
    return asked or (EVAL_ROWS_CPU if torch.device(device).type == "cpu" else EVAL_ROWS_GPU)

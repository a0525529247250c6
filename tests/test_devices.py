"""Hardware helpers shared by training and serving."""

from __future__ import annotations

import builtins
import io
from pathlib import Path

import pytest
import torch

from ctrkit import devices


def test_scoring_blocks_by_device() -> None:
    assert devices.eval_rows("cpu") == 8192
    assert devices.eval_rows("cuda") == devices.eval_rows("cuda:1") == 65536
    assert devices.eval_rows("cpu", 100) == devices.eval_rows("cuda", 100) == 100


@pytest.mark.parametrize("flags, want", [("fpu sse avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True),
                                         ("fpu sse avx2 avx512f", False)])
def test_bf16_is_read_from_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: str, want: bool) -> None:
    text = f"processor\t: 0\nflags\t\t: {flags}\n"
    monkeypatch.setattr(builtins, "open", lambda *a, **k: io.StringIO(text))
    assert devices.cpu_has_bf16() is want


def test_no_cpuinfo_means_no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*a: object, **k: object) -> None:
        raise OSError("no /proc")

    monkeypatch.setattr(builtins, "open", missing)
    assert devices.cpu_has_bf16() is False


@pytest.mark.parametrize("name", ["gpu", "cudaa", "meta", "mps", "", "cuda:x"])
def test_a_device_string_that_is_not_cpu_or_cuda_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"device must be cpu, cuda or cuda:N, got {name!r}"):
        devices.check_device(name)


def test_cuda_is_checked_against_the_devices_torch_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda was asked for but torch sees no CUDA device"):
        devices.check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.check_device("cuda:1") == torch.device("cuda", 1)
    assert devices.check_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match="--device cuda:2: torch sees 2 CUDA device"):
        devices.check_device("cuda:2")


@pytest.mark.parametrize("vendor, flags, setting, want", [
    ("AuthenticAMD", "fpu avx2 avx512f", "auto", True), ("AuthenticAMD", "fpu avx2", "auto", False),
    ("GenuineIntel", "fpu avx2 avx512f", "auto", False), ("GenuineIntel", "fpu avx2", "onednn", True),
    ("AuthenticAMD", "fpu avx2 avx512f", "blas", False), ("AuthenticAMD", "fpu avx512f", " OneDNN ", True)])
def test_float32_products_go_to_onednn_on_an_amd_cpu_with_avx512(monkeypatch: pytest.MonkeyPatch, vendor: str,
                                                                flags: str, setting: str, want: bool) -> None:
    """MKL takes its AVX2 kernels on a non-Intel CPU; the rule reads the hardware (or CTRKIT_CPU_GEMM)."""
    text = f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n"
    monkeypatch.setattr(builtins, "open", lambda *a, **k: io.StringIO(text))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setenv("CTRKIT_CPU_GEMM", setting)
    devices.onednn_fp32.cache_clear()
    try:
        assert devices.onednn_fp32() is (want and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    finally:
        devices.onednn_fp32.cache_clear()


def test_a_bad_cpu_gemm_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTRKIT_CPU_GEMM", "mkl")
    devices.onednn_fp32.cache_clear()
    try:
        with pytest.raises(ValueError, match="CTRKIT_CPU_GEMM must be one of .*'auto', 'onednn', 'blas'.*'mkl'"):
            devices.onednn_fp32()
    finally:
        devices.onednn_fp32.cache_clear()


def test_freed_memory_is_kept_on_linux_unless_the_environment_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import sys

    devices.keep_freed_memory.cache_clear()
    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(sys, "platform", "linux")
    assert devices.keep_freed_memory() is True
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD 32 MB, M_TRIM_THRESHOLD 1 GB
    assert devices.keep_freed_memory() is True and len(calls) == 2  # once a process
    devices.keep_freed_memory.cache_clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # the user's own setting stays
    assert devices.keep_freed_memory() is False and len(calls) == 2
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    devices.keep_freed_memory.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))  # not glibc
    assert devices.keep_freed_memory() is False
    devices.keep_freed_memory.cache_clear()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert devices.keep_freed_memory() is False
    devices.keep_freed_memory.cache_clear()


def test_available_memory_is_memavailable_in_bytes(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       16384000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n")
    assert devices.available_memory(str(info)) == 8_000_000 * 1024
    info.write_text("MemTotal:       16384000 kB\n")  # an old kernel: no estimate
    assert devices.available_memory(str(info)) is None
    assert devices.available_memory(str(tmp_path / "none")) is None

"""Hardware helpers shared by training and serving."""

from __future__ import annotations

import builtins
import io

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

"""Hardware helpers shared by training and serving."""

from __future__ import annotations

import builtins
import io

import pytest

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

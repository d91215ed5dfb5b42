"""half_dtype: the recommended 16-bit dtype per device, on CPU and (faked) CUDA and ROCm.

Bad input to it: test_audit.py.
"""

from __future__ import annotations

import pytest
import torch

import polprec as pp

F16, BF16 = torch.float16, torch.bfloat16


def test_half_dtype() -> None:
    assert pp.half_dtype("cpu") is BF16
    assert pp.half_dtype(torch.device("cpu")) is BF16
    assert pp.half_dtype() in (BF16, F16)
    assert pp.half_dtype("meta") is F16


@pytest.mark.parametrize(
    ("available", "hip", "capability", "expected"),
    [
        (False, None, (9, 0), F16),  # no CUDA at all
        (True, None, (8, 0), BF16),  # Ampere and later: native bfloat16
        (True, None, (9, 0), BF16),
        (True, None, (7, 5), F16),  # Turing: float16
    ],
)
def test_half_dtype_on_cuda_devices(
    monkeypatch: pytest.MonkeyPatch,
    available: bool,
    hip: str | None,
    capability: tuple[int, int],
    expected: torch.dtype,
) -> None:
    asked: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability
    )
    assert pp.half_dtype("cuda:1") is expected
    if available:
        assert asked == [torch.device("cuda:1")]  # the device asked about, not the current one


@pytest.mark.parametrize(("supported", "expected"), [(True, BF16), (False, F16)])
def test_half_dtype_on_rocm(
    monkeypatch: pytest.MonkeyPatch, supported: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.0")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: supported)
    assert pp.half_dtype("cuda") is expected

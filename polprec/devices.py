"""What a device supports: the recommended 16-bit dtype."""

from __future__ import annotations

import torch

from polprec._catalogue import BF16, F16

__all__ = ["half_dtype"]


def half_dtype(device: torch.device | str | int | None = None) -> torch.dtype:
    """The recommended 16-bit dtype for ``device``.

    bfloat16 on CPU and on CUDA devices with native bfloat16 support, float16 elsewhere.

    Args:
        device: a ``torch.device``, a device string (``"cpu"``, ``"cuda:0"``), a CUDA index,
            or ``None`` for torch's default device.

    Examples:
        >>> half_dtype("cpu")
        torch.bfloat16
    """
    if device is None:
        dev = torch.get_default_device()
    elif isinstance(device, bool) or not isinstance(device, torch.device | str | int):
        raise TypeError(
            f"device must be a torch.device, a device string or a CUDA index, got {device!r} "
            f"of type {type(device).__name__}"
        )
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise ValueError(
                f"invalid device {device!r}: {err}; use e.g. 'cpu', 'cuda', 'cuda:0' or 0"
            ) from None
    if dev.type == "cpu":
        return BF16
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return F16
        if torch.version.hip is not None:  # ROCm: ask torch for the current device
            return BF16 if torch.cuda.is_bf16_supported(including_emulation=False) else F16
        major, _ = torch.cuda.get_device_capability(dev)  # this device, not the current one
        return BF16 if major >= 8 else F16  # native bfloat16 from Ampere (sm_80) on
    return F16

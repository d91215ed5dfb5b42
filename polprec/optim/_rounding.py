"""Writing float32 values into 16-bit parameters: nearest, stochastic, Kahan-compensated.

Stochastic rounding rounds ``x`` to one of its two neighbouring 16-bit values, up with
probability (distance to the lower one) / (their spacing), so that its expectation is ``x``:
updates far below half a spacing survive on average instead of rounding away. Its random
bits come from a counter-based hash of (seed, step, the leaf's key path, the element's index
in the full tensor) in integer tensor ops: no generator, the same bits for the same state on
every run and device, batched by ``vmap`` and fused by inductor, and independent of how the
leaves are laid out: the position of a leaf in its tree, the optimizer group it is in
(:func:`~polprec.optim.partition`) or the shard of it a rank holds do not enter.
"""

from __future__ import annotations

import torch

__all__ = [
    "HALF",
    "kahan_split",
    "leaf_key",
    "path_key",
    "random_bits",
    "round_to",
    "stochastic_round",
]

#: The 16-bit dtypes the precision options act on.
HALF = (torch.bfloat16, torch.float16)

_MASK = 0xFFFFFFFF
# float32 bits below a 16-bit value's last mantissa bit: 16 for bfloat16, 13 for float16.
_DROPPED = {torch.bfloat16: 16, torch.float16: 13}
_F16_MIN_NORMAL = 2.0**-14  # below it float16 is subnormal, with a fixed spacing of 2**-24


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, "lowbias32") on int64 values < 2**32.

    Both multipliers are below 2**31, so no int64 product overflows.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK
    return x ^ (x >> 15)


def path_key(path: str) -> int:
    """A 32-bit number for a leaf's dotted key path (``"blocks.0.ln_1.weight"``).

    FNV-1a over the path's code points, in plain Python: the same number in every process
    (unlike ``hash(str)``), and a constant that ``torch.compile`` folds while tracing.
    """
    key = 0x811C9DC5
    for char in path:
        key = ((key ^ ord(char)) * 0x01000193) & _MASK
    return key


def leaf_key(seed: torch.Tensor, step: torch.Tensor, leaf: int) -> torch.Tensor:
    """A 0-dim int64 key for one leaf (its :func:`path_key`) at one step, from the state's
    seed and step count."""
    mixed_step = _mix(step.to(torch.int64) & _MASK)
    return _mix((_mix((seed & _MASK) ^ mixed_step) + ((leaf * 0x9E3779B9) & _MASK)) & _MASK)


def random_bits(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit values (int64), a hash of ``key`` and each element's ``index`` (its flat
    index in the full tensor, whichever part of it is at hand)."""
    return _mix((index + key) & _MASK)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor) -> torch.Tensor:
    """Round float32 ``x`` to ``dtype`` (bfloat16 or float16), unbiased, with ``bits``.

    In float32's bit pattern the magnitude's dropped low bits are a fraction of one spacing of
    ``dtype``: adding as many random bits and truncating rounds up with exactly that
    probability (for either sign; infinities stay infinite). float16 subnormals have a fixed
    spacing of 2**-24 and are rounded on that grid instead.
    """
    dropped = _DROPPED[dtype]
    noise = (bits >> (32 - dropped)).to(torch.int32)
    raw = x.view(torch.int32)
    truncated = ((raw + noise) & -(1 << dropped)).view(torch.float32)
    out = truncated.to(dtype)
    if dtype == torch.float16:
        scaled = x * 2.0**24  # exact: a power of two
        floor = torch.floor(scaled)
        uniform = (bits >> 8).to(torch.float32) * 2.0**-24
        sub = ((floor + (uniform < scaled - floor).to(torch.float32)) * 2.0**-24).to(dtype)
        out = torch.where(x.abs() < _F16_MIN_NORMAL, sub, out)
    return out


def round_to(x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor | None) -> torch.Tensor:
    """``x`` in ``dtype``: stochastically rounded with ``bits``, else to nearest."""
    if bits is None or x.dtype == dtype:
        return x.to(dtype)
    return stochastic_round(x, dtype, bits)


def kahan_split(
    x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 ``x`` as a 16-bit value and the 16-bit compensation of what it lost.

    ``x`` is a parameter plus its compensation plus this step's update; the compensation
    carries the part of it the 16-bit parameter cannot hold into the next step.
    """
    value = round_to(x, dtype, bits)
    return value, (x - value).to(dtype)  # (the difference in x's wider dtype)

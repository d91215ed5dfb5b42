"""Mixed-precision policies: which dtype parameters are stored in, computed in and returned in."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, TypeAlias

import torch

from polprec import _tree
from polprec._catalogue import (
    ACCEPTED,
    AMBIGUOUS,
    DTYPE_NAMES,
    F16,
    F32,
    FLOAT_DTYPES,
    GRAMMAR_KEYS,
    HALF_DTYPES,
    INT_SPECS,
    SPEC_NAMES,
    dtype_name,
    hint,
)

__all__ = [
    "ENV_VAR",
    "Policy",
    "get_policy",
    "parse_dtype",
    "parse_spec",
]

#: The environment variable :func:`get_policy` reads when called without a spec.
ENV_VAR = "POLPREC_PRECISION"
#: Set by ``polprec run`` next to :data:`ENV_VAR`; makes a conflicting explicit spec an error.
CLI_ENV_VAR = "POLPREC_PRECISION_FROM_CLI"


def parse_dtype(value: torch.dtype | str) -> torch.dtype:
    """Return the floating ``torch.dtype`` named by ``value``.

    Args:
        value: a ``torch.dtype`` (float16, bfloat16, float32 or float64) or one of its names,
            e.g. ``"bf16"``, ``"half"`` (float16, torch's meaning), ``"float"``, ``"double"``.

    Raises:
        TypeError: ``value`` is neither a dtype nor a string.
        ValueError: ``value`` names no floating dtype polprec supports.

    Examples:
        >>> parse_dtype("bf16")
        torch.bfloat16
        >>> parse_dtype(" Half ")
        torch.float16
    """
    if isinstance(value, torch.dtype):
        if value not in FLOAT_DTYPES:
            raise ValueError(
                f"dtype {value} is not supported by a Policy; accepted dtypes are "
                f"{', '.join(str(d) for d in FLOAT_DTYPES)}"
            )
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
        raise ValueError(
            f"unknown dtype name {value!r}; accepted names are {', '.join(sorted(DTYPE_NAMES))}"
        )
    raise TypeError(
        f"expected a torch.dtype or a dtype name, got {value!r} of type {type(value).__name__}; "
        f"accepted: {', '.join(str(d) for d in FLOAT_DTYPES)} or their names"
    )


@dataclasses.dataclass(frozen=True)
class Policy:
    """An immutable mixed-precision policy: parameter, compute and output dtypes.

    Args:
        param_dtype: dtype parameters are stored (and updated) in.
        compute_dtype: dtype the forward pass computes in.
        output_dtype: dtype the forward's floating outputs are returned in.

    Each field accepts a ``torch.dtype`` or a name (``"bf16"``, ``"float32"``, ...).

    Examples:
        >>> import torch
        >>> policy = Policy(torch.float32, "bf16", torch.float32)
        >>> str(policy)
        'params=float32,compute=bfloat16,output=float32'
        >>> policy.cast_to_compute({"x": torch.ones(2), "step": 3})["x"].dtype
        torch.bfloat16
        >>> get_policy(str(policy)) == policy
        True
    """

    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    output_dtype: torch.dtype

    def __post_init__(self) -> None:
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            raw = getattr(self, field)
            try:
                dtype = parse_dtype(raw)
            except (TypeError, ValueError) as err:
                raise type(err)(f"Policy({field}=...): {err}") from None
            object.__setattr__(self, field, dtype)

    def __str__(self) -> str:
        return (
            f"params={dtype_name(self.param_dtype)},"
            f"compute={dtype_name(self.compute_dtype)},"
            f"output={dtype_name(self.output_dtype)}"
        )

    @property
    def is_mixed(self) -> bool:
        """True for 16-bit compute with float32 params: the case ``torch.autocast`` serves.

        (Autocast only casts float32 tensors, so float64 params are cast explicitly.)
        """
        return self.compute_dtype in HALF_DTYPES and self.param_dtype == F32

    @property
    def uses_float16(self) -> bool:
        """True when any of the three dtypes is float16 (gradients may underflow)."""
        return F16 in (self.param_dtype, self.compute_dtype, self.output_dtype)

    def cast_to_param(self, tree: Any) -> Any:
        """Cast the floating tensor leaves of ``tree`` to :attr:`param_dtype`."""
        return _tree.cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree: Any) -> Any:
        """Cast the floating tensor leaves of ``tree`` to :attr:`compute_dtype`."""
        return _tree.cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        """Cast the floating tensor leaves of ``tree`` to :attr:`output_dtype`."""
        return _tree.cast_floating(tree, self.output_dtype)

    def with_param_dtype(self, dtype: torch.dtype | str) -> Policy:
        """A copy of this policy with another parameter dtype."""
        return dataclasses.replace(self, param_dtype=parse_dtype(dtype))

    def with_compute_dtype(self, dtype: torch.dtype | str) -> Policy:
        """A copy of this policy with another compute dtype."""
        return dataclasses.replace(self, compute_dtype=parse_dtype(dtype))

    def with_output_dtype(self, dtype: torch.dtype | str) -> Policy:
        """A copy of this policy with another output dtype."""
        return dataclasses.replace(self, output_dtype=parse_dtype(dtype))


#: Anything :func:`get_policy` accepts.
PolicySpec: TypeAlias = "Policy | int | str | None"


def _parse_grammar(text: str, original: object) -> Policy:
    chosen: dict[str, torch.dtype] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(
                f"cannot parse precision {original!r}: part {part!r} is not key=value; write "
                "comma-separated pairs such as 'p=f32,c=bf16' with keys params|p, compute|c, "
                "output|o"
            )
        if key not in GRAMMAR_KEYS:
            raise ValueError(
                f"cannot parse precision {original!r}: unknown key {key!r}; accepted keys are "
                "params|p, compute|c, output|o"
            )
        name = GRAMMAR_KEYS[key]
        if name in chosen:
            raise ValueError(f"cannot parse precision {original!r}: {name!r} is given twice")
        try:
            chosen[name] = parse_dtype(value)
        except ValueError as err:
            raise ValueError(f"cannot parse precision {original!r}: {err}") from None
    params = chosen.get("params", F32)
    compute = chosen.get("compute", params)
    output = chosen.get("output", compute)
    return Policy(params, compute, output)


def parse_spec(spec: Policy | int | str) -> Policy:
    """The :class:`Policy` a spec names, read from the spec alone.

    :func:`get_policy` is this plus the environment: ``None`` reads ``POLPREC_PRECISION``,
    and an explicit spec is checked against a ``polprec run --precision``.

    Examples:
        >>> str(parse_spec("bf16-true"))
        'params=bfloat16,compute=bfloat16,output=float32'
    """
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, int | str):
        raise TypeError(
            f"precision must be a Policy, an int or a str, got {spec!r} of type "
            f"{type(spec).__name__}; accepted: {ACCEPTED}"
        )
    if isinstance(spec, int):
        if spec not in INT_SPECS:
            raise ValueError(f"unknown precision {spec!r}; accepted: {ACCEPTED}")
        return Policy(*INT_SPECS[spec].dtypes)
    text = spec.strip().lower()
    if text in SPEC_NAMES:
        return Policy(*SPEC_NAMES[text].dtypes)
    if "=" in text:
        return _parse_grammar(text, spec)
    if text in DTYPE_NAMES:
        dtype = DTYPE_NAMES[text]
        return Policy(dtype, dtype, dtype)
    advice = hint(text)
    raise ValueError(
        f"unknown precision {spec!r}{f' ({advice})' if advice else ''}; accepted: {ACCEPTED}"
    )


def get_policy(spec: PolicySpec = None) -> Policy:
    """Return the :class:`Policy` described by ``spec``.

    Args:
        spec: a ``Policy`` (returned as is); a Lightning Fabric precision (``64``, ``32``,
            ``16``, ``"64-true"``, ``"32-true"``, ``"16-mixed"``, ``"bf16-mixed"``,
            ``"16-true"``, ``"bf16-true"``, ``"bf16"``, ...); a Keras name
            (``"mixed_float16"``, ``"mixed_bfloat16"``); a bare dtype name (all three
            dtypes, jmp's reading; ``"bf16"`` is Fabric's ``"bf16-mixed"``, and the bare
            16-bit names warn that the two libraries read them differently); or jmp's grammar ``"params=float32,compute=bfloat16,output=float32"``
            with short keys ``p``, ``c``, ``o`` (compute defaults to params, output to
            compute). Case and whitespace are ignored. ``None`` reads the ``POLPREC_PRECISION``
            environment variable (set by ``polprec run --precision``) and falls back to
            ``"32-true"``.

    Warns:
        UserWarning: ``spec`` is a string Lightning Fabric and jmp read differently
            (``"bf16"``, ``"fp16"``, ``"half"``, ...); the message says which reading
            polprec took and how to write either without ambiguity.

    Raises:
        TypeError: ``spec`` is not a Policy, int, str or None.
        ValueError: ``spec`` is not an accepted precision (the message lists them), or it
            conflicts with the precision chosen on the ``polprec run`` command line.

    Examples:
        >>> str(get_policy("bf16-mixed"))
        'params=float32,compute=bfloat16,output=float32'
        >>> str(get_policy("c=f16"))
        'params=float32,compute=float16,output=float16'
        >>> get_policy(16) == get_policy("16-mixed")
        True
    """
    if isinstance(spec, Policy):  # the common case on every call of apply_with_policy
        return spec
    env = os.environ.get(ENV_VAR)
    if spec is None:
        if env is None or not env.strip():
            return parse_spec("32-true")
        try:
            return parse_spec(env)
        except ValueError as err:
            raise ValueError(f"environment variable {ENV_VAR}={env!r} is invalid: {err}") from None
    policy = parse_spec(spec)
    if isinstance(spec, str) and spec.strip().lower() in AMBIGUOUS:
        warnings.warn(
            f"precision {spec!r} is ambiguous: {AMBIGUOUS[spec.strip().lower()]}",
            stacklevel=2,  # (a UserWarning, warn's default)
        )
    if env and os.environ.get(CLI_ENV_VAR) == "1":
        cli_policy = parse_spec(env)
        if cli_policy != policy:
            raise ValueError(
                f"precision {spec!r} ({policy}) in the code conflicts with "
                f"--precision={env!r} ({cli_policy}) given to `polprec run`; remove one of "
                "them, or call get_policy() without an argument to follow the command line"
            )
    return policy

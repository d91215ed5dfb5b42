"""The policy catalogue: every dtype name and precision spec polprec accepts, declared once.

Parsing (:mod:`polprec.policy`), ``str(policy)``, the error messages, ``polprec policies``
and the :mod:`polprec.testing` strategies all read these tables, so a new alias is added in
one place.
"""

from __future__ import annotations

import dataclasses
import difflib

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

#: The floating dtypes a Policy may use.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (F16, BF16, F32, F64)
#: The 16-bit ones (autocast's compute dtypes).
HALF_DTYPES: tuple[torch.dtype, ...] = (F16, BF16)

# jmp's single name table: every name of a dtype, the canonical (torch's) name first.
# "half" is float16, torch's meaning (jmp's "half" depends on the platform).
DTYPE_ALIASES: dict[torch.dtype, tuple[str, ...]] = {
    F16: ("float16", "f16", "fp16", "half"),
    BF16: ("bfloat16", "bf16"),
    F32: ("float32", "f32", "fp32", "float", "single", "full"),
    F64: ("float64", "f64", "fp64", "double"),
}
#: name -> dtype, for every name in :data:`DTYPE_ALIASES`.
DTYPE_NAMES: dict[str, torch.dtype] = {
    name: dtype for dtype, names in DTYPE_ALIASES.items() for name in names
}


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a dtype: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class NamedSpec:
    """A named precision: its canonical string, its dtypes and the other ways to say it."""

    name: str
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]  # params, compute, output
    source: str  # "fabric" or "keras"
    aliases: tuple[str, ...] = ()
    ints: tuple[int, ...] = ()


# Lightning Fabric's precision values (outputs always float32) and Keras' mixed policies.
NAMED_SPECS: tuple[NamedSpec, ...] = (
    NamedSpec("64-true", (F64, F64, F32), "fabric", aliases=("64",), ints=(64,)),
    NamedSpec("32-true", (F32, F32, F32), "fabric", aliases=("32",), ints=(32,)),
    NamedSpec("16-mixed", (F32, F16, F32), "fabric", aliases=("16",), ints=(16,)),
    NamedSpec("bf16-mixed", (F32, BF16, F32), "fabric", aliases=("bf16",)),
    NamedSpec("16-true", (F16, F16, F32), "fabric"),
    NamedSpec("bf16-true", (BF16, BF16, F32), "fabric"),
    NamedSpec("mixed_float16", (F32, F16, F32), "keras"),
    NamedSpec("mixed_bfloat16", (F32, BF16, F32), "keras"),
)
#: Every string of :data:`NAMED_SPECS` (canonical names and aliases) -> its spec.
SPEC_NAMES: dict[str, NamedSpec] = {
    text: spec for spec in NAMED_SPECS for text in (spec.name, *spec.aliases)
}
#: Every int of :data:`NAMED_SPECS` -> its spec.
INT_SPECS: dict[int, NamedSpec] = {n: spec for spec in NAMED_SPECS for n in spec.ints}

# jmp's grammar: comma-separated key=value pairs.
GRAMMAR_KEYS: dict[str, str] = {
    "params": "params",
    "p": "params",
    "compute": "compute",
    "c": "compute",
    "output": "output",
    "o": "output",
}
#: Examples of jmp's grammar (listed by ``polprec policies``).
GRAMMAR_EXAMPLES: tuple[str, ...] = (
    "c=f16",
    "c=bf16",
    "p=bf16",
    "p=bf16,c=f32",
    "o=f16",
    "params=float32,compute=bfloat16,output=float32",
)

#: What a precision may be, for error messages.
ACCEPTED = (
    "a Policy; the ints "
    + ", ".join(str(n) for n in INT_SPECS)
    + "; Lightning Fabric values "
    + ", ".join(repr(t) for t, s in SPEC_NAMES.items() if s.source == "fabric")
    + "; Keras names "
    + ", ".join(repr(t) for t, s in SPEC_NAMES.items() if s.source == "keras")
    + "; a bare dtype name ("
    + ", ".join(sorted(DTYPE_NAMES))
    + ") meaning all three dtypes (but 'bf16' is Fabric's bf16-mixed); or jmp's grammar "
    "'params=<dtype>,compute=<dtype>,output=<dtype>' with keys params|p, compute|c, output|o "
    "(e.g. 'c=bf16', 'p=bf16,c=f32')"
)

# Strings that Lightning Fabric and jmp read differently, with the reading polprec takes and
# how to say either one without ambiguity. get_policy warns when it meets one of them.
_HALF_BARE = "read as jmp reads a bare dtype name: params, compute and output all {name}"
AMBIGUOUS: dict[str, str] = {
    "bf16": (
        "'bf16' is Lightning Fabric's 'bf16-mixed' here (params float32, compute bfloat16, "
        "output float32), while jmp reads a bare dtype name as all three dtypes; write "
        "'bf16-mixed' for this policy, 'bf16-true' for bfloat16 parameters with float32 "
        "outputs, or 'p=bf16' for all three dtypes bfloat16 (jmp's reading)"
    ),
    **{
        name: (
            f"{name!r} is {_HALF_BARE.format(name=dtype_name(DTYPE_NAMES[name]))}, not "
            f"Lightning Fabric's mixed precision; write '{mixed}' for float32 parameters with "
            f"16-bit compute, '{true}' for 16-bit parameters with float32 outputs, or "
            f"'p={name}' to keep this policy without the warning"
        )
        for name, mixed, true in (
            ("fp16", "16-mixed", "16-true"),
            ("f16", "16-mixed", "16-true"),
            ("float16", "16-mixed", "16-true"),
            ("half", "16-mixed", "16-true"),
            ("bfloat16", "bf16-mixed", "bf16-true"),
        )
    },
}

# The number Fabric writes before "-mixed" / "-true" for each dtype name.
SPEC_PREFIXES: dict[str, str] = {
    **{name: "16" for name in DTYPE_ALIASES[F16]},
    **{name: "bf16" for name in DTYPE_ALIASES[BF16]},
    **{name: "32" for name in DTYPE_ALIASES[F32]},
    **{name: "64" for name in DTYPE_ALIASES[F64]},
}

_FLOAT8 = ("fp8", "f8", "float8", "e4m3", "e5m2", "transformer-engine", "8-true", "8-mixed")


def hint(text: str) -> str:
    """A sentence for an unknown precision string: what was probably meant."""
    if any(p in text for p in _FLOAT8):
        return "float8 / Transformer Engine precisions are not supported by polprec"
    if text.startswith(("int", "uint", "i8", "u8", "qint")):
        return "integer dtypes are not supported: a policy's dtypes are floating point"
    # Fabric-like spellings: '_' for '-', a dtype name for Fabric's number ('fp16-mixed')
    normal = text.replace("_", "-").replace(" ", "-")
    number, dash, rest = normal.partition("-")
    if dash and number in SPEC_PREFIXES:
        normal = SPEC_PREFIXES[number] + dash + rest
    if normal in SPEC_NAMES:
        return f"did you mean {normal!r}?"
    candidates = [*SPEC_NAMES, *DTYPE_NAMES]
    close = difflib.get_close_matches(text, candidates, cutoff=0.75)  # (the best first)
    return f"did you mean {close[0]!r}?" if close else ""

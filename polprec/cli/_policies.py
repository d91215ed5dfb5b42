"""``polprec policies``: every precision spec ``get_policy`` accepts, with its dtypes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from polprec import policy as _policy
from polprec.cli._text import dtype_name, table
from polprec.loss_scale import default_loss_scale
from polprec.policy import Policy

__all__ = ["command"]

# Examples of jmp's grammar; the other specs come from polprec.policy's own tables.
_GRAMMAR_EXAMPLES = (
    "c=f16",
    "c=bf16",
    "p=bf16",
    "p=bf16,c=f32",
    "o=f16",
    "params=float32,compute=bfloat16,output=float32",
)


def _policy_rows() -> list[dict[str, Any]]:
    named = _policy._NAMED_SPECS
    specs: list[tuple[int | str, str]] = [(n, "fabric (int)") for n in _policy._INT_SPECS]
    specs += [(k, "keras" if k.startswith("mixed_") else "fabric") for k in named]
    specs += [(k, "dtype") for k in _policy._DTYPE_NAMES if k not in named]  # named ones win
    specs += [(k, "jmp") for k in _GRAMMAR_EXAMPLES]
    rows = []
    for spec, kind in specs:
        policy: Policy = _policy._parse(
            spec
        )  # not get_policy: a `polprec run` value is no conflict
        rows.append(
            {
                "spec": spec,
                "kind": kind,
                "param_dtype": dtype_name(policy.param_dtype),
                "compute_dtype": dtype_name(policy.compute_dtype),
                "output_dtype": dtype_name(policy.output_dtype),
                "loss_scale": type(default_loss_scale(policy)).__name__,
            }
        )
    return rows


def command(args: argparse.Namespace) -> int:
    rows = _policy_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("spec", "kind", "params", "compute", "output", "default loss scale")
    print(table(header, [list(row.values()) for row in rows]))
    shadowed = ", ".join(repr(k) for k in _policy._DTYPE_NAMES if k in _policy._NAMED_SPECS)
    print(
        "\nCase and surrounding whitespace are ignored. A bare dtype name sets all three dtypes,\n"
        f"except {shadowed} (Lightning Fabric's value above). jmp grammar: keys params|p,\n"
        "compute|c, output|o (any dtype name); compute defaults to params, output to compute."
    )
    return 0

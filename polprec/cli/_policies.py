"""``polprec policies``: every precision spec ``get_policy`` accepts, with its dtypes.

One row per policy name, with the other ways to say it (ints, aliases) beside it, all read
from the policy catalogue.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from polprec import _catalogue
from polprec._catalogue import dtype_name
from polprec.cli._text import table
from polprec.policy import Policy, parse_spec
from polprec.scaling import default_loss_scale

__all__ = ["command"]


def _rows() -> list[dict[str, Any]]:
    """``(spec, aliases, kind)`` for every named spec, bare dtype name and grammar example."""
    entries: list[tuple[str, list[int | str], str]] = [
        (s.name, [*s.ints, *s.aliases], s.source) for s in _catalogue.NAMED_SPECS
    ]
    for names in _catalogue.DTYPE_ALIASES.values():
        bare = [n for n in names if n not in _catalogue.SPEC_NAMES]  # Fabric's "bf16" wins
        entries.append((bare[0], list(bare[1:]), "dtype"))
    entries += [(g, [], "jmp") for g in _catalogue.GRAMMAR_EXAMPLES]
    rows = []
    for spec, aliases, kind in entries:
        policy: Policy = parse_spec(spec)  # not get_policy: no conflict, no warning
        warns = [a for a in (spec, *aliases) if isinstance(a, str) and a in _catalogue.AMBIGUOUS]
        rows.append(
            {
                "spec": spec,
                "aliases": aliases,
                "kind": kind,
                "param_dtype": dtype_name(policy.param_dtype),
                "compute_dtype": dtype_name(policy.compute_dtype),
                "output_dtype": dtype_name(policy.output_dtype),
                "loss_scale": type(default_loss_scale(policy)).__name__,
                "warns": warns,
            }
        )
    return rows


def _alias(alias: int | str) -> str:
    return f"{alias} (int)" if isinstance(alias, int) else alias


def command(args: argparse.Namespace) -> int:
    rows = _rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("spec", "kind", "params", "compute", "output", "default loss scale", "also")
    cells = [
        [
            row["spec"] + ("*" if row["spec"] in row["warns"] else ""),
            row["kind"],
            row["param_dtype"],
            row["compute_dtype"],
            row["output_dtype"],
            row["loss_scale"],
            ", ".join(_alias(a) + ("*" if a in row["warns"] else "") for a in row["aliases"]),
        ]
        for row in rows
    ]
    print(table(header, cells))
    print(
        "\nCase and surrounding whitespace are ignored; 'also' lists other spellings of the same\n"
        "policy (an int is the Python int, e.g. get_policy(16)). A bare dtype name sets all\n"
        "three dtypes (jmp), except 'bf16', which is Lightning Fabric's bf16-mixed. jmp grammar:\n"
        "keys params|p, compute|c, output|o with any dtype name; compute defaults to params,\n"
        "output to compute.\n"
        "* Fabric and jmp read this name differently: get_policy warns and says how to write\n"
        "  it unambiguously (e.g. '16-mixed', '16-true' or 'p=fp16' instead of 'fp16')."
    )
    return 0

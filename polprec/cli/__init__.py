"""The ``polprec`` command line: ``run`` a script under a precision, list ``policies``, ``info``.

``polprec run --precision bf16-mixed train.py --lr 0.1`` runs ``train.py`` as ``__main__`` with
``POLPREC_PRECISION=bf16-mixed`` set, so ``get_policy()`` in the script follows the command line
(Lightning Fabric's ``fabric run --precision``). ``--precision`` goes before the script: every
argument after ``SCRIPT`` belongs to the script, untouched, even when it looks like an option.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from polprec import __version__
from polprec.cli import _info, _policies, _run

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polprec",
        description="Functional, JAX-style mixed precision for PyTorch.",
    )
    parser.add_argument(
        "--version", action="version", version=f"polprec {__version__} (torch {torch.__version__})"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        allow_abbrev=False,  # `--prec P` would otherwise be read as --precision
        usage="polprec run [-h] [--precision P] SCRIPT [ARGS ...]",
        help="run a Python script with a precision chosen on the command line",
        description=(
            "Run SCRIPT as __main__ in this process, with POLPREC_PRECISION=P set so that "
            "get_policy() in the script returns P's policy. An explicit get_policy(spec) in the "
            "script that disagrees with P raises ValueError. --precision goes before SCRIPT; "
            "every argument after SCRIPT (ARGS) is passed to the script untouched, even one that "
            "looks like an option. The exit status is the script's."
        ),
    )
    run.add_argument(
        "--precision",
        metavar="P",
        help="any spec `polprec policies` lists, e.g. bf16-mixed, 16-mixed, 32-true, c=bf16",
    )
    run.add_argument("script", metavar="SCRIPT", help="path of the Python script to run")
    run.set_defaults(handler=_run.command, parser=run, script_args=[])  # main() fills in ARGS

    for name, handler, text in (
        ("policies", _policies.command, "list every accepted precision spec and its dtypes"),
        (
            "info",
            _info.command,
            "what this machine supports: devices, autocast dtypes, matmul speed",
        ),
    ):
        command = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        command.add_argument("--json", action="store_true", help="print JSON instead of a table")
        command.set_defaults(handler=handler)
    return parser


def _split_at_script(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``polprec run`` arguments up to SCRIPT, and the script's own arguments after it.

    argparse would drop a ``--`` that follows SCRIPT; the script gets its arguments as written.
    """
    if argv[:1] != ["run"]:
        return argv, None
    index = 1
    while index < len(argv):
        token = argv[index]
        if token == "--":
            index += 1
            break
        if not token.startswith("-"):
            break
        index += 2 if token == "--precision" else 1
    return argv[: index + 1], argv[index + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``polprec`` command line with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own, script_args = _split_at_script(argv)
    args = _parser().parse_args(own)
    if script_args is not None:
        args.script_args = script_args
    try:
        status: int = args.handler(args)
    except BrokenPipeError:  # `polprec policies | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status

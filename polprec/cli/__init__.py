"""The ``polprec`` command line: ``run`` a script under a precision, list ``policies``, ``info``.

``polprec run train.py --precision=bf16-mixed --lr 0.1`` runs ``train.py`` as ``__main__`` with
``POLPREC_PRECISION=bf16-mixed`` set, so that ``get_policy()`` in the script follows the command
line, and gives it ``--lr 0.1``; ``polprec run --devices 2 train.py`` starts two processes through
``torch.distributed.run``. This is Lightning Fabric's ``fabric run``: polprec's options are read
on either side of ``SCRIPT``, and ``--`` ends them.
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


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``polprec`` parser and its ``run`` subparser."""
    parser = argparse.ArgumentParser(
        prog="polprec",
        description="Functional, JAX-style mixed precision for PyTorch.",
    )
    parser.add_argument(
        "--version", action="version", version=f"polprec {__version__} (torch {torch.__version__})"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = _run.add_parser(commands)
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
    return parser, run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``polprec`` command line with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, run = _parsers()
    if argv[:1] == ["run"]:  # argparse cannot read options on both sides of SCRIPT; see _run
        own, script, script_args = _run.split_argv(run, argv[1:])
        args = parser.parse_args(["run", *own])
        args.script, args.script_args = script, script_args
    else:
        args = parser.parse_args(argv)
    try:
        status: int = args.handler(args)
    except BrokenPipeError:  # `polprec policies | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status

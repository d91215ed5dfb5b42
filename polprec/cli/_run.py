"""``polprec run``: run a script with its precision, and its processes, chosen on the command line.

As in Lightning Fabric's ``fabric run`` (click with ``ignore_unknown_options``), polprec's
options are read on either side of ``SCRIPT``: ``polprec run train.py --precision=bf16 --lr 0.1``
sets the precision and gives ``--lr 0.1`` to the script. Everything else, and everything after
``--``, goes to the script in order.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from polprec.cli import _launch
from polprec.policy import CLI_ENV_VAR, ENV_VAR, get_policy

__all__ = ["add_parser", "command", "split_argv"]


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` for whole numbers >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: give a whole number >= {low}"
            ) from None
        return value

    return parse


def _port(text: str) -> int:
    value = _at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a port is 1 to 65535")
    return value


# (flags, argparse settings) of every option that takes a value; with -h/--help these are
# polprec's own options, read before and after SCRIPT.
_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (
        ("--precision",),
        {
            "metavar": "P",
            "help": "any spec `polprec policies` lists, e.g. 32-true, bf16-mixed, 16-mixed, "
            "bf16-true, c=bf16; the script's get_policy() returns its policy",
        },
    ),
    (
        ("--devices",),
        {
            "metavar": "N",
            "default": "1",
            "help": "processes to start on this node: a number, 'auto' (1), or -1 for every GPU "
            "(default 1: the script runs in this process). With more than one, or more than "
            "one node, torch.distributed.run starts them, setting RANK, LOCAL_RANK, WORLD_SIZE, "
            "MASTER_ADDR and MASTER_PORT",
        },
    ),
    (
        ("--accelerator",),
        {
            "choices": _launch.ACCELERATORS,
            "default": "auto",
            "help": "how --devices is counted: cuda, gpu and mps check that the GPUs exist; cpu "
            "and auto (the default) take a number as processes. polprec does not move tensors: "
            "the script picks its device, e.g. cuda:LOCAL_RANK, or the CPU with gloo",
        },
    ),
    (
        ("--strategy",),
        {
            "choices": ("ddp", "fsdp"),
            "help": "accepted as in fabric run: both start one process per device, as without "
            "it; the script wraps its model itself (dp and deepspeed are not supported)",
        },
    ),
    (
        ("--num-nodes", "--num_nodes"),
        {"metavar": "N", "type": _at_least(1), "default": 1, "help": "machines (default 1)"},
    ),
    (
        ("--node-rank", "--node_rank"),
        {
            "metavar": "R",
            "type": _at_least(0),
            "default": 0,
            "help": "this machine's index, 0 to num-nodes - 1 (default 0)",
        },
    ),
    (
        ("--main-address", "--main_address"),
        {
            "metavar": "ADDRESS",
            "default": "127.0.0.1",
            "help": "address of the machine with node rank 0 (default 127.0.0.1)",
        },
    ),
    (
        ("--main-port", "--main_port"),
        {
            "metavar": "PORT",
            "type": _port,
            "default": 29400,
            "help": "port on the main machine for the processes to meet (default 29400)",
        },
    ),
)
_VALUE_FLAGS = frozenset(flag for flags, _ in _OPTIONS for flag in flags)
_HELP_FLAGS = frozenset(("-h", "--help"))
_OPTION_LIST = ", ".join(flags[0] for flags, _ in _OPTIONS)


_DESCRIPTION = """\
Run SCRIPT as __main__ with POLPREC_PRECISION=P set, so that get_policy() in the
script returns P's policy; an explicit get_policy(spec) there that disagrees with
P raises ValueError. As in fabric run, the options below are read before and
after SCRIPT; every other argument, and every argument after --, goes to the
script in order. With one device the script runs in this process; with more, or
more than one node, torch.distributed.run starts one process per device. The
exit status is the script's (with several processes: the first failing one's)."""
_EXAMPLES = """\
examples:
  polprec run train.py --precision=bf16-mixed --lr 0.1   # train.py gets --lr 0.1
  polprec run --devices 2 train.py                       # two processes, RANK 0 and 1
  polprec run train.py -- --precision 16-mixed --help    # all of it for train.py"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``run`` to ``commands`` (the subparsers of ``polprec``) and return its parser."""
    run: argparse.ArgumentParser = commands.add_parser(
        "run",
        allow_abbrev=False,  # `--prec P` is the script's, not --precision
        usage="polprec run [-h] [OPTIONS] SCRIPT [OPTIONS | ARGS ...] [-- ARGS ...]",
        help="run a Python script with its precision (and processes) chosen on the command line",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
    )
    for flags, settings in _OPTIONS:
        run.add_argument(*flags, **settings)
    run.add_argument("script", metavar="SCRIPT", nargs="?", help="the Python script to run")
    run.add_argument(
        "script_args",
        metavar="ARGS",
        nargs="*",
        help="the script's arguments: all that is not an option above, and all after --",
    )
    run.set_defaults(handler=command, parser=run)
    return run


def split_argv(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[list[str], str | None, list[str]]:
    """``polprec run``'s arguments as (polprec's options, SCRIPT, the script's arguments).

    Options are returned as ``--name=value``, so that argparse never mistakes a value such as
    ``-1`` for an option. An unknown option before SCRIPT is an error (``parser.error``).
    """
    own: list[str] = []
    script: str | None = None
    script_args: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        name = token.partition("=")[0]
        if token == "--":
            rest = list(tokens)
            if script is None and rest:
                script = rest.pop(0)
            script_args += rest
        elif name in _VALUE_FLAGS:
            if "=" not in token and (value := next(tokens, None)) is not None:
                token = f"{token}={value}"
            own.append(token)  # a missing value is left for argparse to report
        elif token in _HELP_FLAGS:
            own.append(token)
        elif script is not None:
            script_args.append(token)
        elif token.startswith("-") and token != "-":
            parser.error(
                f"unrecognized option {token!r} before SCRIPT; polprec run's options are "
                f"{_OPTION_LIST} (either side of SCRIPT); the script's own options go after "
                "SCRIPT, or after --"
            )
        else:
            script = token
    return own, script, script_args


def _exit_code(code: object) -> int:
    """The process exit status Python gives ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_here(script: str, script_args: list[str]) -> int:
    """Run ``script`` as ``__main__`` in this process, as ``python SCRIPT ARGS`` would."""
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` does
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return _exit_code(exc.code)
    except Exception as err:
        tb = err.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next  # drop polprec's and runpy's frames, as `python SCRIPT` shows none
        traceback.print_exception(type(err), err, tb or err.__traceback__)
        return 1
    return 0


def command(args: argparse.Namespace) -> int:
    """``polprec run``: check every option, set the precision, run or launch the script."""
    parser: argparse.ArgumentParser = args.parser
    if args.precision is not None:
        os.environ.pop(CLI_ENV_VAR, None)  # this command line overrides an enclosing `polprec run`
        try:
            get_policy(args.precision)
        except ValueError as err:
            parser.error(f"argument --precision: {err}")
    try:
        processes = _launch.process_count(args.devices, args.accelerator)
    except ValueError as err:
        parser.error(f"argument --devices: {err}")
    if args.node_rank >= args.num_nodes:
        parser.error(
            f"argument --node-rank: invalid value {args.node_rank}: give 0 to "
            f"{args.num_nodes - 1} (--num-nodes is {args.num_nodes})"
        )
    script: str | None = args.script
    if script is None:
        parser.error("the following arguments are required: SCRIPT")
    if not os.path.exists(script):
        parser.error(f"cannot open script {script!r}: no such file or directory")
    if args.precision is not None:
        os.environ[ENV_VAR] = args.precision
        os.environ[CLI_ENV_VAR] = "1"
    if processes == 1 and args.num_nodes == 1:
        return _run_here(script, args.script_args)
    return _launch.launch(
        script,
        args.script_args,
        processes=processes,
        num_nodes=args.num_nodes,
        node_rank=args.node_rank,
        main_address=args.main_address,
        main_port=args.main_port,
    )

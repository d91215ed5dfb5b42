"""``polprec run``: run a script with its precision chosen on the command line."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback

from polprec.policy import CLI_ENV_VAR, ENV_VAR, get_policy

__all__ = ["command"]


def _exit_code(code: object) -> int:
    """The process exit status Python gives ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def command(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    script: str = args.script
    if args.precision is not None:
        os.environ.pop(CLI_ENV_VAR, None)  # this command line overrides an enclosing `polprec run`
        try:
            get_policy(args.precision)
        except ValueError as err:
            parser.error(f"argument --precision: {err}")
        os.environ[ENV_VAR] = args.precision
        os.environ[CLI_ENV_VAR] = "1"
    elif any(a == "--precision" or a.startswith("--precision=") for a in args.script_args):
        print(
            "polprec run: note: arguments after SCRIPT go to the script, --precision included; "
            "write `polprec run --precision P SCRIPT ...` to set polprec's precision",
            file=sys.stderr,
        )
    if not os.path.exists(script):
        parser.error(f"cannot open script {script!r}: no such file or directory")
    sys.argv = [script, *args.script_args]
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

"""The ``polprec`` command line: ``run`` a script under a precision, list ``policies``, ``info``.

``polprec run --precision bf16-mixed train.py --lr 0.1`` runs ``train.py`` as ``__main__`` with
``POLPREC_PRECISION=bf16-mixed`` set, so ``get_policy()`` in the script follows the command line
(Lightning Fabric's ``fabric run --precision``). ``--precision`` goes before the script: every
argument after ``SCRIPT`` belongs to the script, untouched, even when it looks like an option.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from polprec import __version__, _catalogue
from polprec.devices import half_dtype
from polprec.policy import CLI_ENV_VAR, ENV_VAR, Policy, get_policy, parse_spec
from polprec.scaling import default_loss_scale

__all__ = ["main"]

_HALF_DTYPES = (torch.bfloat16, torch.float16)
_MATMUL_DTYPES = (torch.float32, *_HALF_DTYPES)
_MATMUL_TARGET_S = 0.01  # matmul sizes double until the slowest dtype's product takes this long
_MATMUL_REPEATS = 5
_PAYS = 1.2  # a 16-bit matmul this many times faster than float32 makes the policy worth it


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    return "\n".join(line.rstrip() for line in lines)


# --- polprec run ------------------------------------------------------------------------------


def _exit_code(code: object) -> int:
    """The process exit status Python gives ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> int:
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


# --- polprec policies -------------------------------------------------------------------------


def _policy_rows() -> list[dict[str, Any]]:
    named = _catalogue.SPEC_NAMES
    specs: list[tuple[int | str, str]] = [(n, "fabric (int)") for n in _catalogue.INT_SPECS]
    specs += [(k, s.source) for k, s in named.items()]
    specs += [(k, "dtype") for k in _catalogue.DTYPE_NAMES if k not in named]  # named ones win
    specs += [(k, "jmp") for k in _catalogue.GRAMMAR_EXAMPLES]
    rows = []
    for spec, kind in specs:
        policy: Policy = parse_spec(spec)  # not get_policy: a `polprec run` value is no conflict
        rows.append(
            {
                "spec": spec,
                "kind": kind,
                "param_dtype": _name(policy.param_dtype),
                "compute_dtype": _name(policy.compute_dtype),
                "output_dtype": _name(policy.output_dtype),
                "loss_scale": type(default_loss_scale(policy)).__name__,
            }
        )
    return rows


def _policies(args: argparse.Namespace) -> int:
    rows = _policy_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("spec", "kind", "params", "compute", "output", "default loss scale")
    print(_table(header, [list(row.values()) for row in rows]))
    shadowed = ", ".join(repr(k) for k in _catalogue.DTYPE_NAMES if k in _catalogue.SPEC_NAMES)
    print(
        "\nCase and surrounding whitespace are ignored. A bare dtype name sets all three dtypes,\n"
        f"except {shadowed} (Lightning Fabric's value above). jmp grammar: keys params|p,\n"
        "compute|c, output|o (any dtype name); compute defaults to params, output to compute."
    )
    return 0


# --- polprec info -----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _autocast_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.autocast`` on ``device`` really computes a matmul in ``dtype``."""
    x = torch.ones(8, 8, device=device)
    with warnings.catch_warnings(record=True):  # an unsupported dtype warns and disables autocast
        warnings.simplefilter("always")
        try:
            with torch.autocast(device.type, dtype=dtype):
                return (x @ x).dtype == dtype
        except (RuntimeError, ValueError, TypeError):
            return False


def _seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    _sync(a.device)
    start = time.perf_counter()
    torch.mm(a, b)
    _sync(a.device)
    return time.perf_counter() - start


def _matmul(device: torch.device, max_n: int) -> dict[str, Any]:
    """GFLOP/s of ``n x n`` matmuls per dtype, one ``n`` for all (median after a warm-up).

    ``n`` doubles from 256 up to ``max_n`` while the slowest dtype's product takes under
    ``_MATMUL_TARGET_S / 8``; each size's first product per dtype is its warm-up.
    """
    n = 256
    while True:
        operands = {}
        for dtype in _MATMUL_DTYPES:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            try:
                probe = _seconds(a, b)
            except RuntimeError:  # the device has no matmul for this dtype
                continue
            operands[dtype] = (a, b, probe)
        slowest = max(probe for _, _, probe in operands.values())
        if n >= max_n or slowest * 8 > _MATMUL_TARGET_S:
            break
        n *= 2
    gflops = {}
    for dtype, (a, b, _) in operands.items():
        seconds = statistics.median(_seconds(a, b) for _ in range(_MATMUL_REPEATS))
        gflops[_name(dtype)] = 2 * n**3 / seconds / 1e9
    base = gflops["float32"]
    ratios = {name: value / base for name, value in gflops.items() if name != "float32"}
    return {"n": n, "repeats": _MATMUL_REPEATS, "gflops": gflops, "ratio_to_float32": ratios}


def _verdict(label: str, ratios: dict[str, float]) -> str:
    bf16, fp16 = ratios.get("bfloat16", 0.0), ratios.get("float16", 0.0)
    short = {"bfloat16": "bf16", "float16": "fp16"}
    speeds = ", ".join(f"{short[k]}/fp32 {v:.2f}x" for k, v in ratios.items())
    if bf16 >= _PAYS:
        return f"{label}: {speeds}: a bf16 policy should pay on this machine"
    if fp16 >= _PAYS:
        return (
            f"{label}: {speeds}: a bf16 policy will not pay on this machine; "
            "a float16 one (with loss scaling) should"
        )
    return f"{label}: {speeds}: a bf16 policy will not pay on this machine"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_report(device: torch.device, name: str, capability: str, max_n: int) -> dict[str, Any]:
    matmul = _matmul(device, max_n) if max_n else None
    label = f"{device} ({name})"
    return {
        "device": str(device),
        "name": name,
        "capability": capability,
        "half_dtype": _name(half_dtype(device)),
        "autocast": {_name(d): _autocast_supports(device, d) for d in _HALF_DTYPES},
        "matmul": matmul,
        "verdict": _verdict(label, matmul["ratio_to_float32"]) if matmul else None,
    }


def _info_report() -> dict[str, Any]:
    cpu = _device_report(
        torch.device("cpu"), _cpu_name(), torch.backends.cpu.get_cpu_capability(), 1024
    )
    cpu["threads"] = torch.get_num_threads()
    devices = [cpu]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            name = torch.cuda.get_device_name(index)
            max_n = 8192 if index == 0 else 0  # measure the first GPU only
            devices.append(
                _device_report(torch.device("cuda", index), name, f"{major}.{minor}", max_n)
            )
    if torch.backends.mps.is_available():
        devices.append(_device_report(torch.device("mps"), "Apple MPS", "", 8192))
    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows
        load = None
    return {
        "polprec": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "devices": devices,
    }


def _info(args: argparse.Namespace) -> int:
    report = _info_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"polprec {report['polprec']}, torch {report['torch']}, Python {report['python']} "
        f"on {report['platform']}\n"
    )
    devices = report["devices"]
    header: tuple[str, ...] = ("device", "name", "capability", "half_dtype")
    header += ("autocast bf16", "autocast fp16")
    rows = [
        [d["device"], d["name"], d["capability"], d["half_dtype"]]
        + ["yes" if d["autocast"][_name(t)] else "no" for t in _HALF_DTYPES]
        for d in devices
    ]
    print(_table(header, rows))
    print(
        f"\nmatmul throughput, n x n, GFLOP/s (median of {_MATMUL_REPEATS} after warm-up; "
        f"CPU threads: {devices[0]['threads']}, float32 matmul precision "
        f"{report['float32_matmul_precision']!r})"
    )
    measured = [d for d in devices if d["matmul"]]
    header = ("device", "n", "float32", "bfloat16", "float16", "bf16/fp32", "fp16/fp32")
    rows = []
    for d in measured:
        gflops, ratios = d["matmul"]["gflops"], d["matmul"]["ratio_to_float32"]
        rows.append(
            [d["device"], d["matmul"]["n"]]
            + [f"{gflops[_name(t)]:.1f}" if _name(t) in gflops else "-" for t in _MATMUL_DTYPES]
            + [f"{ratios[_name(t)]:.2f}x" if _name(t) in ratios else "-" for t in _HALF_DTYPES]
        )
    print(_table(header, rows) + "\n")
    for d in measured:
        print(d["verdict"])
    load, cores = report["load_average"], report["cpu_count"]
    if load is not None and cores and load > cores / 2:
        print(f"(load average {load:.1f} on {cores} cores: other processes share the CPU)")
    return 0


# --- the parser -------------------------------------------------------------------------------


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
    run.set_defaults(handler=_run, parser=run, script_args=[])  # main() fills in ARGS

    for name, handler, text in (
        ("policies", _policies, "list every accepted precision spec and its dtypes"),
        ("info", _info, "what this machine supports: devices, autocast dtypes, matmul speed"),
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

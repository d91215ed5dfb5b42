"""``polprec info``: what this machine supports, and whether a 16-bit policy pays on it."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from typing import Any

import torch

from polprec import __version__
from polprec._catalogue import BF16, F16, dtype_name
from polprec.cli._text import table
from polprec.devices import half_dtype

__all__ = ["command"]

_HALF_DTYPES = (BF16, F16)  # bfloat16 first, as in the report
_MATMUL_DTYPES = (torch.float32, *_HALF_DTYPES)
_MATMUL_TARGET_S = 0.01  # matmul sizes double until the slowest dtype's product takes this long
_MATMUL_REPEATS = 5
_PAYS = 1.2  # a 16-bit matmul this many times faster than float32 makes the policy worth it


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
        gflops[dtype_name(dtype)] = 2 * n**3 / seconds / 1e9
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


def _cpuinfo(key: str, path: str = "/proc/cpuinfo") -> str | None:
    """The value of the first ``key`` line of Linux's ``/proc/cpuinfo``; ``None`` without one."""
    try:
        with open(path, encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(key):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


#: The CPU flags (Linux /proc/cpuinfo names) that make 16-bit matmuls fast: Intel AMX tiles
#: and the AVX-512 bfloat16/float16 instructions. Without any of them torch emulates 16-bit
#: matmuls in float32 and a 16-bit policy is slower than float32.
_HALF_CPU_FLAGS = ("amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16")


def _cpu_half_flags(path: str = "/proc/cpuinfo") -> list[str] | None:
    """Which of :data:`_HALF_CPU_FLAGS` this CPU has; ``None`` where the flags are unknown."""
    line = _cpuinfo("flags", path)
    if line is None:
        return None
    flags = set(line.split())
    return [f for f in _HALF_CPU_FLAGS if f in flags]


def _cpu_line(name: str, capability: str, flags: list[str] | None) -> str:
    if flags is None:
        units = "16-bit units unknown"
    else:
        amx = "AMX" if any(f.startswith("amx") for f in flags) else "no AMX"
        units = f"{amx}; 16-bit flags: {', '.join(flags) or 'none'}"
    return f"CPU {name} ({capability}, {units})"


def cpu_line() -> str:
    """One line naming the CPU and its 16-bit matrix units, for reports and benchmarks."""
    return _cpu_line(_cpu_name(), torch.backends.cpu.get_cpu_capability(), _cpu_half_flags())


def _device_report(device: torch.device, name: str, capability: str, max_n: int) -> dict[str, Any]:
    matmul = _matmul(device, max_n) if max_n else None
    label = f"{device} ({name})"
    return {
        "device": str(device),
        "name": name,
        "capability": capability,
        "half_dtype": dtype_name(half_dtype(device)),
        "autocast": {dtype_name(d): _autocast_supports(device, d) for d in _HALF_DTYPES},
        "matmul": matmul,
        "verdict": _verdict(label, matmul["ratio_to_float32"]) if matmul else None,
    }


def _info_report() -> dict[str, Any]:
    cpu = _device_report(
        torch.device("cpu"), _cpu_name(), torch.backends.cpu.get_cpu_capability(), 1024
    )
    cpu["threads"] = torch.get_num_threads()
    cpu["half_flags"] = _cpu_half_flags()
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


def command(args: argparse.Namespace) -> int:
    report = _info_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"polprec {report['polprec']}, torch {report['torch']}, Python {report['python']} "
        f"on {report['platform']}"
    )
    devices = report["devices"]
    cpu = devices[0]
    print(_cpu_line(cpu["name"], cpu["capability"], cpu["half_flags"]) + "\n")
    header: tuple[str, ...] = ("device", "name", "capability", "half_dtype")
    header += ("autocast bf16", "autocast fp16")
    rows = [
        [d["device"], d["name"], d["capability"], d["half_dtype"]]
        + ["yes" if d["autocast"][dtype_name(t)] else "no" for t in _HALF_DTYPES]
        for d in devices
    ]
    print(table(header, rows))
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
            + [
                f"{gflops[dtype_name(t)]:.1f}" if dtype_name(t) in gflops else "-"
                for t in _MATMUL_DTYPES
            ]
            + [
                f"{ratios[dtype_name(t)]:.2f}x" if dtype_name(t) in ratios else "-"
                for t in _HALF_DTYPES
            ]
        )
    print(table(header, rows) + "\n")
    for d in measured:
        print(d["verdict"])
    load, cores = report["load_average"], report["cpu_count"]
    if load is not None and cores and load > cores / 2:
        print(f"(load average {load:.1f} on {cores} cores: other processes share the CPU)")
    return 0

"""``polprec info``: what this machine supports, and whether a 16-bit policy pays on it.

Whether it pays is read from matmul timings at a few sizes, repeated in shuffled rounds: a
single timing flips between "pays" and "does not" on a machine whose other processes come and
go, so the verdict is given only where the middle half of the timings falls on one side of
1x and of the threshold, and is "unclear" otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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
#: The n x n sizes timed per device type: a few, because a 16-bit matmul's speed-up depends on
#: the size (small products are dominated by conversions and dispatch).
_MATMUL_SIZES = {"cpu": (256, 512, 1024), "other": (1024, 2048, 4096)}
_MATMUL_ROUNDS = 5  # each round times every (size, dtype) once, in a new shuffled order
_MAX_PRODUCT_S = 0.2  # a dtype is not timed at a size whose product would take longer
_PAYS = 1.2  # a 16-bit matmul this many times faster than float32 makes the policy worth it
_SHORT = {"bfloat16": "bf16", "float16": "fp16"}


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


def _operands(
    device: torch.device, sizes: tuple[int, ...]
) -> dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]:
    """The operands of every (size, dtype) to time, each warmed up once.

    A dtype goes up to the next size only while its product there would take under
    ``_MAX_PRODUCT_S`` (8 times the last, for a cubic cost): emulated 16-bit matmuls, 50 times
    slower than float32 on some CPUs, are timed at the small sizes only.
    """
    operands = {}
    for dtype in _MATMUL_DTYPES:
        last = 0.0
        for n in sizes:
            if last * 8 > _MAX_PRODUCT_S:
                break
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            try:
                _seconds(a, b)  # the warm-up
            except RuntimeError:  # the device has no matmul for this dtype
                break
            last = min(_seconds(a, b), _seconds(a, b))
            operands[n, dtype] = (a, b)
    return operands


def _spread(samples: list[float]) -> dict[str, Any]:
    """The median and the middle half (quartiles) of ``samples``."""
    low, median, high = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median": median, "low": low, "high": high, "timings": len(samples)}


def _matmul(device: torch.device, sizes: tuple[int, ...]) -> dict[str, Any]:
    """GFLOP/s of ``n x n`` matmuls per size and dtype, and each 16-bit dtype's speed-up.

    Every round times each (size, dtype) once, in a new shuffled order, so that another
    process's load falls on all of them alike; a speed-up is float32's time over the 16-bit
    dtype's for the same size and round. Its spread over sizes and rounds is reported with
    its median: on a busy machine, or where the speed-up depends on the size, it is wide.
    """
    operands = _operands(device, sizes)
    times: dict[tuple[int, torch.dtype], list[float]] = {key: [] for key in operands}
    order = list(operands)
    shuffle = random.Random(0).shuffle
    for _ in range(_MATMUL_ROUNDS):
        shuffle(order)
        for key in order:
            times[key].append(_seconds(*operands[key]))
    measured = sorted({n for n, _ in operands})
    gflops = {
        dtype_name(dtype): {
            str(n): 2 * n**3 / statistics.median(times[n, dtype]) / 1e9
            for n in measured
            if (n, dtype) in times
        }
        for dtype in _MATMUL_DTYPES
    }
    ratios = {}
    for dtype in _HALF_DTYPES:
        pairs = [
            (n, times[n, torch.float32], times[n, dtype])
            for n in measured
            if (n, dtype) in times and (n, torch.float32) in times
        ]
        samples = [f / h for _, fp32, half in pairs for f, h in zip(fp32, half, strict=True)]
        if samples:
            ratios[dtype_name(dtype)] = _spread(samples) | {
                "by_size": {
                    str(n): statistics.median(f / h for f, h in zip(fp32, half, strict=True))
                    for n, fp32, half in pairs
                }
            }
    return {
        "sizes": measured,
        "rounds": _MATMUL_ROUNDS,
        "gflops": {k: v for k, v in gflops.items() if v},
        "ratio_to_float32": ratios,
    }


def _pays(spread: dict[str, Any] | None) -> str:
    """``"yes"``, ``"no"`` or ``"unclear"``: whether the middle half of the timings falls on
    one side of both 1x (faster or slower than float32) and ``_PAYS`` (worth a policy)."""
    if spread is None:
        return "no"
    low, high = spread["low"], spread["high"]
    if low >= _PAYS:
        return "yes"
    if high < 1.0 or (low >= 1.0 and high < _PAYS):
        return "no"
    return "unclear"


def _speeds(ratios: dict[str, dict[str, Any]]) -> str:
    return ", ".join(
        f"{_SHORT[k]}/fp32 {v['median']:.2f}x ({v['low']:.2f}x-{v['high']:.2f}x)"
        for k, v in ratios.items()
    )


def _verdict(label: str, ratios: dict[str, dict[str, Any]]) -> str:
    """One line: each 16-bit speed-up (median, middle half) and whether a policy pays."""
    bf16, fp16 = _pays(ratios.get("bfloat16")), _pays(ratios.get("float16"))
    head = f"{label}: {_speeds(ratios)} (median, middle half of the timings): "
    if bf16 == "yes":
        return head + "a bf16 policy should pay on this machine"
    if bf16 == "unclear":
        verdict = (
            "whether a bf16 policy pays on this machine is unclear: the timings straddle "
            f"{'1x' if ratios['bfloat16']['low'] < 1.0 else f'{_PAYS}x'} (rerun on an idle "
            "machine, or time your own model)"
        )
    else:
        verdict = "a bf16 policy will not pay on this machine"
    if fp16 == "yes":
        verdict += "; a float16 one (with loss scaling) should"
    elif fp16 == "unclear":
        verdict += "; whether a float16 one (with loss scaling) would is unclear"
    return head + verdict


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


def _device_report(
    device: torch.device, name: str, capability: str, measure: bool
) -> dict[str, Any]:
    sizes = _MATMUL_SIZES["cpu" if device.type == "cpu" else "other"]
    matmul = _matmul(device, sizes) if measure else None
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
        torch.device("cpu"), _cpu_name(), torch.backends.cpu.get_cpu_capability(), True
    )
    cpu["threads"] = torch.get_num_threads()
    cpu["half_flags"] = _cpu_half_flags()
    devices = [cpu]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            name = torch.cuda.get_device_name(index)
            measure = index == 0  # the first GPU only
            devices.append(
                _device_report(torch.device("cuda", index), name, f"{major}.{minor}", measure)
            )
    if torch.backends.mps.is_available():
        devices.append(_device_report(torch.device("mps"), "Apple MPS", "", True))
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
        f"\nmatmul throughput, n x n, GFLOP/s (median of {_MATMUL_ROUNDS} shuffled rounds after "
        f"a warm-up; CPU threads: {devices[0]['threads']}, float32 matmul precision "
        f"{report['float32_matmul_precision']!r})"
    )
    measured = [d for d in devices if d["matmul"]]
    header = ("device", "n", "float32", "bfloat16", "float16", "bf16/fp32", "fp16/fp32")
    rows = []
    for d in measured:
        gflops, ratios = d["matmul"]["gflops"], d["matmul"]["ratio_to_float32"]
        for n in map(str, d["matmul"]["sizes"]):
            rows.append(
                [d["device"], n]
                + [
                    f"{gflops[t][n]:.1f}" if n in gflops.get(t, {}) else "-"
                    for t in map(dtype_name, _MATMUL_DTYPES)
                ]
                + [
                    f"{ratios[t]['by_size'][n]:.2f}x"
                    if n in ratios.get(t, {}).get("by_size", {})
                    else "-"
                    for t in map(dtype_name, _HALF_DTYPES)
                ]
            )
    print(table(header, rows) + "\n")
    for d in measured:
        print(d["verdict"])
    load, cores = report["load_average"], report["cpu_count"]
    if load is not None and cores and load > cores / 2:
        print(f"(load average {load:.1f} on {cores} cores: other processes share the CPU)")
    return 0

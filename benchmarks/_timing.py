"""Shared timing helper for the benchmarks: interleaved runs, medians, ratio tables."""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from polprec.cli._info import cpu_line


def measure(
    candidates: dict[str, Callable[[], object]], *, repeats: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each candidate, measured interleaved in one process.

    Each round runs every candidate once, in a new shuffled order (seeded: the same orders on
    every run), so slow drifts of the machine (other processes, frequency changes) hit all
    candidates alike, and so does whatever one candidate leaves behind for the next (caches
    filled with its own model, memory it freed). A rotating order would not do: it keeps
    every candidate behind the same predecessor, which measured up to 17% on one of three
    identical compiled steps.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    shuffler = random.Random(0)
    for _ in range(repeats):
        order = shuffler.sample(names, len(names))
        for name in order:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def header() -> str:
    """One line that says where the numbers come from."""
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cpu_line()}"


def table(rows: list[list[str]], head: list[str]) -> str:
    """A plain-text table with right-aligned columns."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add the shared ``--threads`` option, parse ``argv`` and set torch's thread count."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadier on shared machines)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args

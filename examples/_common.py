"""Pieces the examples share: the digits data, command-line options, progress and reports,
joining a process group.

The optimizers are ``pp.optim``'s: pure updates that skip a step whose gradients were not
finite, so the examples' training steps are functions of tensors in, tensors out.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, Generic, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

import polprec as pp

T = TypeVar("T")

Tree = dict[str, torch.Tensor]


def make_parser(
    doc: str,
    *,
    precision: str,
    steps: int,
    batch_size: int,
    lr: float,
    threads: int | None,
    hidden: int | None = None,
) -> argparse.ArgumentParser:
    """An argument parser with the options every example shares, with these defaults."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--precision",
        default=None,
        help="any spec polprec.get_policy accepts (e.g. 32-true, bf16-mixed, 16-mixed, "
        f"bf16-true, 'p=f32,c=f16'); default: POLPREC_PRECISION or {precision}",
    )
    parser.set_defaults(fallback_precision=precision)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    if hidden is not None:
        parser.add_argument("--hidden", type=int, default=hidden, help="MLP width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=threads,
        help="torch intra-op threads" + (" (default: torch's choice)" if threads is None else ""),
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress (a bar on a terminal, else a line on stderr every 30 s and per run)",
    )
    return parser


def add_step_options(parser: argparse.ArgumentParser) -> None:
    """``--accumulate K`` and ``--clip NORM``: the rest of the torch.amp GradScaler loop."""
    parser.add_argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="K",
        help="split each batch into K micro-batches: pp.value_and_grad(..., microbatches=K) "
        "averages their gradients and adjusts the loss scale once (--batch-size must be a "
        "multiple of K)",
    )
    parser.add_argument(
        "--clip",
        type=float,
        default=None,
        metavar="NORM",
        help="clip the unscaled gradients to this global norm before the optimizer step "
        "(pp.clip_by_global_norm; default: no clipping)",
    )


def check_step_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``--accumulate`` and ``--clip`` values the step cannot use (exits, as argparse)."""
    if args.accumulate < 1:
        parser.error(f"--accumulate must be >= 1, got {args.accumulate}")
    if args.batch_size % args.accumulate:
        parser.error(
            f"--batch-size {args.batch_size} is not divisible by --accumulate "
            f"{args.accumulate}: every micro-batch holds batch-size / K examples; use a batch "
            f"size that is a multiple of {args.accumulate}"
        )
    if args.clip is not None and not (math.isfinite(args.clip) and args.clip > 0):
        parser.error(f"--clip must be a finite number > 0, got {args.clip}")


def clip(grads: Any, max_norm: float | None) -> tuple[Any, torch.Tensor | None]:
    """``grads`` clipped to ``max_norm`` and their norm before it (``None``: left alone)."""
    if max_norm is None:
        return grads, None
    return pp.clip_by_global_norm(grads, max_norm)


def clipped_steps(norms: Sequence[torch.Tensor | None], max_norm: float | None) -> int:
    """How many steps clipping shortened: finite norms above ``max_norm`` (read once)."""
    if max_norm is None or not norms:
        return 0
    stacked = torch.stack([n for n in norms if n is not None])
    return int((torch.isfinite(stacked) & (stacked > max_norm)).sum())


def step_line(args: argparse.Namespace) -> str:
    """What ``--accumulate`` and ``--clip`` did to each step, for a run's summary."""
    k = args.accumulate
    if k > 1:
        line = (
            f"Each step: {k} micro-batches of {args.batch_size // k} examples "
            f"(pp.value_and_grad(..., microbatches={k}): gradients averaged, one loss-scale "
            "adjustment, one optimizer step)"
        )
    else:
        line = f"Each step: one batch of {args.batch_size} examples (--accumulate 1)"
    if args.clip is None:
        return line + "; no clipping (--clip)."
    return (
        f"{line}; unscaled gradients clipped to global norm {args.clip:g} "
        "(pp.clip_by_global_norm): 'clipped' counts the steps it shortened."
    )


def precision_spec(args: argparse.Namespace) -> str:
    """``--precision``, else ``POLPREC_PRECISION`` (set by ``polprec run``), else the default."""
    spec: str = args.precision or os.environ.get("POLPREC_PRECISION") or args.fallback_precision
    return spec


def init_distributed() -> None:
    """Join the gloo group torchrun (or ``polprec run --devices N``) describes, or form a
    one-process group on a free port without it."""
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


class Digits(NamedTuple):
    """scikit-learn's bundled 8x8 handwritten digits, split once with a fixed seed."""

    x_train: torch.Tensor  # (n, 64) float32, pixel values scaled to [0, 1]
    y_train: torch.Tensor  # (n,) int64 labels 0-9
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """The digits (1797 images, no download), split into train and test sets."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` index batches over ``n`` examples, reshuffled every epoch (drop last)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=gen)
        out.extend(order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return out[:steps]


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (None: unchanged), then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Progress(Generic[T]):
    """Iterate over ``items`` and show progress on stderr: a tqdm bar on a terminal, else lines.

    A bar redraws itself with carriage returns, which in a log file or a pipe become one
    line of many kilobytes. When the stream is not a terminal, a plain line goes out instead
    every ``interval`` seconds and once when the loop ends. ``quiet`` shows nothing.
    """

    def __init__(
        self,
        items: Iterable[T],
        *,
        desc: str,
        total: int | None = None,
        quiet: bool = False,
        interval: float = 30.0,
        stream: IO[str] | None = None,
    ) -> None:
        self._items = items
        self._desc = desc
        self._total = total if total is not None else _length(items)
        self._quiet = quiet
        self._interval = interval
        self._stream = stream if stream is not None else sys.stderr
        self._postfix: dict[str, Any] = {}
        isatty = getattr(self._stream, "isatty", None)
        self._bar: Any = None
        if not quiet and callable(isatty) and isatty():
            self._bar = tqdm(items, desc=desc, total=total, leave=False, file=self._stream)

    def __iter__(self) -> Iterator[T]:
        if self._bar is not None:
            yield from self._bar
            return
        start = last = time.perf_counter()
        done = 0
        for item in self._items:
            yield item
            done += 1
            now = time.perf_counter()
            if not self._quiet and now - last >= self._interval:
                self._line(done, now - start)
                last = now
        if not self._quiet:
            self._line(done, time.perf_counter() - start, end=True)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (tqdm's ``set_postfix``), e.g. the latest loss."""
        if self._bar is not None:
            self._bar.set_postfix(**values)
        self._postfix.update(values)

    def warn(self, message: str) -> None:
        """A line on the stream, also when ``quiet`` (above a bar, which redraws below it)."""
        line = f"{self._desc}: warning: {message}"
        if self._bar is not None:
            tqdm.write(line, file=self._stream)
        else:
            print(line, file=self._stream)
            self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _line(self, done: int, seconds: float, *, end: bool = False) -> None:
        count = f"{done}/{self._total}" if self._total is not None else str(done)
        extra = "".join(f", {k}={v}" for k, v in self._postfix.items())
        state = "done" if end else "step"
        print(f"{self._desc}: {state} {count} in {seconds:.1f} s{extra}", file=self._stream)
        self._stream.flush()


#: Steps skipped in a row (their gradients were not finite) at which a run warns. A dynamic
#: loss scale that overflowed backs off in a step or two; ten skips in a row mean that nothing
#: trains: NaN in the data or the loss, a loss that overflows at every scale, or a loss-scale
#: state that is not passed on from one step to the next.
SKIPS_WARN = 10


class SkipWatch:
    """Warn on a progress line when the optimizer has skipped many steps in a row.

    ``check(i, state)`` reads ``state.consecutive_skips`` (every ``pp.optim`` state counts
    them on the device) every ``every`` steps only: each read is a host sync, the steps in
    between stay sync-free. It warns once per run of skips that reaches ``threshold``.
    """

    def __init__(self, bar: Progress[Any], *, every: int = 10, threshold: int = SKIPS_WARN) -> None:
        self._bar = bar
        self._every = every
        self._threshold = threshold
        self._warned = False
        self.longest = 0  # the longest run of skips seen at a check

    def check(self, i: int, state: Any) -> None:
        if (i + 1) % self._every:
            return
        skips = int(state.consecutive_skips)  # the one sync, every `every` steps
        self.longest = max(self.longest, skips)
        if skips < self._threshold:
            self._warned = False
        elif not self._warned:
            self._warned = True
            self._bar.warn(
                f"the last {skips} steps were all skipped (state.consecutive_skips): their "
                "gradients were not finite, so nothing trains. A dynamic loss scale backs "
                "off within a few steps; a longer run means NaN in the data or the loss, a "
                "loss that overflows at every scale, or a loss scale that is not passed on: "
                "loss, grads, finite, loss_scale = step(..., loss_scale=loss_scale)"
            )


def _length(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of ``labels`` that ``logits.argmax(-1)`` gets right."""
    return 100.0 * float((logits.argmax(-1) == labels).float().mean())


def median_ms(seconds: Sequence[float]) -> float:
    """Median of per-step wall times, in milliseconds, skipping the first (warm-up) step."""
    timed = seconds[1:] if len(seconds) > 1 else seconds
    return 1000.0 * statistics.median(timed)


def power_of_two(x: float) -> str:
    """``x`` as ``2^k`` when it is a power of two (e.g. a loss weight), else ``format(x, "g")``."""
    mantissa, exponent = math.frexp(x)
    return f"2^{exponent - 1}" if mantissa == 0.5 and abs(exponent - 1) > 4 else f"{x:g}"


Format = str | Callable[[Any], str]


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, Format]]) -> None:
    """Print ``rows`` as a Markdown table; ``columns`` are ``(key, format spec or function)``."""
    cells = [
        [fmt(row[k]) if callable(fmt) else format(row[k], fmt) for k, fmt in columns]
        for row in rows
    ]
    heads = [k for k, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]

    def line(xs: Sequence[str]) -> str:
        return "| " + " | ".join(x.rjust(w) for x, w in zip(xs, widths, strict=True)) + " |"

    print(line(heads))
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for c in cells:
        print(line(c))

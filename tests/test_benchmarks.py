"""The timing scripts in benchmarks/ run end to end (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import importlib
import pathlib
import sys
from types import ModuleType

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def _header_names_the_cpu(out: str) -> None:
    from polprec.cli._info import cpu_line

    headers = [line for line in out.splitlines() if line.startswith("torch ")]
    assert len(headers) == 1
    assert headers[0].endswith(cpu_line())
    assert "threads; CPU " in headers[0]


def test_bench_unscale_prints_a_row_per_size_and_leaf_count(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _script("bench_unscale", monkeypatch)
    bench.main(["--leaves", "1", "3", "--sizes", "1e3", "--repeats", "2"])
    out = capsys.readouterr().out
    _header_names_the_cpu(out)
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("1e+03")]
    assert [row[1] for row in rows] == ["1", "3"]
    assert all(float(ratio) > 0 for row in rows for ratio in row[6:])


def test_bench_step_runs_every_eager_candidate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _script("bench_step", monkeypatch)
    argv = ["--models", "mlp", "--precision", "bf16-mixed", "16-mixed", "--optimizers", "sgd"]
    bench.main([*argv, "--repeats", "2", "--no-compile"])
    out = capsys.readouterr().out
    _header_names_the_cpu(out)
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("mlp ")]
    assert [row[1] for row in rows] == ["bf16-mixed", "16-mixed"]
    bf16, fp16 = rows
    # eager/best, donate/best, no flag/best, compiled/best, eager/no scaler, (pure-donate)/copy
    assert bf16[-3] == fp16[-3] == "-"  # nothing compiled with --no-compile
    assert fp16[-2] == "-"  # no "no scaler" step where float16 needs a GradScaler
    ratios = (bf16[-6], bf16[-5], bf16[-4], bf16[-2], fp16[-6], fp16[-4])
    assert all(float(cell.rstrip("x")) > 0 for cell in ratios)
    assert all(cell.endswith("x") for cell in (bf16[-1], fp16[-1]))  # may be < 0: noise


def test_measure_runs_each_candidate_after_every_other(monkeypatch: pytest.MonkeyPatch) -> None:
    timing = _script("_timing", monkeypatch)
    calls: list[str] = []
    names = ["a", "b", "c", "d"]
    times = timing.measure({n: (lambda n=n: calls.append(n)) for n in names}, repeats=40, warmup=2)
    assert set(times) == set(names) and all(t >= 0 for t in times.values())
    assert calls[: 2 * len(names)] == names * 2  # the warm-up rounds, in order
    rounds = [calls[i : i + 4] for i in range(8, len(calls), 4)]
    assert len(rounds) == 40 and all(sorted(r) == names for r in rounds)  # each once a round
    # A fixed cyclic order would keep every candidate behind the same predecessor.
    behind = {n: {r[r.index(n) - 1] for r in rounds if r.index(n) > 0} for n in names}
    assert all(behind[n] == set(names) - {n} for n in names)
    calls.clear()
    timing.measure({n: (lambda n=n: calls.append(n)) for n in names}, repeats=40, warmup=2)
    assert [calls[i : i + 4] for i in range(8, len(calls), 4)] == rounds  # seeded: repeatable


@pytest.mark.slow
def test_bench_distributed_times_polprec_and_fsdp2_on_two_ranks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _script("bench_distributed", monkeypatch)
    tiny = ["--d-model", "32", "--heads", "2", "--layers", "1", "--batch-size", "2", "--seq", "8"]
    bench.main([*tiny, "--repeats", "2", "--timeout", "120"])
    out = capsys.readouterr().out
    _header_names_the_cpu(out)
    assert "2 gloo ranks, 1 thread(s) each; bf16-mixed;" in out
    lines = out.splitlines()
    (head,) = [line for line in lines if line.strip().startswith("candidate")]
    assert head.split() == [
        "candidate", "step", "ms", "vs", "FSDP2", "state", "MB", "step", "peak", "MB",
        "peak", "MB", "vs", "FSDP2",
    ]  # fmt: skip
    cells = [line.split() for line in lines[lines.index(head) + 2 :]]
    rows = {" ".join(c[:-6]): c[-6:] for c in cells}  # the name, then six numbers
    assert list(rows) == ["polprec donate", "polprec pure", "FSDP2"]
    for name, (ms, ratio, state, step_peak, peak, peak_ratio) in rows.items():
        assert float(ms) > 0 and ratio.endswith("x") and peak_ratio.endswith("x"), name
        assert float(step_peak) > 0 and float(peak) >= float(state) > 0, name
    assert rows["FSDP2"][1] == rows["FSDP2"][5] == "1.00x"
    # every candidate holds the same shards: params, gradients and AdamW's two moments
    assert len({row[2] for row in rows.values()}) == 1

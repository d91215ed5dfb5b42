"""Smoke tests of the examples at small sizes: each runs in-process and its numbers are checked."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed
from helpers import free_port

import polprec as pp

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the examples import their siblings by name)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def run_main(name: str, argv: list[str] | None) -> tuple[Any, str]:
    """``examples/<name>.py``'s ``main(argv)`` (``main()`` for None) and what it printed."""
    main = load(name).main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main() if argv is None else main(argv)
    return result, out.getvalue()


def by_name(
    rows: list[dict[str, Any]], precision: str, scale: str, weight: float
) -> dict[str, Any]:
    (row,) = [
        r
        for r in rows
        if (r["precision"], r["loss scale"], r["loss weight"]) == (precision, scale, weight)
    ]
    return row


def test_quickstart_runs_and_stays_finite() -> None:
    _, printed = run_main("quickstart", None)
    assert printed.count("finite True") == 5
    assert "policy: params=float32,compute=bfloat16,output=float32" in printed


@pytest.mark.slow
def test_train_digits_compare_matches_float32_and_shows_underflow() -> None:
    weight = 2.0**-20
    rows, printed = run_main(
        "train_digits", ["--compare", "--quiet", "--steps", "200", "--hidden", "64"]
    )
    assert len(rows) == 8
    assert "precision | loss scale | loss weight | test acc %" in printed
    assert "2^-20" in printed
    f32 = by_name(rows, "32-true", "NoOp", 1.0)
    assert f32["test acc %"] > 90  # chance is 10%
    for precision, scale in [("bf16-mixed", "NoOp"), ("16-mixed", "Dynamic")]:
        row = by_name(rows, precision, scale, 1.0)
        assert abs(row["test acc %"] - f32["test acc %"]) <= 1.5, row
        assert torch.isfinite(row["loss curve"]).all()
    assert by_name(rows, "bf16-true", "NoOp", 1.0)["param dtype"] == "bfloat16"
    assert by_name(rows, "bf16-mixed", "NoOp", 1.0)["param dtype"] == "float32"

    # The underflow case: float32 does not care about the loss weight (Adam is invariant to
    # it), float16 without scaling gets all-zero gradients, dynamic scaling rescues it.
    f32_tiny = by_name(rows, "32-true", "NoOp", weight)
    assert abs(f32_tiny["test acc %"] - f32["test acc %"]) <= 0.5
    stalled = by_name(rows, "16-mixed", "NoOp", weight)
    rescued = by_name(rows, "16-mixed", "Dynamic", weight)
    curve = stalled["loss curve"]
    assert curve[-20:].mean() > 0.95 * curve[:20].mean()  # the loss does not decrease
    assert stalled["test acc %"] < 30
    assert abs(rescued["test acc %"] - f32_tiny["test acc %"]) <= 1.5
    assert rescued["final CE"] < 0.5 * stalled["final CE"]
    assert not stalled["moved"] and rescued["moved"]
    # Dynamic scales are powers of two that grew from 2**15 (period 100, 200 steps).
    for row in (rescued, by_name(rows, "16-mixed", "Dynamic", 1.0)):
        assert math.log2(row["final scale"]).is_integer()
        assert row["final scale"] >= 2.0**15 or row["skipped"] > 0
    assert stalled["final scale"] == 1.0 and stalled["skipped"] == 0

    # The legend names every column; the conclusions quote this run's numbers.
    legend = printed[printed.index("Legend:") : printed.index("Conclusions")]
    for column in ("precision", "loss scale", "loss weight", "test acc %", "final CE", "step ms"):
        assert f"\n  {column} " in legend, column
    assert "without the loss weight" in legend  # "final CE" is unweighted in every row
    conclusions = printed[printed.index("Conclusions") : printed.index("Note on speed")]
    assert (
        f"* Loss x2^-20: 16-mixed without loss scaling stalls at {stalled['test acc %']:.1f}%"
        in conclusions
    )
    assert "* Loss x2^-20: 16-mixed with dynamic loss scaling matches 32-true" in conclusions
    bf16 = by_name(rows, "bf16-mixed", "NoOp", 1.0)
    assert (
        f"* bf16-mixed matches 32-true: {bf16['test acc %']:.1f}% vs {f32['test acc %']:.1f}%"
        in conclusions
    )
    assert f"* Step time: 32-true {f32['step ms']:.2f} ms; bf16-mixed {bf16['step ms']:.2f} ms" in (
        conclusions
    )
    assert "`polprec info` says bf16 pays" in printed


def _digits_row(**overrides: Any) -> dict[str, Any]:
    row = {"precision": "32-true", "loss scale": "NoOp", "loss weight": 1.0, "test acc %": 97.0}
    row |= {"final CE": 0.03, "step ms": 1.0, "skipped": 0, "final scale": 1.0, "moved": True}
    return row | overrides


def test_train_digits_conclusions_follow_the_numbers() -> None:
    train_digits = load("train_digits")
    weight = 2.0**-20
    args = argparse.Namespace(underflow_weight=weight, steps=100)
    rows = [
        _digits_row(),
        _digits_row(precision="bf16-mixed", **{"test acc %": 91.0}),
        _digits_row(precision="16-mixed", **{"loss scale": "Dynamic", "final scale": 2.0**17}),
        _digits_row(**{"loss weight": weight, "test acc %": 96.5}),
        _digits_row(precision="16-mixed", moved=False, **{"loss weight": weight}),
        _digits_row(precision="16-mixed", moved=False, skipped=100, **{"loss weight": weight}),
    ]
    rows[4]["test acc %"], rows[5]["test acc %"] = 9.6, 10.2
    lines = train_digits.conclusions(rows, args)
    assert lines[1].startswith("* bf16-mixed is 6.0 points below 32-true: 91.0% vs 97.0%")
    assert lines[2].startswith("* 16-mixed with dynamic loss scaling matches 32-true")
    assert lines[2].endswith("0 overflowing steps skipped, loss scale 2^15 -> 2^17.")
    assert lines[3].startswith("* Loss x2^-20: 32-true trains as before")
    assert "16-mixed without loss scaling stalls at 9.6%" in lines[4]
    assert "every gradient was zero: they underflowed float16" in lines[4]
    assert "stalls at 10.2%" in lines[5] and "every step was skipped" in lines[5]
    assert lines[6].startswith("* Step time: 32-true 1.00 ms; bf16-mixed 1.00 ms (1.00x)")


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    common = load("_common")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        bar = common.Progress(range(4), desc="run", stream=stream, interval=0.0)
        assert list(bar) == [0, 1, 2, 3]
        bar.set_postfix(loss="0.5")
        bar.close()
    assert "\r" in terminal.getvalue()  # tqdm redraws its bar
    assert "\r" not in log.getvalue()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("run: step 1/4 in ") and lines[-1].startswith("run: done 4/4 in ")
    assert len(lines) == 5
    quiet = io.StringIO()
    assert list(common.Progress(range(3), desc="q", quiet=True, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_skip_watch_reads_the_counter_every_n_steps_and_warns_once_per_run() -> None:
    common = load("_common")

    class State:  # an optimizer state whose skip counter counts its reads (each one a sync)
        def __init__(self) -> None:
            self.reads = 0
            self.skips = 0

        @property
        def consecutive_skips(self) -> torch.Tensor:
            self.reads += 1
            return torch.tensor(self.skips)

    log = io.StringIO()
    bar = common.Progress(range(0), desc="run", stream=log, quiet=True)
    watch, state = common.SkipWatch(bar, every=5, threshold=10), State()
    for i, skips in enumerate([*range(1, 21), 0, 0, 0, 0, 0, *range(1, 16)]):
        state.skips = skips  # twenty skips in a row, five applied steps, fifteen skips
        watch.check(i, state)
        if i == 8:
            assert log.getvalue() == ""  # 9 skips: the last check (step 4) saw 5
        if i == 19:
            assert len(log.getvalue().splitlines()) == 1  # at step 9, not again at 14 and 19
    assert state.reads == 40 // 5  # steps 4, 9, 14, ...: the steps between stay sync-free
    warnings = log.getvalue().splitlines()
    assert len(warnings) == 2  # once per run of skips that reached the threshold
    assert warnings[0].startswith("run: warning: the last 10 steps were all skipped")
    assert warnings[1].startswith("run: warning: the last 10 steps were all skipped")
    assert "loss, grads, finite, loss_scale = step(..., loss_scale=loss_scale)" in warnings[0]
    assert watch.longest == 20


def test_train_digits_warns_when_nothing_trains(capsys: pytest.CaptureFixture[str]) -> None:
    # A loss that overflows float16 at every loss scale: every step is skipped.
    argv = ["--precision", "16-mixed", "--loss-weight", "1e30", "--quiet", "--steps", "30"]
    (row,), _ = run_main("train_digits", [*argv, "--hidden", "16"])
    assert row["skipped"] == 30
    (line,) = capsys.readouterr().err.splitlines()  # quiet: no progress, but the warning
    assert "warning: the last 10 steps were all skipped (state.consecutive_skips)" in line


def test_example_logs_lines_not_bars_when_stderr_is_a_pipe() -> None:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}
    argv = ["--precision", "bf16-mixed", "--steps", "60", "--hidden", "16"]
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_digits.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert "\r" not in result.stderr  # no carriage-return bars in a log
    (line,) = result.stderr.splitlines()  # 60 quick steps: only the closing line
    assert line.startswith("bf16-mixed, NoOpLossScale: done 60/60 in ")
    assert "| bf16-mixed |" in result.stdout


def test_train_digits_single_run_reads_env_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLPREC_PRECISION", "bf16-true")
    png = tmp_path / "curves.png"
    argv = ["--quiet", "--steps", "40", "--hidden", "32", "--plot", str(png)]
    threads_before = torch.get_num_threads()
    (row,), printed = run_main("train_digits", argv)
    assert torch.get_num_threads() == threads_before
    assert row["policy"] == str(pp.get_policy("bf16-true"))
    assert row["param dtype"] == "bfloat16"
    assert row["loss scale"] == "NoOp"
    assert row["step ms"] > 0
    assert row["loss curve"].shape == (40,) and row["scale curve"].shape == (40,)
    assert row["loss curve"][-10:].mean() < row["loss curve"][:10].mean()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"saved {png}" in printed


def test_train_digits_auto_loss_scale_for_float16() -> None:
    (row,), _ = run_main(
        "train_digits", ["--precision", "16-mixed", "--quiet", "--steps", "5", "--hidden", "16"]
    )
    assert row["loss scale"] == "Dynamic"
    assert row["final scale"] == 2.0**15


def test_train_digits_accumulates_and_clips() -> None:
    base = ["--quiet", "--steps", "20", "--hidden", "16", "--batch-size", "32"]
    (plain,), plain_printed = run_main("train_digits", [*base, "--precision", "32-true"])
    (row,), printed = run_main(
        "train_digits", [*base, "--precision", "32-true", "--accumulate", "4", "--clip", "0.05"]
    )
    assert (row["accumulate"], row["clip"]) == (4, 0.05)
    assert 0 < row["clipped"] <= 20  # most gradient norms are above 0.05
    assert "| clipped |" in printed
    assert "Each step: 4 micro-batches of 8 examples" in printed
    assert "clipped to global norm 0.05" in printed
    (accumulated,), _ = run_main(
        "train_digits", [*base, "--precision", "32-true", "--accumulate", "4"]
    )
    # A mean loss: four micro-batches give the batch's gradients (up to float32 rounding).
    torch.testing.assert_close(accumulated["loss curve"], plain["loss curve"], rtol=1e-4, atol=1e-5)
    assert plain["clipped"] == 0 and "no clipping (--clip)" in plain_printed
    (fp16,), printed = run_main(
        "train_digits", [*base, "--precision", "16-mixed", "--accumulate", "2", "--clip", "1"]
    )
    assert fp16["loss scale"] == "Dynamic" and torch.isfinite(fp16["loss curve"]).all()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--accumulate", "5"], "--batch-size 64 is not divisible by --accumulate 5"),
        (["--accumulate", "0"], "--accumulate must be >= 1, got 0"),
        (["--clip", "-1"], "--clip must be a finite number > 0, got -1.0"),
    ],
)
def test_bad_step_options_are_refused_before_training(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("train_digits", "char_lm"):
        with pytest.raises(SystemExit) as info:
            run_main(name, [*argv, "--quiet", "--steps", "1"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        expected = message.replace("64", "16") if name == "char_lm" else message
        assert expected in err, err


def test_char_lm_accumulates_and_clips() -> None:
    argv = ["--precision", "16-mixed", "--accumulate", "2", "--clip", "0.5", "--quiet"]
    argv += ["--steps", "4", "--d-model", "32", "--layers", "1", "--heads", "2"]
    argv += ["--context", "32", "--batch-size", "8", "--text-bytes", "40000"]
    (row,), printed = run_main("char_lm", argv)
    assert row["clipped"] == 4  # an untrained model's gradient norm is well above 0.5
    assert math.isfinite(row["final loss"]) and row["skipped"] <= 1
    assert "Each step: 2 micro-batches of 4 examples" in printed and "| clipped |" in printed


@pytest.mark.slow
def test_char_lm_loss_decreases_and_reports_speed() -> None:
    argv = ["--compare", "--policies", "32-true", "bf16-mixed", "--quiet", "--steps", "12"]
    argv += ["--d-model", "32", "--layers", "1", "--heads", "2", "--context", "32"]
    argv += ["--batch-size", "8", "--text-bytes", "40000", "--lr", "1e-2"]
    rows, printed = run_main("char_lm", argv)
    assert [r["precision"] for r in rows] == ["32-true", "bf16-mixed"]
    assert "40,000 bytes of standard-library source" in printed
    for row in rows:
        assert row["tokens/s"] > 0
        assert row["final loss"] < row["first loss"] - 0.5, row
        assert math.isfinite(row["val loss"]) and row["val loss"] < row["first loss"]
    # Same data, same start: bf16 compute ends near the float32 loss.
    assert abs(rows[0]["final loss"] - rows[1]["final loss"]) < 0.2


def test_char_lm_text_is_deterministic() -> None:
    char_lm = load("char_lm")
    a, b = char_lm.stdlib_text(5000), char_lm.stdlib_text(5000)
    assert a.dtype == torch.int64 and a.shape == (5000,)
    assert torch.equal(a, b)
    assert b"import" in bytes(a.to(torch.uint8).tolist())


def test_clip_and_noise_bounds_each_sample() -> None:
    per_sample = load("per_sample_grads")
    grads = {"w": torch.randn(6, 3, 4) * 5, "b": torch.randn(6, 4)}
    grads["w"][0] *= 0  # a zero gradient stays zero (no division by its norm)
    grads["b"][0] *= 0
    gen = torch.Generator().manual_seed(0)
    mean, raw, clipped = per_sample.clip_and_noise(grads, clip=1.0, noise=0.0, generator=gen)
    flat = torch.cat([grads["w"].flatten(1), grads["b"]], dim=1)
    torch.testing.assert_close(raw, flat.norm(dim=1))
    assert (clipped <= 1.0 + 1e-5).all() and raw.max() > 1.0
    factors = (1.0 / (raw + 1e-6)).clamp(max=1.0)
    torch.testing.assert_close(mean["w"], (grads["w"] * factors.view(-1, 1, 1)).mean(0))
    # With noise, the mean moves by noise * clip / batch per coordinate (in distribution).
    noisy, _, _ = per_sample.clip_and_noise(grads, clip=1.0, noise=1.0, generator=gen)
    assert not torch.equal(noisy["w"], mean["w"])
    assert grads["w"].shape == (6, 3, 4)  # inputs untouched


def test_per_sample_grads_policy_holds_inside_vmap() -> None:
    rows, printed = run_main(
        "per_sample_grads", ["--quiet", "--steps", "40", "--batch-size", "64", "--clip", "0.5"]
    )
    bf16, f32 = rows
    assert bf16["policy"] == str(pp.get_policy("bf16-mixed"))
    assert bf16["dtype in vmap"] == "bfloat16" and f32["dtype in vmap"] == "float32"
    assert bf16["grad dtype"] == "float32"  # gradients in the param dtype
    for row in rows:
        assert row["max norm"] > 0.5  # clipping was active ...
        assert row["max clipped norm"] <= 0.5 * (1 + 1e-4)  # ... and bounded every example
        assert row["test acc %"] > 50
    assert abs(bf16["test acc %"] - f32["test acc %"]) <= 5
    assert "clip 0.5" in printed


def test_ensemble_members_keep_independent_loss_scales() -> None:
    argv = ["--quiet", "--members", "3", "--log2-scales", "10", "26", "15", "--steps", "60"]
    report, printed = run_main("ensemble", [*argv, "--hidden", "32", "--scale-period", "25"])
    low, high, mid = report["members"]
    assert report["dtype in vmap"]["polprec"] == "float16"
    assert "first layer computes in float16 with pp.apply_with_policy" in printed
    # The 2**26 member overflowed float16 and backed off; the 2**10 one grew.
    assert high["skipped"] > 0 and high["final scale"] < 2.0**26
    assert low["skipped"] == 0 and low["final scale"] == 2.0**12  # 60 steps, period 25
    assert mid["final scale"] >= 2.0**15 or mid["skipped"] > 0
    assert len({m["final scale"] for m in report["members"]}) >= 2
    for member in report["members"]:
        assert member["test acc %"] > 60, member
        assert math.isfinite(member["final loss"])
    assert report["ensemble acc %"] > 60


_FSDP_SMALL = ["--steps", "8", "--d-model", "32", "--context", "32", "--text-bytes", "50000"]


def _bytes_line(printed: str) -> tuple[list[int], int]:
    """Each rank's bytes and one process's, from fsdp_train.py's memory line."""
    (line,) = [x for x in printed.splitlines() if x.startswith("bytes of params + grads")]
    ranks = [int(n.replace(",", "")) for n in re.findall(r"rank \d+ ([\d,]+)", line)]
    (one,) = re.findall(r"one process ([\d,]+)", line)
    return ranks, int(one.replace(",", ""))


@pytest.mark.slow
def test_fsdp_train_on_two_ranks_holds_half_the_bytes_and_agrees_with_one_process() -> None:
    job = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in (*job, "POLPREC_PRECISION")}
    env["PYTHONPATH"] = str(EXAMPLES.parent)
    launch = ["-m", "polprec", "run", "--devices", "2", "--main-port", str(free_port())]
    script = [str(EXAMPLES / "fsdp_train.py"), "--precision", "bf16-mixed", "--log-every", "7"]
    result = subprocess.run(
        [sys.executable, *launch, *script, *_FSDP_SMALL],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout
    assert "each a DTensor placed Shard(0) over 2 rank(s)" in printed
    losses = [float(x) for x in re.findall(r"^step +\d+  loss (\S+)$", printed, re.MULTILINE)]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.5  # steps 0 and 7: it trains
    ranks, one = _bytes_line(printed)
    assert len(ranks) == 2
    for held in ranks:  # half of the sharded bytes, plus a few replicated step counters
        assert 0.5 <= held / one <= 0.505, (held, one)
    assert sum(ranks) >= one
    assert "(largest rank / one process = 0.50" in printed
    assert "agreement: not bitwise, within bfloat16 rounding" in printed
    (largest,) = re.findall(r"against one process .*: max \|difference\| (\S+),", printed)
    assert 0 < float(largest) < 0.1


def test_fsdp_train_on_one_process_is_a_one_rank_mesh_equal_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("WORLD_SIZE", "POLPREC_PRECISION"):  # no torchrun job, the default precision
        monkeypatch.delenv(name, raising=False)
    report, printed = run_main("fsdp_train", [*_FSDP_SMALL, "--steps", "4"])
    assert report["world"] == 1 and report["bitwise"] and report["max abs diff"] == 0.0
    ranks, one = _bytes_line(printed)
    assert ranks == report["per rank bytes"] == [one]
    assert "agreement: bitwise equal" in printed
    assert "policy params=float32,compute=bfloat16,output=float32" in printed  # the default
    assert not torch.distributed.is_initialized()  # the example tears its group down

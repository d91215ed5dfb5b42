"""Smoke tests of the examples' ``--optimizers`` comparisons, at small sizes."""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str, argv: list[str]) -> tuple[Any, str]:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = importlib.import_module(name).main(argv)
    return rows, out.getvalue()


def test_train_digits_optimizers_shows_nearest_rounding_stall() -> None:
    argv = ["--optimizers", "--quiet", "--stall-steps", "300", "--stall-lr", "1e-4"]
    rows, printed = _run("train_digits", [*argv, "--hidden", "32"])
    names = [(r["precision"], r["optimizer"]) for r in rows]
    assert names == [
        ("32-true", "default"),
        ("bf16-true", "nearest"),
        ("bf16-true", "master weights"),
        ("bf16-true", "stochastic"),
        ("bf16-true", "Kahan"),
        ("bf16-true", "Kahan, bf16 moments"),
    ]
    by = {r["optimizer"]: r for r in rows}
    f32 = by["default"]
    assert [r["bytes/param"] for r in rows] == [16, 12, 16, 12, 14, 10]
    assert all(r["param dtype"] == "bfloat16" for r in rows[1:])
    assert by["nearest"]["test acc %"] < f32["test acc %"] - 10  # it stalls
    for name in ("master weights", "stochastic", "Kahan", "Kahan, bf16 moments"):
        assert abs(by[name]["test acc %"] - f32["test acc %"]) <= 2.5, by[name]
    assert "* bf16-true, nearest is " in printed and "round away" in printed
    assert "* bf16-true, master weights matches 32-true" in printed
    assert "bytes/param  parameters + gradients + optimizer state" in printed


def test_char_lm_optimizers_reports_validation_loss_per_option() -> None:
    argv = ["--optimizers", "--quiet", "--steps", "6", "--d-model", "16", "--context", "16"]
    argv += ["--layers", "1", "--heads", "2", "--text-bytes", "20000", "--batch-size", "4"]
    rows, printed = _run("char_lm", argv)
    assert [r["optimizer"] for r in rows] == [
        "default",
        "nearest",
        "master weights",
        "stochastic",
        "Kahan",
    ]
    assert rows[0]["precision"] == "32-true" and {r["precision"] for r in rows[1:]} == {"bf16-true"}
    assert "when its validation loss is within 1%" in printed
    for row in rows[2:]:  # the options that keep small updates track float32 closely
        assert abs(row["val loss"] / rows[0]["val loss"] - 1) < 0.01, row

"""The ``polprec`` command line, driven as a user drives it: in a subprocess.

Subcommand help and the text ``info`` report run in-process (the same ``main``) to spare a
torch import each; the subprocess tests cover the entry points.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import polprec as pp
from polprec._catalogue import SPEC_NAMES
from polprec.cli import main
from polprec.policy import CLI_ENV_VAR, ENV_VAR, parse_spec

ROOT = Path(__file__).resolve().parents[1]

# A script that reports what it sees, then raises, exits or conflicts as its arguments ask.
SCRIPT = """\
import json, os, sys
import polprec
print(json.dumps({
    "name": __name__,
    "argv": sys.argv,
    "env": os.environ.get("POLPREC_PRECISION"),
    "cli": os.environ.get("POLPREC_PRECISION_FROM_CLI"),
    "policy": str(polprec.get_policy()),
}))
if sys.argv[1:2] == ["conflict"]:
    polprec.get_policy("32-true")
if sys.argv[1:2] == ["exit"]:
    sys.exit(int(sys.argv[2]))
"""


def polprec(
    *args: str, cwd: Path | None = None, command: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m polprec *args`` (or the ``command`` script) in a clean environment."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, CLI_ENV_VAR)}
    env["PYTHONPATH"] = str(ROOT)
    argv = [command] if command else [sys.executable, "-m", "polprec"]
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120, check=False
    )


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


def _seen(stdout: str) -> dict[str, object]:
    return json.loads(stdout.splitlines()[0])


def test_help() -> None:
    result = polprec("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: polprec [-h] [--version] COMMAND ...")
    for command in ("run", "policies", "info"):
        assert f"\n    {command} " in result.stdout


@pytest.mark.parametrize(
    ("command", "expected"),
    [("run", "--precision P"), ("policies", "--json"), ("info", "--json")],
)
def test_help_of_each_command(
    command: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process: the same parser `python -m polprec` builds, without another torch import.
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: polprec {command} [-h]")
    assert expected in out


def test_version_of_the_installed_console_script() -> None:
    command = shutil.which("polprec", path=os.path.dirname(sys.executable))
    result = polprec("--version", command=command)  # `python -m polprec` when not installed
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"polprec {pp.__version__} (torch {torch.__version__})"


def test_run_sets_the_precision_and_passes_every_later_argument(script: Path) -> None:
    script_args = ["--", "--precision", "16", "--lr", "0.1", "-h", "--", "x"]
    result = polprec(
        "run", "--precision", "bf16-mixed", "train.py", *script_args, cwd=script.parent
    )
    assert result.returncode == 0, result.stderr
    assert _seen(result.stdout) == {
        "name": "__main__",
        "argv": ["train.py", *script_args],
        "env": "bf16-mixed",
        "cli": "1",
        "policy": str(pp.get_policy("bf16-mixed")),
    }


def test_run_without_precision_sets_nothing_and_passes_the_exit_code(script: Path) -> None:
    result = polprec("run", str(script), "exit", "3", "--precision=16")
    assert result.returncode == 3
    seen = _seen(result.stdout)
    assert (seen["env"], seen["cli"]) == (None, None)
    assert seen["policy"] == str(pp.get_policy("32-true"))
    assert seen["argv"] == [str(script), "exit", "3", "--precision=16"]
    assert "write `polprec run --precision P SCRIPT ...`" in result.stderr


def test_run_conflicting_precision_in_code_raises_naming_both(script: Path) -> None:
    result = polprec("run", "--precision=bf16-mixed", str(script), "conflict")
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert f'File "{script}", line' in result.stderr  # the script's frames, not runpy's
    assert "runpy" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: precision '32-true'")
    assert "--precision='bf16-mixed'" in last


def test_run_rejects_a_bad_precision_before_starting(script: Path) -> None:
    result = polprec("run", "--precision", "bf17-mixed", str(script))
    assert result.returncode == 2
    assert result.stdout == ""  # the script never ran
    assert "unknown precision 'bf17-mixed' (did you mean 'bf16-mixed'?); accepted:" in result.stderr
    for spec in ("'16-mixed'", "'bf16-true'", "'mixed_bfloat16'", "float16", "compute|c"):
        assert spec in result.stderr


def test_policies_table_lists_every_fabric_value_with_its_dtypes() -> None:
    result = polprec("policies")
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines()[1:]:
        cells = line.split()
        if len(cells) >= 5 and cells[1] == "fabric":
            rows[cells[0]] = cells[2:5]
    fabric = [k for k, s in SPEC_NAMES.items() if s.source == "fabric"]
    assert sorted(rows) == sorted(fabric)
    for spec, cells in rows.items():
        policy = parse_spec(spec)  # the pure parser: "bf16" would warn in get_policy
        assert cells == [str(d).removeprefix("torch.") for d in SPEC_NAMES[spec].dtypes]
        assert cells == [
            str(d).removeprefix("torch.")
            for d in (policy.param_dtype, policy.compute_dtype, policy.output_dtype)
        ]


def test_policies_json_round_trips_through_get_policy() -> None:
    result = polprec("policies", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    specs = [row["spec"] for row in rows]
    assert {64, 32, 16, "bf16-mixed", "mixed_float16", "half", "c=f16", "o=f16"} <= set(specs)
    assert len(specs) == len(set(specs))
    for row in rows:
        policy = parse_spec(row["spec"])
        dtypes = [row["param_dtype"], row["compute_dtype"], row["output_dtype"]]
        assert (
            pp.get_policy(",".join(f"{k}={v}" for k, v in zip("pco", dtypes, strict=True)))
            == policy
        )
        assert row["loss_scale"] == type(pp.default_loss_scale(policy)).__name__


def test_info_json_reports_devices_and_positive_throughputs() -> None:
    result = polprec("info", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["torch"] == torch.__version__
    assert report["polprec"] == pp.__version__
    assert report["python"] == ".".join(map(str, sys.version_info[:3]))
    cpu = report["devices"][0]
    assert cpu["device"] == "cpu"
    assert cpu["half_dtype"] == "bfloat16"
    assert cpu["autocast"] == {"bfloat16": True, "float16": True}  # CPU autocast has both
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    matmul = cpu["matmul"]
    assert matmul["n"] >= 256
    assert set(matmul["gflops"]) == {"float32", "bfloat16", "float16"}
    assert all(value > 0 for value in matmul["gflops"].values())
    for name in ("bfloat16", "float16"):
        ratio = matmul["gflops"][name] / matmul["gflops"]["float32"]
        assert matmul["ratio_to_float32"][name] == pytest.approx(ratio)
    assert "a bf16 policy" in cpu["verdict"]


def test_info_prints_a_readable_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0  # in-process; the subprocess test above checks the entry point
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"polprec {pp.__version__}, torch {torch.__version__}")
    device_row, speed_row = (line.split() for line in lines if re.match(r"cpu {2,}\S", line))
    assert device_row[-3:] == ["bfloat16", "yes", "yes"]  # half_dtype, autocast bf16, fp16
    n, fp32, bf16, fp16, bf16_ratio, fp16_ratio = speed_row[1:]
    assert int(n) >= 256
    assert min(float(fp32), float(bf16), float(fp16)) > 0
    assert bf16_ratio.endswith("x") and fp16_ratio.endswith("x")
    verdicts = [line for line in lines if line.startswith("cpu (")]
    assert len(verdicts) == 1
    assert verdicts[0].endswith(
        ("a bf16 policy should pay on this machine", "a bf16 policy will not pay on this machine")
    )

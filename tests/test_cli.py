"""The ``polprec`` command line, driven as a user drives it: in a subprocess.

Help, argument errors and the text ``info`` report run in-process (the same ``main``) to spare a
torch import each; the subprocess tests cover the entry points, every way of placing polprec's
options around SCRIPT, and real launches of several processes through ``torch.distributed.run``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import polprec as pp
from polprec._catalogue import AMBIGUOUS, SPEC_NAMES
from polprec.cli import _launch, main
from polprec.policy import CLI_ENV_VAR, ENV_VAR, parse_spec

ROOT = Path(__file__).resolve().parents[1]

# A script that reports what it sees, then raises, or exits (`exit N`, or `exit N RANK` on one
# rank only), as its arguments ask.
SCRIPT = """\
import json, os, sys
import polprec
print(json.dumps({
    "name": __name__,
    "argv": sys.argv,
    "env": os.environ.get("POLPREC_PRECISION"),
    "cli": os.environ.get("POLPREC_PRECISION_FROM_CLI"),
    "policy": str(polprec.get_policy()),
    "rank": os.environ.get("RANK"),
    "local_rank": os.environ.get("LOCAL_RANK"),
    "world_size": os.environ.get("WORLD_SIZE"),
    "omp_threads": os.environ.get("OMP_NUM_THREADS"),
}), flush=True)
if sys.argv[1:2] == ["conflict"]:
    polprec.get_policy("32-true")
if sys.argv[1:2] == ["exit"] and sys.argv[3:4] in ([], [os.environ.get("RANK")]):
    sys.exit(int(sys.argv[2]))
"""
BF16 = str(pp.get_policy("bf16-mixed"))


def _environment() -> dict[str, str]:
    """This environment without a precision or a torchrun job, this checkout first."""
    job = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, CLI_ENV_VAR, *job)}
    env["PYTHONPATH"] = str(ROOT)
    return env


def polprec(
    *args: str, cwd: Path | None = None, command: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m polprec *args`` (or the ``command`` script) in a clean environment."""
    argv = [command] if command else [sys.executable, "-m", "polprec"]
    return subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        env=_environment(),
        cwd=cwd,
        timeout=120,
        check=False,
    )


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


def _seen(stdout: str) -> dict[str, object]:
    return json.loads(stdout.splitlines()[0])


def _seen_by_rank(stdout: str) -> dict[str, dict[str, object]]:
    """What each process of a launch reported, by its RANK."""
    reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {str(report["rank"]): report for report in reports}


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


def test_run_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "train.py", "--help"])  # after SCRIPT too, as in fabric run
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: polprec run [-h] [OPTIONS] SCRIPT [OPTIONS | ARGS ...]")
    for option in ("--precision P", "--devices N", "--accelerator {auto,cpu,cuda,gpu,mps}"):
        assert f"\n  {option}" in out
    for option in ("--strategy {ddp,fsdp}", "--num-nodes N, --num_nodes N", "--node-rank R"):
        assert f"\n  {option}" in out
    for option in ("--main-address ADDRESS, --main_address", "--main-port PORT, --main_port"):
        assert f"\n  {option}" in out
    assert "\n  SCRIPT " in out and "\n  ARGS " in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--precision", "bf16-mixed", "train.py", "--lr", "0.1", "-x", "--name=a", "b"],
        ["train.py", "--precision=bf16-mixed", "--lr", "0.1", "-x", "--name=a", "b"],
        ["train.py", "--lr", "0.1", "-x", "--precision", "bf16-mixed", "--name=a", "b"],
    ],
    ids=["before", "after", "among"],
)
def test_run_reads_its_options_on_either_side_of_the_script(script: Path, argv: list[str]) -> None:
    result = polprec("run", *argv, cwd=script.parent)
    assert result.returncode == 0, result.stderr
    assert _seen(result.stdout) == {
        "name": "__main__",
        "argv": ["train.py", "--lr", "0.1", "-x", "--name=a", "b"],  # the rest, in order
        "env": "bf16-mixed",
        "cli": "1",
        "policy": BF16,
        "rank": None,  # one device: in this process, no torchrun
        "local_rank": None,
        "world_size": None,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    assert result.stderr == ""


@pytest.mark.parametrize(
    "before", [["train.py", "--"], ["--", "train.py"]], ids=["after", "before"]
)
def test_run_gives_everything_after_a_double_dash_to_the_script(
    script: Path, before: list[str]
) -> None:
    script_args = ["--precision", "16", "--devices", "4", "-h", "--", "x"]
    result = polprec("run", "--precision", "bf16-mixed", *before, *script_args, cwd=script.parent)
    assert result.returncode == 0, result.stderr
    seen = _seen(result.stdout)
    assert seen["argv"] == ["train.py", *script_args]
    assert (seen["env"], seen["policy"], seen["rank"]) == ("bf16-mixed", BF16, None)


def test_run_without_precision_sets_nothing_and_passes_the_exit_code(script: Path) -> None:
    result = polprec("run", str(script), "exit", "3")
    assert result.returncode == 3
    seen = _seen(result.stdout)
    assert (seen["env"], seen["cli"]) == (None, None)
    assert seen["policy"] == str(pp.get_policy("32-true"))
    assert seen["argv"] == [str(script), "exit", "3"]


def test_run_conflicting_precision_in_code_raises_naming_both(script: Path) -> None:
    result = polprec("run", str(script), "conflict", "--precision=bf16-mixed")
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert f'File "{script}", line' in result.stderr  # the script's frames, not runpy's
    assert "runpy" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: precision '32-true'")
    assert "--precision='bf16-mixed'" in last


@pytest.mark.parametrize(
    "argv",
    [["--precision", "bf17", "SCRIPT"], ["SCRIPT", "--precision", "bf17"]],
    ids=["before", "after"],
)
def test_run_rejects_a_bad_precision_on_either_side_before_starting(
    script: Path, argv: list[str]
) -> None:
    result = polprec("run", *(str(script) if a == "SCRIPT" else a for a in argv))
    assert result.returncode == 2
    assert result.stdout == ""  # the script never ran
    assert result.stderr.startswith("usage: polprec run ")
    assert (
        "polprec run: error: argument --precision: unknown precision 'bf17' "
        "(did you mean 'bf16'?); accepted:"
    ) in result.stderr
    for spec in ("'16-mixed'", "'bf16-true'", "'mixed_bfloat16'", "float16", "compute|c"):
        assert spec in result.stderr


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What ``polprec run`` prints for ``argv``, which must be a usage error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: polprec run [-h] [OPTIONS] SCRIPT"), err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--devices", "0"], "argument --devices: invalid value '0': give a number of processes"),
        (["--devices", "x"], "argument --devices: invalid value 'x': give a number of processes"),
        (["--accelerator", "cpu", "--devices", "-1"], "(-1, every GPU, needs --accelerator cuda"),
        (["--accelerator", "cuda", "--devices", "1000"], "invalid value '1000': "),
        (["--accelerator", "cuda", "--devices", "0,1"], "set CUDA_VISIBLE_DEVICES=1,3 and pass"),
        (["--accelerator", "tpu"], "argument --accelerator: invalid choice: 'tpu' (choose from"),
        (["--strategy", "deepspeed"], "invalid choice: 'deepspeed' (choose from 'ddp', 'fsdp')"),
        (["--num-nodes", "0"], "argument --num-nodes/--num_nodes: invalid value '0': give a"),
        (["--num-nodes", "2", "--node-rank", "2"], "argument --node-rank: invalid value 2: give 0"),
        (["--main-port", "70000"], "argument --main-port/--main_port: invalid value '70000': a"),
        (
            ["--precision", "bf17"],
            "argument --precision: unknown precision 'bf17' (did you mean 'bf16'?); accepted: ",
        ),
    ],
)
@pytest.mark.parametrize("side", ["before", "after"])
def test_run_rejects_bad_options_on_either_side_naming_the_value_and_the_accepted_ones(
    argv: list[str], message: str, side: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The options are checked before the script is looked for: a script that does not exist
    # makes a missed check fail with "cannot open script" rather than run anything here.
    where = [*argv, "missing.py"] if side == "before" else ["missing.py", *argv]
    assert message in _usage_error(where, capsys)


def test_run_option_without_its_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert "argument --devices: expected one argument" in _usage_error(
        ["x.py", "--devices"], capsys
    )


@pytest.mark.parametrize("option", ["--lr", "--prec", "--version", "-x"])
def test_run_rejects_an_unknown_option_before_the_script(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _usage_error([option, "bf16", "missing.py"], capsys)  # `--prec`: no abbreviations
    assert f"unrecognized option {option!r} before SCRIPT; polprec run's options are " in err
    assert "--precision, --devices, --accelerator, --strategy, --num-nodes, --node-rank" in err


@pytest.mark.parametrize("argv", [[], ["--precision", "bf16-mixed"], ["--", "--", "x"]])
def test_run_without_a_script_says_so(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(argv, capsys)
    if argv[:1] == ["--"]:  # after `--` even "--" is a script name, of no file here
        assert "cannot open script '--': no such file or directory" in err
    else:
        assert "the following arguments are required: SCRIPT" in err


def test_device_counts_follow_fabric(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    count = _launch.process_count
    for accelerator in _launch.ACCELERATORS:
        assert count("auto", accelerator) == 1  # fabric run's 'auto' is one process
    assert [count("3", a) for a in ("auto", "cpu", "cuda", "gpu")] == [3, 3, 3, 3]
    assert count("8", "auto") == count("8", "cpu") == 8  # processes: the script picks devices
    assert count("-1", "cuda") == count("-1", "gpu") == count(" -1 ", "auto") == 4
    with pytest.raises(ValueError, match="asks for 5 CUDA GPU\\(s\\) and this machine has 4"):
        count("5", "cuda")
    with pytest.raises(ValueError, match="--accelerator mps needs a MPS device and this machine"):
        count("1", "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert count("1", "mps") == count("-1", "gpu") == count("1", "gpu") == 1  # a Mac's GPU
    with pytest.raises(ValueError, match="asks for 2 MPS device\\(s\\) and this machine has 1"):
        count("2", "mps")
    with pytest.raises(ValueError, match="--accelerator cuda needs a CUDA GPU and this machine"):
        count("1", "cuda")


def test_run_reads_the_examples_own_precision_option_as_polprecs() -> None:
    # examples/train_digits.py takes --precision itself and falls back to POLPREC_PRECISION:
    # after SCRIPT polprec reads it (what a fabric run user expects); after `--` the script does.
    fast = ["--quiet", "--steps", "3", "--hidden", "8"]
    by_polprec = polprec("run", "examples/train_digits.py", "--precision", "bf16-true", *fast)
    by_script = polprec("run", "examples/train_digits.py", *fast, "--", "--precision", "16-mixed")
    for result, spec in ((by_polprec, "bf16-true"), (by_script, "16-mixed")):
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"policy: {pp.get_policy(spec)}\n")
        assert re.search(rf"^\|\s*{spec} \|", result.stdout, re.MULTILINE), result.stdout


@pytest.mark.slow
def test_run_devices_2_launches_two_processes_and_returns_the_failing_status(
    script: Path,
) -> None:
    port = _free_port()
    result = polprec(
        "run", "--devices", "2", "--main-port", port, "train.py", "--precision", "bf16-mixed",
        "exit", "3", "1", cwd=script.parent,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr  # rank 1's status; rank 0 exits with 0
    assert "polprec run: rank 1 of 2 exited with status 3" in result.stderr
    seen = _seen_by_rank(result.stdout)
    assert sorted(seen) == ["0", "1"]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // 2))
    for rank, report in seen.items():
        assert report["argv"] == ["train.py", "exit", "3", "1"]
        assert (report["local_rank"], report["world_size"]) == (rank, "2")
        assert (report["env"], report["cli"], report["policy"]) == ("bf16-mixed", "1", BF16)
        assert report["omp_threads"] == threads


@pytest.mark.slow
def test_run_devices_2_trains_the_ddp_example_on_gloo() -> None:
    result = polprec(
        "run", "--devices", "2", "examples/ddp_train.py", "--precision", "bf16-mixed",
        "--epochs", "3", "--main-port", _free_port(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"policy {BF16}, 2 rank(s), 30 steps of 128 in" in lines[-4]
    assert lines[-3] == "skipped steps 0, final loss scale 1"
    assert lines[-2] == "params identical on all ranks: True"
    assert float(lines[-1].removeprefix("test accuracy ")) > 0.8


@pytest.mark.slow
def test_run_num_nodes_2_joins_two_launchers_into_one_job(script: Path) -> None:
    port = _free_port()
    nodes = [
        ["--num-nodes", "2", "--node-rank", "0", "--main-port", port, "train.py"],
        ["train.py", "--num_nodes=2", "--node_rank=1", f"--main_port={port}"],  # Fabric's spelling
    ]
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "polprec", "run", *node, "--precision", "16-mixed", "n"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_environment(),
            cwd=script.parent,
        )
        for node in nodes
    ]
    outputs = [launcher.communicate(timeout=120) for launcher in launchers]
    for launcher, (_, err) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, err
    for node_rank, (out, _) in enumerate(outputs):
        (report,) = _seen_by_rank(out).values()
        assert (report["rank"], report["local_rank"], report["world_size"]) == (
            str(node_rank),
            "0",
            "2",
        )
        assert (report["env"], report["argv"]) == ("16-mixed", ["train.py", "n"])


def test_policies_table_lists_every_fabric_value_once_with_its_dtypes() -> None:
    result = polprec("policies")
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines()[1:]:
        cells = line.split()
        if len(cells) >= 5 and cells[1] == "fabric":
            rows[cells[0].rstrip("*")] = cells[2:5]
    fabric = [s.name for s in SPEC_NAMES.values() if s.source == "fabric"]
    assert sorted(rows) == sorted(set(fabric))  # canonical names only: no row twice
    for spec, cells in rows.items():
        policy = parse_spec(spec)  # the pure parser: "bf16" would warn in get_policy
        assert cells == [str(d).removeprefix("torch.") for d in SPEC_NAMES[spec].dtypes]
        assert cells == [
            str(d).removeprefix("torch.")
            for d in (policy.param_dtype, policy.compute_dtype, policy.output_dtype)
        ]
    lines = {ln.split()[0].rstrip("*"): ln for ln in result.stdout.splitlines()[1:] if ln.strip()}
    assert lines["64-true"].endswith("64 (int), 64")  # the int and the string, told apart
    assert lines["bf16-mixed"].endswith("bf16*")  # marked: jmp reads it otherwise
    assert lines["float16"].rstrip().endswith("f16*, fp16*, half*")
    assert "Fabric and jmp read this name differently" in result.stdout


def test_policies_json_round_trips_through_get_policy() -> None:
    result = polprec("policies", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    specs = [row["spec"] for row in rows]
    every = specs + [a for row in rows for a in row["aliases"]]
    assert {64, 32, 16, "bf16-mixed", "mixed_float16", "half", "c=f16", "o=f16"} <= set(every)
    assert len(every) == len(set(every))  # each spelling once
    for row in rows:
        policy = parse_spec(row["spec"])
        assert all(parse_spec(a) == policy for a in row["aliases"])
        dtypes = [row["param_dtype"], row["compute_dtype"], row["output_dtype"]]
        assert (
            pp.get_policy(",".join(f"{k}={v}" for k, v in zip("pco", dtypes, strict=True)))
            == policy
        )
        assert row["loss_scale"] == type(pp.default_loss_scale(policy)).__name__
        assert all(isinstance(w, str) and w in AMBIGUOUS for w in row["warns"])
    assert {w for row in rows for w in row["warns"]} == set(AMBIGUOUS)


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
    assert matmul["rounds"] == 5
    assert matmul["sizes"][0] == 256 and set(matmul["sizes"]) <= {256, 512, 1024}
    assert set(matmul["gflops"]) == {"float32", "bfloat16", "float16"}
    # every dtype is timed at the first size; a busy machine may stop one before the larger
    assert "256" in matmul["gflops"]["float32"]
    assert set(matmul["gflops"]["float32"]) <= {str(n) for n in matmul["sizes"]}
    assert all(v > 0 for by_size in matmul["gflops"].values() for v in by_size.values())
    for name in ("bfloat16", "float16"):
        ratio = matmul["ratio_to_float32"][name]
        assert set(ratio["by_size"]) == set(matmul["gflops"][name])  # sizes timed in both
        assert ratio["timings"] == 5 * len(ratio["by_size"])  # one per size and round
        assert 0 < ratio["low"] <= ratio["median"] <= ratio["high"]
    assert "a bf16 policy" in cpu["verdict"]
    flags = cpu["half_flags"]
    assert flags is None or set(flags) <= {"amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16"}


def test_info_names_the_cpus_16_bit_units(tmp_path: pathlib.Path) -> None:
    from polprec.cli import _info

    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert _info._cpu_half_flags(str(amx)) == ["amx_bf16", "avx512_bf16"]
    assert _info._cpu_half_flags(str(avx2)) == []
    assert _info._cpu_half_flags(str(tmp_path / "absent")) is None
    line = _info.cpu_line()
    assert line.startswith(f"CPU {_info._cpu_name()} ({torch.backends.cpu.get_cpu_capability()}, ")
    assert "AMX" in line


def test_info_prints_a_readable_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0  # in-process; the subprocess test above checks the entry point
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"polprec {pp.__version__}, torch {torch.__version__}")
    assert lines[1].startswith("CPU ") and "AMX" in lines[1]
    device_row, *speed_rows = (line.split() for line in lines if re.match(r"cpu {2,}\S", line))
    assert device_row[-3:] == ["bfloat16", "yes", "yes"]  # half_dtype, autocast bf16, fp16
    assert speed_rows[0][1] == "256"  # one row per size, from 256 up
    fp32, bf16, fp16, bf16_ratio, fp16_ratio = speed_rows[0][2:]
    assert min(float(fp32), float(bf16), float(fp16)) > 0
    assert bf16_ratio.endswith("x") and fp16_ratio.endswith("x")
    verdicts = [line for line in lines if line.startswith("cpu (")]
    assert len(verdicts) == 1
    assert re.search(r"bf16/fp32 \d+\.\d\dx \(\d+\.\d\dx-\d+\.\d\dx\)", verdicts[0])
    assert re.search(
        r"a bf16 policy (should|will not) pay on this machine|whether a bf16 policy pays on "
        r"this machine is unclear",
        verdicts[0],
    )


def _ratios(bf16: tuple[float, float], fp16: tuple[float, float]) -> dict[str, dict[str, float]]:
    def spread(low: float, high: float) -> dict[str, float]:
        return {"median": (low + high) / 2, "low": low, "high": high}

    return {"bfloat16": spread(*bf16), "float16": spread(*fp16)}


@pytest.mark.parametrize(
    ("bf16", "fp16", "ending"),
    [
        ((1.5, 2.9), (0.02, 0.03), "a bf16 policy should pay on this machine"),
        ((0.01, 0.03), (0.02, 0.03), "a bf16 policy will not pay on this machine"),
        ((1.02, 1.15), (0.02, 0.03), "a bf16 policy will not pay on this machine"),  # < 1.2x
        (
            (0.8, 1.1),
            (0.02, 0.03),
            "unclear: the timings straddle 1x (rerun on an idle machine, or time your own model)",
        ),
        (
            (1.1, 2.9),
            (0.02, 0.03),
            "unclear: the timings straddle 1.2x (rerun on an idle machine, or time your own model)",
        ),
        (
            (0.9, 0.95),
            (1.5, 1.9),
            "will not pay on this machine; a float16 one (with loss scaling) should",
        ),
        ((0.9, 0.95), (0.9, 1.9), "; whether a float16 one (with loss scaling) would is unclear"),
    ],
)
def test_info_gives_a_verdict_only_where_the_timings_agree(
    bf16: tuple[float, float], fp16: tuple[float, float], ending: str
) -> None:
    from polprec.cli import _info

    line = _info._verdict("cpu (X)", _ratios(bf16, fp16))
    assert line.startswith(
        f"cpu (X): bf16/fp32 {sum(bf16) / 2:.2f}x ({bf16[0]:.2f}x-{bf16[1]:.2f}x)"
    )
    assert line.endswith(ending)


def test_info_spread_is_the_median_and_middle_half() -> None:
    from polprec.cli import _info

    spread = _info._spread([1.0, 5.0, 2.0, 3.0, 4.0])  # one outlier does not move it far
    assert spread == {"median": 3.0, "low": 2.0, "high": 4.0, "timings": 5}

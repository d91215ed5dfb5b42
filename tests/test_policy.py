"""Policy and get_policy: the Fabric table, jmp's grammar, round trips, the environment.

Bad input to them: test_audit.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import polprec as pp
from polprec._catalogue import AMBIGUOUS, SPEC_NAMES, SPEC_PREFIXES, hint
from polprec.testing import strategies as pst

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

FABRIC_TABLE = [
    (64, (F64, F64, F32)),
    ("64", (F64, F64, F32)),
    ("64-true", (F64, F64, F32)),
    (32, (F32, F32, F32)),
    ("32", (F32, F32, F32)),
    ("32-true", (F32, F32, F32)),
    (16, (F32, F16, F32)),
    ("16", (F32, F16, F32)),
    ("16-mixed", (F32, F16, F32)),
    ("bf16", (F32, BF16, F32)),
    ("bf16-mixed", (F32, BF16, F32)),
    ("16-true", (F16, F16, F32)),
    ("bf16-true", (BF16, BF16, F32)),
    ("mixed_float16", (F32, F16, F32)),
    ("mixed_bfloat16", (F32, BF16, F32)),
]


@pytest.mark.parametrize(("spec", "dtypes"), FABRIC_TABLE, ids=lambda v: repr(v))
def test_fabric_and_keras_values(spec: object, dtypes: tuple[torch.dtype, ...]) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "precision 'bf16' is ambiguous")  # tested below
        policy = pp.get_policy(spec)  # type: ignore[arg-type]
    assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == dtypes


JMP_GRAMMAR = [
    ("c=f16", (F32, F16, F16)),
    ("p=bf16,c=f32", (BF16, F32, F32)),
    ("o=f16", (F32, F32, F16)),
    ("params=float32,compute=bfloat16,output=float32", (F32, BF16, F32)),
    ("p=f64", (F64, F64, F64)),
    ("compute=half", (F32, F16, F16)),
    ("p=float16,c=float16,o=float32", (F16, F16, F32)),
    (" P = BF16 , O = Full ", (BF16, BF16, F32)),
    ("output=double,params=single", (F32, F32, F64)),
]


@pytest.mark.parametrize(("spec", "dtypes"), JMP_GRAMMAR)
def test_jmp_grammar(spec: str, dtypes: tuple[torch.dtype, ...]) -> None:
    policy = pp.get_policy(spec)
    assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == dtypes


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("f16", F16), ("fp16", F16), ("float16", F16), ("half", F16),
        ("bfloat16", BF16),
        ("f32", F32), ("fp32", F32), ("float32", F32), ("float", F32), ("single", F32), ("full", F32),
        ("f64", F64), ("fp64", F64), ("float64", F64), ("double", F64),
    ],
)  # fmt: skip
def test_bare_dtype_name_means_all_three(name: str, dtype: torch.dtype) -> None:
    with warnings.catch_warnings():
        # 16-bit names warn that Fabric would read them otherwise (tested below)
        warnings.filterwarnings("ignore", "precision .* is ambiguous")
        assert pp.get_policy(name) == pp.Policy(dtype, dtype, dtype)
        assert pp.get_policy(f"  {name.upper()} ") == pp.Policy(dtype, dtype, dtype)


def test_bf16_is_the_fabric_value_not_the_bare_dtype() -> None:
    # Fabric's "bf16" means bf16-mixed; "bfloat16" is jmp's bare dtype (all three).
    with pytest.warns(UserWarning, match="'bf16' is Lightning Fabric's 'bf16-mixed' here"):
        assert pp.get_policy("bf16") == pp.get_policy("bf16-mixed")
    with pytest.warns(UserWarning, match="all bfloat16, not Lightning Fabric's mixed precision"):
        assert pp.get_policy("bfloat16") == pp.Policy(BF16, BF16, BF16)


@pytest.mark.parametrize("name", ["fp16", "f16", "float16", "half", "bfloat16", " BF16 "])
def test_names_fabric_and_jmp_read_differently_warn(name: str) -> None:
    with pytest.warns(UserWarning, match=f"precision {name!r} is ambiguous") as record:
        policy = pp.get_policy(name)
    message = str(record[0].message)
    if name.strip().lower() == "bf16":
        assert policy == pp.get_policy("bf16-mixed") and "'p=bf16'" in message
    else:
        assert policy.param_dtype == policy.compute_dtype == policy.output_dtype
        assert "-mixed'" in message and "-true'" in message
        key = name.strip().lower()
        assert pp.get_policy(f"p={key}") == policy  # the unambiguous spelling, silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for quiet in ("16-mixed", "bf16-mixed", "16-true", "f32", "float64", 16, "c=bf16"):
            pp.get_policy(quiet)


@pytest.mark.parametrize(
    ("spec", "suggestion"),
    [
        ("bf16_mixed", "'bf16-mixed'"),
        ("fp16-mixed", "'16-mixed'"),
        ("float16-true", "'16-true'"),
        ("BF16_True", "'bf16-true'"),
        ("32_true", "'32-true'"),
        ("bf16-mix", "'bf16-mixed'"),
        ("mixed-float16", "'mixed_float16'"),
    ],
)
def test_misspelt_specs_suggest_the_accepted_one(spec: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match=f"did you mean {suggestion}") as info:
        pp.get_policy(spec)
    assert str(info.value).startswith(f"unknown precision {spec!r} (did you mean {suggestion}?)")


@pytest.mark.parametrize("spec", ["int8", "uint8", "int4", "qint8"])
def test_integer_precisions_are_not_taken_for_float8(spec: str) -> None:
    with pytest.raises(ValueError, match="integer dtypes are not supported") as info:
        pp.get_policy(spec)
    assert "float8" not in str(info.value).split("; accepted")[0]


def test_policy_accepts_names_and_is_frozen_and_hashable() -> None:
    policy = pp.Policy("f32", "bf16", torch.float32)
    assert policy.compute_dtype is BF16
    assert {policy: 1}[pp.get_policy("bf16-mixed")] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.compute_dtype = F16  # type: ignore[misc]


def test_str_format() -> None:
    assert str(pp.get_policy("bf16-mixed")) == "params=float32,compute=bfloat16,output=float32"


@given(pst.policies())
def test_str_round_trips(policy: pp.Policy) -> None:
    assert pp.get_policy(str(policy)) == policy
    assert pp.get_policy(policy) is policy


@given(pst.policy_specs())
def test_every_generated_spec_parses_to_floating_dtypes(spec: object) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        policy = pp.get_policy(spec)  # type: ignore[arg-type]
    ambiguous = isinstance(spec, str) and spec.strip().lower() in AMBIGUOUS
    assert len(record) == (1 if ambiguous else 0)
    for d in (policy.param_dtype, policy.compute_dtype, policy.output_dtype):
        assert d in (F16, BF16, F32, F64)


@given(pst.policies(), pst.floating_dtypes(), pst.floating_dtypes(), pst.floating_dtypes())
def test_with_methods_replace_one_field(
    policy: pp.Policy, p: torch.dtype, c: torch.dtype, o: torch.dtype
) -> None:
    assert policy.with_param_dtype(p) == pp.Policy(p, policy.compute_dtype, policy.output_dtype)
    assert policy.with_compute_dtype(c) == pp.Policy(policy.param_dtype, c, policy.output_dtype)
    assert policy.with_output_dtype(o) == pp.Policy(policy.param_dtype, policy.compute_dtype, o)


def test_environment_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLPREC_PRECISION", raising=False)
    assert pp.get_policy() == pp.get_policy("32-true")
    monkeypatch.setenv("POLPREC_PRECISION", " BF16-Mixed ")
    assert pp.get_policy() == pp.get_policy("bf16-mixed")
    monkeypatch.setenv("POLPREC_PRECISION", "c=f16")
    assert pp.get_policy() == pp.Policy(F32, F16, F16)
    monkeypatch.setenv("POLPREC_PRECISION", "")
    assert pp.get_policy() == pp.get_policy("32-true")
    monkeypatch.setenv("POLPREC_PRECISION", "nonsense")
    with pytest.raises(ValueError, match="POLPREC_PRECISION='nonsense'"):
        pp.get_policy()


def test_environment_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLPREC_PRECISION", "16-mixed")
    first = pp.get_policy()
    monkeypatch.setenv("POLPREC_PRECISION", "64")
    assert (first, pp.get_policy()) == (pp.get_policy(16), pp.get_policy(64))


def test_explicit_spec_wins_over_plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only `polprec run` makes a conflict an error; a user's own environment variable does not.
    monkeypatch.setenv("POLPREC_PRECISION", "bf16-mixed")
    assert pp.get_policy("32-true") == pp.Policy(F32, F32, F32)


@given(
    st.sampled_from(["p", "params"]),
    st.sampled_from(["c", "compute"]),
    st.sampled_from(["o", "output"]),
)
def test_grammar_short_and_long_keys_agree(p: str, c: str, o: str) -> None:
    assert pp.get_policy(f"{p}=bf16,{c}=f16,{o}=f64") == pp.Policy(BF16, F16, F64)


def test_cli_precision_conflicts_with_an_explicit_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    # What `polprec run --precision bf16-mixed` sets for the script it runs (Fabric's rule).
    monkeypatch.setenv("POLPREC_PRECISION", "bf16-mixed")
    monkeypatch.setenv("POLPREC_PRECISION_FROM_CLI", "1")
    assert pp.get_policy() == pp.get_policy("bf16-mixed")  # no argument: follow the CLI
    assert pp.get_policy("p=f32,c=bf16,o=f32") == pp.get_policy("bf16-mixed")  # same policy
    with pytest.raises(ValueError, match="conflicts with") as info:
        pp.get_policy("32-true")
    message = str(info.value)
    assert "'32-true'" in message and "--precision='bf16-mixed'" in message  # names both
    assert message.endswith(
        "; remove one of them, or call get_policy() without an argument to follow the command line"
    )
    monkeypatch.setenv("POLPREC_PRECISION_FROM_CLI", "0")  # only "1" marks the CLI
    assert pp.get_policy("32-true") == pp.Policy(F32, F32, F32)


def test_parse_dtype_accepts_torch_prefixed_names() -> None:
    assert pp.parse_dtype("torch.float16") is F16
    assert pp.parse_dtype(" Torch.BFloat16 ") is BF16


@pytest.mark.parametrize("name", sorted(SPEC_PREFIXES))
@pytest.mark.parametrize("suffix", ["-mixed", "-true", "_mixed", "_true", " true"])
def test_every_dtype_name_before_a_fabric_suffix_suggests_fabric_s_number(
    name: str, suffix: str
) -> None:
    meant = SPEC_PREFIXES[name] + "-" + suffix[1:]
    advice = hint(name + suffix)
    if meant in SPEC_NAMES:
        assert advice == f"did you mean {meant!r}?"
    else:  # e.g. '32-mixed' is no spec: only a close spelling may be suggested
        assert meant not in advice


@pytest.mark.parametrize(
    ("text", "words"),
    [
        *(
            (t, "float8")
            for t in [
                "fp8",
                "f8",
                "float8_e4m3fn",
                "e4m3",
                "e5m2",
                "transformer-engine",
                "8-true",
                "8-mixed",
            ]
        ),
        *((t, "integer") for t in ["int8", "uint8", "i8", "u8", "qint8", "int4"]),
        ("quarter", ""),
        ("fp", ""),  # as close to 'fp16' as 0.67: below the cutoff, so no guess
    ],
)
def test_hints_for_unsupported_precisions(text: str, words: str) -> None:
    advice = hint(text)
    assert (words in advice) if words else advice == ""
    if words == "integer":
        assert advice == "integer dtypes are not supported: a policy's dtypes are floating point"
    if words == "float8":
        assert advice == "float8 / Transformer Engine precisions are not supported by polprec"


def test_the_ambiguity_warning_points_at_the_caller() -> None:
    with pytest.warns(UserWarning, match="is ambiguous") as record:
        pp.get_policy("half")
    # attributed to the code that named the precision, not to polprec's own line
    assert Path(record[0].filename).parts[-2:] != ("polprec", "policy.py")
    assert record[0].category is UserWarning

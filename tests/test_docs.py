"""The documentation cannot drift from the code.

* Every ```python block of every page in ``docs/`` and of the README runs: a page's blocks are
  executed in order, in one namespace, like a notebook. A block opts out only with a visible
  title, ```python title="Not run: <why>"```, and still has to compile.
* The API reference renders every name in ``polprec.__all__``.
* ``mkdocs build --strict`` succeeds (warnings are errors), as in CI.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import free_port as _free_port

import polprec
import polprec.testing
import polprec.testing.strategies

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PAGE = DOCS / "api.md"
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]

# A fenced block: an opening fence with an info string, the body, a closing fence of the
# same indentation (blocks inside admonitions are indented).
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_NOT_RUN = re.compile(r'title="Not run: (?P<why>[^"]{10,})"')


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str | None  # the reason, for a block that opts out

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The ```python blocks of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        info = match["info"].strip()
        if info.split(" ", 1)[0] not in ("python", "py"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        not_run = _NOT_RUN.search(info)
        if "title=" in info and not not_run and "Not run" in info:
            raise ValueError(f'{page}:{line}: write the opt-out as title="Not run: <why>"')
        body = textwrap.dedent(match["body"])
        blocks.append(Block(page, line, body, not_run["why"] if not_run else None))
    return blocks


ALL_BLOCKS = {page: python_blocks(page) for page in PAGES}
RUN_PAGES = [page for page, blocks in ALL_BLOCKS.items() if any(not b.not_run for b in blocks)]
NOT_RUN = [b for blocks in ALL_BLOCKS.values() for b in blocks if b.not_run]
# Pages whose code compiles a step: a few seconds of inductor each, so they count as slow.
SLOW_PAGES = {DOCS / "guides" / "compile.md"}


@pytest.fixture
def docs_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """What every page starts from, and what it may not leave behind.

    No precision from the caller's environment; a scratch working directory; the variables
    ``torchrun`` sets for a one-process job (the distributed guide calls
    ``init_process_group("gloo")`` as it would under ``torchrun``); this checkout first on
    ``PYTHONPATH`` for commands the page runs. Environment, ``sys.argv``, ``sys.path`` and
    torch's number of threads are restored afterwards, whatever the page changed.
    """
    saved = dict(os.environ), list(sys.argv), list(sys.path)
    threads = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    for name in ("POLPREC_PRECISION", "POLPREC_PRECISION_FROM_CLI"):
        os.environ.pop(name, None)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    torch.manual_seed(0)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        sys.argv[:], sys.path[:] = saved[1], saved[2]
        torch.set_num_threads(threads)


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, marks=[pytest.mark.slow] if p in SLOW_PAGES else []) for p in RUN_PAGES],
    ids=_page_id,
)
@pytest.mark.usefixtures("docs_environment")
def test_page_code_runs(page: Path) -> None:
    try:
        ran = run_page(page, {"__name__": "__main__"})
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            pytest.fail(f"{_page_id(page)} leaves a process group initialised")
    assert ran >= 1


def run_page(page: Path, namespace: dict[str, Any]) -> int:
    """Run the blocks of ``page`` in order in ``namespace``; the number of blocks run."""
    ran = 0
    for block in ALL_BLOCKS[page]:
        if block.not_run:
            continue
        # Line numbers in tracebacks point into the page (and inspect.getsource reads it).
        code = compile("\n" * block.line + block.code, str(block.page), "exec")
        try:
            exec(code, namespace)
        except BaseException as err:
            err.add_note(f"in the code block at {block.where}")
            raise
        ran += 1
    return ran


def test_teaching_pages_have_code_that_runs() -> None:
    # The quickstart, guides, concepts and migration pages teach by example: each has code
    # that runs. (The API reference is generated; the benchmarks page runs scripts.)
    for page in PAGES:
        if page.parent.name in ("guides", "concepts", "migration") or page.stem in (
            "quickstart",
            "why",
            "README",
        ):
            assert page in RUN_PAGES, f"{_page_id(page)} has no code block that runs"


def test_opted_out_blocks_say_why_and_still_compile() -> None:
    assert len(NOT_RUN) <= 4, [b.where for b in NOT_RUN]  # keep them few
    for block in NOT_RUN:
        assert block.not_run and len(block.not_run.split()) >= 3, block.where
        compile(block.code, block.where, "exec")  # no syntax rot in code that does not run


def test_fence_parser_reads_titles_and_indented_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n"
        '!!! note\n    ```python title="Not run: needs two processes"\n    y = 2\n    ```\n\n'
        "```bash\nls\n```\n",
        encoding="utf-8",
    )
    first, second = python_blocks(page)
    assert (first.line, first.code, first.not_run) == (3, "x = 1\n", None)
    assert (second.line, second.code, second.not_run) == (8, "y = 2\n", "needs two processes")


def test_api_reference_renders_every_public_name() -> None:
    directives = set(re.findall(r"^::: ([\w.]+)\s*$", API_PAGE.read_text("utf-8"), re.MULTILINE))
    wanted = {f"polprec.{name}" for name in polprec.__all__}
    wanted |= {"polprec.testing", "polprec.testing.strategies"}
    assert not wanted - directives, f"missing from docs/api.md: {sorted(wanted - directives)}"
    for directive in directives:  # and nothing that does not exist
        module, _, name = directive.rpartition(".")
        if directive not in sys.modules:
            assert hasattr(importlib.import_module(module), name), directive


def test_readme_and_docs_home_give_the_same_install_commands() -> None:
    # A newcomer reads one of the two pages; both say the same. Every command works in a
    # fresh shell: it creates or reuses .venv and activates it before it installs anything.
    commands = re.compile(r"^```bash\n# 1\. .*?^```", re.MULTILINE | re.DOTALL)
    cpu_torch = re.compile(r"^\*\*torch's CPU build\*\*.*?^```bash\n.*?^```", re.M | re.DOTALL)
    texts = [(ROOT / "README.md").read_text("utf-8"), (DOCS / "index.md").read_text("utf-8")]
    found = {}
    for pattern in (commands, cpu_torch):
        readme, home = (pattern.search(text) for text in texts)
        assert readme and home, pattern.pattern
        assert readme[0] == home[0]
        found[pattern] = readme[0]
    lines = [line for line in found[commands].splitlines()[1:-1] if not line.startswith("#")]
    assert len(lines) == 2
    for line in lines:
        assert line.startswith(("python3 -m venv .venv && ", "(test -d .venv || python3 -m venv"))
        assert " && . .venv/bin/activate && pip install torch==2.13.0 && " in line
    index = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert index in found[cpu_torch]


def test_the_gradscaler_recipe_states_its_true_line_counts() -> None:
    # The torch.amp page ports the GradScaler loop and says how long each version is: the
    # non-blank lines of the two blocks after the shared setup.
    page = DOCS / "migration" / "torch-amp.md"
    text = page.read_text("utf-8")
    start = text.index("## From the GradScaler loop")
    section = text[start : text.index("\n## ", start + 1)]
    line = text.count("\n", 0, start) + 1
    blocks = [b for b in ALL_BLOCKS[page] if line < b.line < line + section.count("\n")]
    setup, amp, port = blocks[:3]
    assert setup.code.startswith("# Shared by both loops")
    assert "scaler.scale(loss / k).backward()" in amp.code and "torch.save" in amp.code
    assert "microbatches=k" in port.code and "weights_only=True" in port.code
    counts = [sum(1 for x in b.code.splitlines() if x.strip()) for b in (amp, port)]
    stated = re.search(
        r"the torch\.amp loop is \*\*(\d+) lines\*\* and the polprec port \*\*(\d+)\*\*",
        " ".join(section.split()),
    )
    assert stated, "the section states both line counts"
    assert [int(stated[1]), int(stated[2])] == counts


def test_the_nanogpt_page_states_its_true_line_counts() -> None:
    # The nanoGPT guide prints the non-blank line counts of its two loop functions and states
    # them in its text.
    page = DOCS / "guides" / "nanogpt.md"
    counts = {}
    for block in ALL_BLOCKS[page]:
        for node in ast.parse(block.code).body:
            if isinstance(node, ast.FunctionDef) and node.name in ("train_torch", "train_pp"):
                source = ast.get_source_segment(block.code, node) or ""
                counts[node.name] = sum(1 for x in source.splitlines() if x.strip())
    stated = re.search(
        r"`train_torch` is \*\*(\d+) lines\*\* and `train_pp` \*\*(\d+)\*\*",
        " ".join(page.read_text("utf-8").split()),
    )
    assert stated, "the page states both line counts"
    assert [int(stated[1]), int(stated[2])] == [counts["train_torch"], counts["train_pp"]]


@pytest.mark.usefixtures("docs_environment")
def test_the_nanogpt_loops_agree_bit_for_bit_with_the_fused_adamw() -> None:
    # The nanoGPT guide says why its two runs differ in the last bits: the torch loop's AdamW
    # runs torch's foreach code and takes a float64 learning rate. With torch's fused AdamW (the
    # kernel pp.optim runs in eager mode) and the schedule's float32 rate they are equal.
    page = DOCS / "guides" / "nanogpt.md"
    ns: dict[str, Any] = {"__name__": "__main__"}
    run_page(page, ns)  # on one thread, as the page sets
    torch.manual_seed(1337)  # the page's initial weights
    model = ns["GPT"](ns["GPTConfig"](vocab_size=len(ns["chars"])))
    groups = [
        {"params": [p for p in model.parameters() if p.dim() >= 2]},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    lr, betas = ns["learning_rate"], (ns["beta1"], ns["beta2"])
    fused = torch.optim.AdamW(
        groups, lr=lr, betas=betas, weight_decay=ns["weight_decay"], fused=True
    )
    ns.update(model=model, optimizer=fused, torch_log=[])
    ns["get_lr"] = lambda it: float(lr * ns["schedule"](it + 1))
    torch.manual_seed(1)
    ns["train_torch"]()
    trained = ns["params"]  # the polprec loop's, from the page
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), trained[name]), name


def test_plot_on_the_loss_scaling_page_exists() -> None:
    page = (DOCS / "concepts" / "loss-scaling.md").read_text("utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert images, "the loss-scaling page shows the loss-scale trajectory"
    for image in images:
        path = (DOCS / "concepts" / image).resolve()
        assert path.is_file() and path.stat().st_size < 300_000, image


def test_docs_extension_needs_only_the_docs_extra() -> None:
    # mkdocs loads docs/_ext/rst_roles.py; the docs extra alone must be enough, so the
    # extension reads the documented names from the sources. Here hypothesis (the testing
    # extra) and polprec itself cannot be imported at all.
    pytest.importorskip("griffe", reason='the docs extra: pip install -e ".[docs]"')
    code = textwrap.dedent(
        """
        import json, sys
        for name in ("hypothesis", "polprec", "torch"):
            sys.modules[name] = None  # any import of them raises ImportError
        sys.path.insert(0, sys.argv[1])
        import rst_roles
        print(json.dumps(rst_roles.RstRoles()._targets))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(DOCS / "_ext")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    targets = json.loads(result.stdout)
    expected: dict[str, str] = {}
    for module in (polprec, polprec.testing, polprec.testing.strategies):
        for name in module.__all__:
            expected.setdefault(name, f"{module.__name__}.{name}")
    assert targets == expected


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason='the docs extra: pip install -e ".[docs]"')
    mkdocs = [sys.executable, "-m", "mkdocs"]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    site = tmp_path / "site"
    result = subprocess.run(
        [*mkdocs, "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (site / "api" / "index.html").read_text("utf-8")
    for name in polprec.__all__:
        assert f'id="polprec.{name}"' in api, name
    assert ":func:`" not in api and ":class:`" not in api  # Sphinx roles became links
    assert (site / "img" / "digits-loss-scale.png").is_file()

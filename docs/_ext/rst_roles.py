"""A Griffe extension: read polprec's Sphinx-style roles as Markdown cross-references.

polprec's docstrings are Google style with Sphinx roles (``:func:`get_policy```), which read
well in ``help()``. mkdocstrings renders Markdown, where a role would show up verbatim; this
extension rewrites each role at load time into an autorefs link to the API reference
(``[get_policy][polprec.get_policy]``) when the name is documented there, and into inline
code otherwise (``:meth:`adjust``` becomes `adjust()`). A reST literal-block marker at the
end of a line (``text::``) becomes a plain colon.

The documented names are read from the ``__all__`` lists in the sources, without importing
anything: the docs extra alone must build the site, and ``polprec.testing.strategies``
imports ``hypothesis``, which only the ``testing`` extra installs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import griffe

_PACKAGE = Path(__file__).resolve().parents[2] / "polprec"

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc):`(~?)([\w.]+)`")
# reST's "text::" introduces a literal block; Markdown needs only the indentation.
_LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _static_all(source: Path) -> list[str]:
    """The names in the module-level ``__all__ = [...]`` of ``source``, read without importing."""
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            names = ast.literal_eval(node.value)
            return [str(name) for name in names]
    raise ValueError(f"{source} has no literal __all__ list")


def _documented() -> dict[str, str]:
    """Short name -> documented identifier, for every object the API page renders."""
    modules = [
        ("polprec", _PACKAGE / "__init__.py"),
        ("polprec.testing", _PACKAGE / "testing" / "__init__.py"),
        ("polprec.testing.strategies", _PACKAGE / "testing" / "strategies.py"),
    ]
    out: dict[str, str] = {}
    for module, source in modules:
        for name in _static_all(source):
            out.setdefault(name, f"{module}.{name}")
    return out


class RstRoles(griffe.Extension):
    """Rewrite ``:role:`name``` in every docstring into a Markdown link or inline code."""

    def __init__(self) -> None:
        super().__init__()
        self._targets = _documented()

    def _replace(self, match: re.Match[str]) -> str:
        name = match.group(2)
        short = name.rpartition(".")[2]
        call = "()" if match.group(0).startswith((":func:", ":meth:")) else ""
        target = self._targets.get(short)
        if target is not None and name in (short, target, f"polprec.{short}"):
            return f"[`{short}{call}`][{target}]"
        return f"`{short}{call}`"

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _ROLE.sub(self._replace, obj.docstring.value)
            obj.docstring.value = _LITERAL_MARKER.sub(":", text)

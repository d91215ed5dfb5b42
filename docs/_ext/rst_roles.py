"""A Griffe extension: read polprec's Sphinx-style roles as Markdown cross-references.

polprec's docstrings are Google style with Sphinx roles (``:func:`get_policy```), which read
well in ``help()``. mkdocstrings renders Markdown, where a role would show up verbatim; this
extension rewrites each role at load time into an autorefs link to the API reference
(``[get_policy][polprec.get_policy]``) when the name is documented there, and into inline
code otherwise (``:meth:`adjust``` becomes `adjust()`). A reST literal-block marker at the
end of a line (``text::``) becomes a plain colon.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc):`(~?)([\w.]+)`")
# reST's "text::" introduces a literal block; Markdown needs only the indentation.
_LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _documented() -> dict[str, str]:
    """Short name -> documented identifier, for every object the API page renders."""
    import polprec
    import polprec.testing
    import polprec.testing.strategies as strategies

    out = {name: f"polprec.{name}" for name in polprec.__all__}
    for name in polprec.testing.__all__:
        out.setdefault(name, f"polprec.testing.{name}")
    for name in strategies.__all__:
        out.setdefault(name, f"polprec.testing.strategies.{name}")
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

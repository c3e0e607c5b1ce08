"""Griffe extension for the API pages: render the Sphinx roles used in TaTok docstrings as code.

The source docstrings use reStructuredText roles (``:class:`~tatok_core.contract.tokens.Tokens```) so that they
read well in ``help()`` and IDEs. Markdown has no roles, so this turns each into inline code showing
the name (the last dotted part when the target starts with ``~``), and ``::`` that introduces a
literal block into ``:``. Cross-references are deliberately not produced: a role naming an object that
no page documents would otherwise fail ``mkdocs build --strict``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
LITERAL_INTRO = re.compile(r"(\S)::(\n\n)")


def _role(match: re.Match[str]) -> str:
    target = match[2]
    return f"`{target.rsplit('.', 1)[-1] if match[1] else target}`"


def render_roles(text: str) -> str:
    """``:class:`~a.b.C``` → ```C```, ``:func:`a.b``` → ```a.b```; ``text::`` before a block → ``text:``."""
    return LITERAL_INTRO.sub(r"\1:\2", ROLE.sub(_role, text))


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring once, when its object is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = render_roles(obj.docstring.value)

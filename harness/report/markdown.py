"""Tables as GitHub-flavoured Markdown. Every string from a run is escaped: it cannot break a table
(``|``, newlines), start code or emphasis (backticks, ``*``, ``_``), form a link or inline HTML."""
from __future__ import annotations

import re

from .tables import Table

__all__ = ["md_escape", "render_table", "render_markdown"]

_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md_escape(text: object) -> str:
    """``text`` safe inside a Markdown table cell.

    >>> md_escape("a|b `x` <i>")
    'a\\\\|b \\\\`x\\\\` &lt;i&gt;'
    """
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = " ".join(s.splitlines())
    return _SPECIAL.sub(r"\\\1", s)


def render_table(t: Table, level: int = 2) -> str:
    """One table: a heading, the pipe table, and its note in italics."""
    head = [md_escape(h) or " " for h in t.head]
    lines = [f"{'#' * level} {md_escape(t.title)}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"*{md_escape(t.note)}*"]
    return "\n".join(lines) + "\n"


def render_markdown(title: str, sections: list[tuple[str | None, list[Table]]]) -> str:
    """A document: the title, then per section an optional heading and its tables."""
    out = [f"# {md_escape(title)}", ""]
    for heading, tables in sections:
        if heading:
            out += [f"## {md_escape(heading)}", ""]
        out += [render_table(t, 3 if heading else 2) for t in tables]
    return "\n".join(out)

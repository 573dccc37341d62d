"""A Griffe extension for the API pages: hkfit's docstrings in Markdown terms.

hkfit's docstrings follow the Google style that ``help()`` and doctests read, with a few
reStructuredText habits that Markdown does not know. Before mkdocstrings renders a
docstring, this extension rewrites:

* roles such as ``:class:`~hkfit.step.TrainState``` into code spans (``TrainState``);
* doctest examples (lines starting with ``>>>``, their ``...`` continuations and the
  expected output) into fenced ``pycon`` blocks, which Markdown would otherwise read as
  nested block quotes;
* literal blocks introduced by ``::`` into fenced ``python`` blocks.

The docstrings in ``hkfit/`` are left as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`~?([^`]+)`")


def _role(match: re.Match) -> str:
    target = match.group(1)
    if match.group(0).split("`")[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"``{target}``"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence_doctests(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.lstrip().startswith(">>>"):
            out.append(line)
            i += 1
            continue
        pad = " " * _indent(line)
        if out and out[-1].strip():
            out.append("")
        out.append(f"{pad}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{pad}```")
    return out


def _fence_literal_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if not line.rstrip().endswith("::") or line.strip() == "::":
            continue
        out[-1] = line.rstrip()[:-1]  # "Example::" -> "Example:"
        base = _indent(line)
        j = i
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or _indent(lines[j]) <= base:
            continue
        block: list[str] = []
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        inner = min(_indent(b) for b in block if b.strip())
        pad = " " * base
        out += ["", f"{pad}```python"]
        out += [pad + b[inner:] if b.strip() else "" for b in block]
        out += [f"{pad}```", ""]
        i = j
    return out


def to_markdown(text: str) -> str:
    """The docstring ``text`` with roles, doctests and literal blocks in Markdown."""
    text = ROLE.sub(_role, text)
    lines = _fence_literal_blocks(text.splitlines())
    return "\n".join(_fence_doctests(lines))


class SphinxToMarkdown(griffe.Extension):
    """Rewrites every docstring that Griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)

"""Text for a terminal or a journal line."""
from __future__ import annotations

import re

# What would break a journal line: C0 controls (a newline in a file name), DEL, C1 controls, Unicode line breaks.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with its control characters escaped as repr() writes them (\\n, \\x1b, …), the rest kept."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def some(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``names``, and "…" for the rest: a sentence naming files, kept to one line."""
    return ", ".join(names[:shown]) + (", …" if len(names) > shown else "")

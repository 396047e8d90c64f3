"""What an answer can carry back: text a UTF-8 encoder takes and numbers JSON can spell.

Python's JSON reader takes a lone surrogate escape (``"\\ud800"``) and the tokens NaN and
Infinity; neither can be written into an answer again (UTF-8 refuses the one, strict JSON the
other), so a value that reaches an answer unchecked made it fail with a 500, or cut a stream off.
"""

from __future__ import annotations

import math
from typing import Any


def is_writable_text(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (not with a lone surrogate in it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def with_surrogates_escaped(text: str) -> str:
    """``text`` with each lone surrogate written as its escape (``\\ud800``), so it encodes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def first_unwritable(value: Any, path: str) -> str | None:
    """Where in ``value`` (parsed JSON) the first string with a lone surrogate or non-finite
    number is, as a dotted path from ``path``; None where there is none. Walked with a stack, so
    nesting as deep as the JSON reader allows costs no recursion."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not is_writable_text(item):
                return where
        elif isinstance(item, float):
            if not math.isfinite(item):
                return where
        elif isinstance(item, dict):
            if any(isinstance(key, str) and not is_writable_text(key) for key in item):
                return where  # the key itself: it cannot be named in the message either
            # Pushed last to first, so that they are popped, and the first place found, in order.
            stack.extend(reversed([(child, f"{where}.{key}") for key, child in item.items()]))
        elif isinstance(item, list):
            stack.extend(reversed([(child, f"{where}[{index}]") for index, child in enumerate(item)]))
    return None

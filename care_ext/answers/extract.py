"""Text-level extraction helpers shared by the task plug-ins (pure Python, no sympy).

Everything here is total: any input (``None``, bytes, strings with lone surrogates, megabytes of
text) returns a value or ``None``; nothing raises on malformed text.
"""

from __future__ import annotations

import re

__all__ = ["as_text", "last_braced_command", "last_tag_block"]


def as_text(response: object) -> str | None:
    """Return ``response`` as a clean ``str``, or ``None`` if it is not text.

    ``bytes`` are decoded as UTF-8 with invalid sequences replaced by U+FFFD; a ``str`` holding
    lone surrogates (what ``errors="surrogateescape"`` decoding of invalid UTF-8 produces) has
    them replaced too, so that later ``encode``/regex/pickle steps never fail. Other types give
    ``None``.
    """
    if isinstance(response, str):
        try:
            response.encode("utf-8")
            return response
        except UnicodeEncodeError:
            return response.encode("utf-8", "replace").decode("utf-8")
    if isinstance(response, (bytes, bytearray)):
        return bytes(response).decode("utf-8", "replace")
    return None


def last_braced_command(text: str, commands: tuple[str, ...] = ("boxed", "fbox")) -> str | None:
    """Content of the last ``\\cmd{...}`` (any ``cmd`` in ``commands``), braces matched.

    ``\\boxed 5`` (a single token without braces, as some models write) is accepted too and gives
    that token. Whitespace between the command and its argument is skipped, newlines included, as
    LaTeX does: ``\\boxed \\n 5`` gives ``5`` (as math-verify reads it) and ``\\boxed\\n{5}`` and
    ``\\boxed {5}`` give ``5`` (math-verify 0.9 reads nothing from these two). Returns the content
    stripped of surrounding whitespace, or ``None`` when there is no such command or its braces are
    unbalanced (a truncated response).

    The scan starts at the last occurrence of any of the commands, so a response with several
    boxes yields only the final one (math-verify would merge them into a set).
    """
    best = -1
    best_cmd = ""
    for cmd in commands:
        pos = text.rfind("\\" + cmd)
        # skip longer command names that merely start with cmd (e.g. \boxedsomething)
        while pos >= 0:
            after = pos + 1 + len(cmd)
            if after >= len(text) or not text[after].isalpha():
                break
            pos = text.rfind("\\" + cmd, 0, pos)
        if pos > best:
            best, best_cmd = pos, cmd
    if best < 0:
        return None
    i = best + 1 + len(best_cmd)
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        m = re.match(r"[^\s$}]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    start = i + 1
    j = i
    while j < n:
        c = text[j]
        if c == "\\":  # an escaped character (e.g. \{ or \}) never opens or closes a group
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:j].strip()
        j += 1
    return None


def last_tag_block(text: str, tag: str) -> str | None:
    """Content of the last complete ``<tag>...</tag>`` block, stripped; ``None`` if absent.

    "Last" means the block closed by the last ``</tag>``, opened by the nearest ``<tag>`` before
    it. An unclosed trailing ``<tag>`` (a truncated response) is ignored.
    """
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    open_ = text.rfind(f"<{tag}>", 0, close)
    if open_ < 0:
        return None
    return text[open_ + len(tag) + 2 : close].strip()

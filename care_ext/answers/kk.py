"""Knights-and-Knaves answers: the last ``<answer>`` block, canonicalised to ``name=role|...``.

The names come from the *puzzle* (its ``names`` list or the "You meet N inhabitants: A, B, and
C." sentence of its text), never from the gold label. An answer is valid only if every puzzle
name gets exactly one role; the key is the ``name=knight|name=knave`` pairs, names lower-cased and
sorted. Accepted phrasings per person: "Zoey is a knight", "Zoey is knave", "(2) Zoey is a
knave", "Zoey: knight", "zoey=knight", and for several people at once "Zoey and Oliver are
knights", "Zoey, Oliver, and Max are both/all knaves" (every puzzle name between the start of the
statement and "are" gets the role; a statement starts after the last ".", ";", newline, "(n)" or
role word). A person given two different roles, or left out, makes the whole answer invalid.
"Zoey is not a knight" and "Zoey and Oliver are not knights" are not read as roles.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping, Sequence

from .extract import last_tag_block
from .keys import CanonicalKey

__all__ = ["puzzle_names", "extract_kk_answer", "kk_key", "kk_gold_key", "kk_roles"]

ROLES = ("knight", "knave")
_MEET = re.compile(r"You meet \d+ inhabitants?:\s*(.*?)\.(?:\s|$)", re.S)
_NAME_SPLIT = re.compile(r",\s*(?:and\s+)?|\s+and\s+")


def puzzle_names(context: object) -> tuple[str, ...]:
    """The names of a K&K puzzle.

    Args:
        context: a sequence of names; a mapping with ``"names"`` (or else ``"quiz"``); or the
            puzzle text (str), read from its "You meet N inhabitants: A, B, and C." sentence.

    Returns:
        the names as a tuple of str in puzzle order.

    Raises:
        ValueError: when no names can be found (a K&K batch without puzzles is a caller bug).
    """
    if isinstance(context, Mapping):
        if context.get("names") is not None:
            return tuple(str(n) for n in context["names"])
        if context.get("quiz") is not None:
            return puzzle_names(str(context["quiz"]))
        raise ValueError("K&K context mapping needs 'names' or 'quiz'")
    if isinstance(context, str):
        m = _MEET.search(context)
        if not m:
            raise ValueError("no 'You meet N inhabitants: ...' sentence in the K&K puzzle text")
        names = tuple(p.strip() for p in _NAME_SPLIT.split(m.group(1)) if p.strip())
        if not names:
            raise ValueError("empty name list in the K&K puzzle text")
        return names
    if isinstance(context, Sequence) or hasattr(context, "tolist"):
        names = tuple(str(n) for n in (context.tolist() if hasattr(context, "tolist") else context))
        if names:
            return names
    raise ValueError(f"cannot read K&K names from {type(context).__name__}")


@lru_cache(maxsize=4096)
def _name_pattern(name: str) -> re.Pattern:
    return re.compile(
        r"(?<![\w])" + re.escape(name) + r"(?![\w])\s*(?:(?:is|was|are)\s+(?:(?:a|an)\s+)?|[:=]\s*)"
        r"(knight|knave)s?(?![a-z])",
        re.I,
    )


_PLURAL = re.compile(r"\bare\s+(?:both\s+|all\s+)?(knight|knave)s(?![a-z])", re.I)
_STATEMENT_CUT = re.compile(r"[.;\n]|\(\d+\)|\b(?:knight|knave)s?\b", re.I)


def _plural_roles(text: str, names: Sequence[str]) -> dict[str, set[str]]:
    """Roles given to several names at once ("A and B are knights"): lower-cased name -> roles."""
    out: dict[str, set[str]] = {}
    for m in _PLURAL.finditer(text):
        start = 0
        for cut in _STATEMENT_CUT.finditer(text, 0, m.start()):
            start = cut.end()
        subject = text[start:m.start()]
        for name in names:
            if re.search(r"(?<![\w])" + re.escape(name) + r"(?![\w])", subject, re.I):
                out.setdefault(name.lower(), set()).add(m.group(1).lower())
    return out


def kk_roles(text: str, names: Sequence[str]) -> dict[str, str] | None:
    """``{lower-cased name: "knight"|"knave"}`` for every name, or ``None``.

    ``None`` when a name has no role statement or two different ones.
    """
    out: dict[str, str] = {}
    plural = _plural_roles(text, names)
    for name in names:
        found = {m.group(1).lower() for m in _name_pattern(name).finditer(text)}
        found |= plural.get(name.lower(), set())
        if len(found) != 1:
            return None
        out[name.lower()] = found.pop()
    return out


def _key_of(roles: Mapping[str, str]) -> CanonicalKey:
    text = "|".join(f"{n}={roles[n]}" for n in sorted(roles))
    return CanonicalKey(text=text, number=False, symbolic=False, latex=text)


def extract_kk_answer(text: str, context: object = None) -> str | None:
    """Content of the last ``<answer>...</answer>`` block; ``None`` if absent or empty."""
    ans = last_tag_block(text, "answer")
    return ans or None


def kk_key(answer: str, context: object) -> CanonicalKey | None:
    """Canonical key ``"a=knave|b=knight|..."`` of an extracted answer; ``None`` if invalid.

    ``context`` gives the puzzle names (see :func:`puzzle_names`).
    """
    names = puzzle_names(context)
    roles = kk_roles(answer, names)
    return None if roles is None else _key_of(roles)


def kk_gold_key(gold: object, context: object) -> CanonicalKey | None:
    """Key of a K&K gold label in the response key space.

    ``gold`` may be the ``solution`` list of bools (puzzle-name order, True = knight), a mapping
    name -> bool/"knight"/"knave", a mapping holding ``solution_text_format`` (the Logic-RL
    ``ground_truth``), or a string parsed like a response (solution text or canonical form).
    Names are always those of the puzzle (``context``).
    """
    names = puzzle_names(context)
    if gold is None:
        return None
    if hasattr(gold, "tolist") and not isinstance(gold, str):
        gold = gold.tolist()
    if isinstance(gold, Mapping):
        if "solution_text_format" in gold:
            return kk_gold_key(gold["solution_text_format"], context)
        if "solution" in gold:
            return kk_gold_key(gold["solution"], context)
        lowered = {str(k).lower(): v for k, v in gold.items()}
        roles = {}
        for n in names:
            v = lowered.get(n.lower())
            if isinstance(v, bool):
                roles[n.lower()] = "knight" if v else "knave"
            elif isinstance(v, str) and v.lower() in ROLES:
                roles[n.lower()] = v.lower()
            else:
                return None
        return _key_of(roles)
    if isinstance(gold, str):
        return kk_key(gold, names)
    if isinstance(gold, Sequence) and len(gold) == len(names) and all(isinstance(v, bool) for v in gold):
        return _key_of({n.lower(): ("knight" if v else "knave") for n, v in zip(names, gold)})
    return None

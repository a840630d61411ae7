"""Verification guards: cheap text checks that veto a semantic hit the embedding got wrong.

An embedding puts "How do I enable 2FA?" next to "How do I disable 2FA?" and "price in 2023"
next to "price in 2024". After the k-NN step, each guard compares the query text with the
candidate entry's embedded text and names itself when the two differ in a way that changes the
answer; a named guard turns that candidate into a miss. Guards only ever remove hits: they
cannot make a miss a hit, so they trade recall for precision, and each one is kept on by default
only if it raised precision at equal recall on the QQP dev pairs (README "Quality").

Guards are pure functions of the two texts (no model, no state), so every node and worker
decides the same. Which guards run is a per-namespace setting (``policy.Settings.guards``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

Guard = Callable[[str, str], bool]
"""``guard(query, cached)`` is True when the texts differ in what the guard checks."""

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?(?:[.,][0-9]+)*")
_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
        ]
    )
}
_NEGATIONS = frozenset(
    [
        "not",
        "no",
        "never",
        "none",
        "nobody",
        "nothing",
        "neither",
        "nor",
        "without",
        "cannot",
        "can't",
        "don't",
        "doesn't",
        "didn't",
        "isn't",
        "aren't",
        "wasn't",
        "weren't",
        "won't",
        "wouldn't",
        "shouldn't",
        "couldn't",
        "haven't",
        "hasn't",
        "hadn't",
    ]
)
# Pairs of words whose swap flips the question's predicate. Both directions are checked.
_ANTONYMS = (
    ("enable", "disable"),
    ("enabled", "disabled"),
    ("increase", "decrease"),
    ("buy", "sell"),
    ("best", "worst"),
    ("before", "after"),
    ("maximum", "minimum"),
    ("max", "min"),
    ("start", "stop"),
    ("add", "remove"),
    ("install", "uninstall"),
    ("encrypt", "decrypt"),
    ("upload", "download"),
    ("import", "export"),
    ("gain", "lose"),
    ("advantages", "disadvantages"),
    ("pros", "cons"),
    ("positive", "negative"),
    ("rich", "poor"),
    ("cheap", "expensive"),
    ("cheapest", "expensive"),
    ("male", "female"),
    ("men", "women"),
    ("boy", "girl"),
    ("first", "last"),
    ("open", "close"),
    ("login", "logout"),
    ("win", "lose"),
    ("hot", "cold"),
    ("up", "down"),
    ("true", "false"),
    ("legal", "illegal"),
    ("possible", "impossible"),
    ("good", "bad"),
)
_ANTONYM_OF: dict[str, frozenset[str]] = {}
for _a, _b in _ANTONYMS:
    _ANTONYM_OF[_a] = _ANTONYM_OF.get(_a, frozenset()) | {_b}
    _ANTONYM_OF[_b] = _ANTONYM_OF.get(_b, frozenset()) | {_a}
# Question types that change the kind of answer. "what", "which" and yes/no questions are left
# out on purpose: "What is the best way to X?" asks the same as "How do I X?".
_QUESTION_TYPES = ("how", "why", "when", "who", "where")
_STOPWORDS = frozenset(["i", "a", "an", "the", "what", "which", "is", "are", "do", "does"])


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def numbers(text: str) -> frozenset[str]:
    """Numbers, dates, versions and amounts of ``text`` ("2023", "3.11", "5", "10:30"), with
    small number words as digits; thousands separators and a trailing ".0" do not count."""
    found = {m.replace(",", "") for m in _NUMBER.findall(text)}
    found |= {_NUMBER_WORDS[w] for w in _words(text) if w in _NUMBER_WORDS}
    return frozenset(n[:-2] if n.endswith(".0") else n for n in found)


def number_mismatch(query: str, cached: str) -> bool:
    """Both texts carry numbers (dates, versions, amounts, units) and they are not the same."""
    a, b = numbers(query), numbers(cached)
    return bool(a) and bool(b) and a != b


def _negated(words: list[str]) -> bool:
    return any(w in _NEGATIONS or w.endswith("n't") for w in words)


def negation_mismatch(query: str, cached: str) -> bool:
    """One text is negated and the other not, or one uses a word whose antonym the other uses
    instead ("enable" / "disable"). Presence, not parity: "No, it doesn't exist" and "It does
    not exist" are both negated."""
    wa, wb = _words(query), _words(cached)
    if _negated(wa) != _negated(wb):
        return True
    sa, sb = set(wa), set(wb)
    return any(w not in sb and (_ANTONYM_OF[w] & sb) - sa for w in sa if w in _ANTONYM_OF)


def entities(text: str) -> frozenset[str]:
    """Capitalised words that are not the first word of a sentence, and all-caps acronyms,
    lower-cased: a cheap stand-in for named entities."""
    out: set[str] = set()
    for sentence in re.split(r"[.?!]\s+", text):
        tokens = re.findall(r"[A-Za-z][A-Za-z0-9&'-]*", sentence)
        for i, token in enumerate(tokens):
            named = (token.isupper() and len(token) > 1) or (i > 0 and token[0].isupper())
            if named and token.lower() not in _STOPWORDS:
                out.add(token.lower())
    return frozenset(out)


def entity_mismatch(query: str, cached: str) -> bool:
    """Each text names an entity that the other does not mention at all."""
    a, b = entities(query), entities(cached)
    la, lb = query.lower(), cached.lower()
    return any(e not in lb for e in a) and any(e not in la for e in b)


def question_type(text: str) -> str | None:
    """The first how / why / when / who / where word, or None."""
    for word in _words(text):
        if word in _QUESTION_TYPES:
            return word
    return None


def question_type_mismatch(query: str, cached: str) -> bool:
    """Both are how/why/when/who/where questions, of different types."""
    a, b = question_type(query), question_type(cached)
    return a is not None and b is not None and a != b


MAX_LENGTH_RATIO = 3.0


def length_mismatch(query: str, cached: str) -> bool:
    """One text has more than :data:`MAX_LENGTH_RATIO` times the words of the other."""
    a, b = max(1, len(_words(query))), max(1, len(_words(cached)))
    return max(a, b) > MAX_LENGTH_RATIO * min(a, b)


GUARDS: dict[str, Guard] = {
    "numbers": number_mismatch,
    "negation": negation_mismatch,
    "entities": entity_mismatch,
    "question_type": question_type_mismatch,
    "length_ratio": length_mismatch,
}
"""Every guard by name, in the order they run."""

DEFAULT_GUARDS = "numbers,negation,entities"
"""The guards on unless a namespace says otherwise: those that raised precision at equal recall
on the QQP dev pairs (README "Quality")."""


def parse(names: str) -> tuple[str, ...]:
    """``"numbers,negation"`` → the guard names; raises ``ValueError`` naming an unknown one.
    ``""`` and ``"none"`` are no guards, ``"all"`` every guard."""
    names = names.strip()
    if names in ("", "none"):
        return ()
    if names == "all":
        return tuple(GUARDS)
    out = tuple(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    unknown = [n for n in out if n not in GUARDS]
    if unknown:
        raise ValueError(f"unknown guard(s) {unknown}; known: {sorted(GUARDS)}")
    return out


def verify(query: str, cached: str, enabled: Iterable[str]) -> str | None:
    """The name of the first enabled guard that vetoes serving ``cached`` for ``query``, or
    None when all pass. Identical texts always pass."""
    if query == cached:
        return None
    for name in enabled:
        if GUARDS[name](query, cached):
            return name
    return None

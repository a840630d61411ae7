"""Verification guards (node/guards.py): each vetoes its look-alike and passes paraphrases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmcache.node import guards


@pytest.mark.parametrize(
    ("query", "cached", "guard"),
    [
        ("What was the price in 2023?", "What was the price in 2024?", "numbers"),
        ("Is Python 3.11 faster than 3.10?", "Is Python 3.12 faster than 3.10?", "numbers"),
        ("How do I lose 5 kg in a month?", "How do I lose 10 kg in a month?", "numbers"),
        ("How do I enable 2FA?", "How do I disable 2FA?", "negation"),
        ("Why is my app not starting?", "Why is my app starting?", "negation"),
        ("What are the advantages of Rust?", "What are the disadvantages of Rust?", "negation"),
        ("What is the capital of France?", "What is the capital of Germany?", "entities"),
        ("How does Paris compare with Rome?", "How does Madrid compare with Berlin?", "entities"),
        ("Why did the Roman empire fall?", "When did the Roman empire fall?", "question_type"),
        ("Who invented the telephone?", "Where was the telephone invented?", "question_type"),
        (
            "Why?",
            "Why do people keep buying expensive phones when cheaper ones work?",
            "length_ratio",
        ),
    ],
)
def test_guard_vetoes_its_look_alike(query: str, cached: str, guard: str) -> None:
    assert guards.GUARDS[guard](query, cached)
    assert guards.GUARDS[guard](cached, query)
    assert guards.verify(query, cached, [guard]) == guard


@pytest.mark.parametrize(
    ("query", "cached"),
    [
        ("How do I enable 2FA?", "How can I turn on 2FA?"),
        ("What was the price in 2023?", "How much did it cost in 2023?"),
        ("What is the capital of France?", "Which city is the capital of France?"),
        ("How can I learn Python quickly?", "What is the fastest way to learn Python?"),
        ("How do I lose 5 kg?", "How do I lose five kg?"),
        ("Is 1,000 a big number?", "Is 1000 a big number?"),
        ("No, LOAD_HU doesn't exist in v2.10.0.", "LOAD_HU is not a feature of v2.10.0."),
    ],
)
def test_paraphrases_pass_every_guard(query: str, cached: str) -> None:
    assert guards.verify(query, cached, guards.GUARDS) is None


@given(st.text(max_size=200))
def test_identical_texts_always_pass(text: str) -> None:
    assert guards.verify(text, text, guards.GUARDS) is None


@given(st.text(max_size=100), st.text(max_size=100))
def test_guards_are_symmetric(a: str, b: str) -> None:
    for name, guard in guards.GUARDS.items():
        assert guard(a, b) == guard(b, a), name


def test_numbers_normalised() -> None:
    assert guards.numbers("Python 3.11 in 2023, 1,500 users, two days") == {
        "3.11",
        "2023",
        "1500",
        "2",
    }


def test_parse() -> None:
    assert guards.parse("") == guards.parse("none") == ()
    assert guards.parse("all") == tuple(guards.GUARDS)
    assert guards.parse(" numbers, negation ,numbers") == ("numbers", "negation")
    with pytest.raises(ValueError, match="unknown guard"):
        guards.parse("numbers,spelling")

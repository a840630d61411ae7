"""The judge's prompt and the reading of answers (node/judge.py); the judge at work through the
proxy is in test_proxy.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmcache.node import judge


def chat(content: object) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"content": content}}]}).encode()


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        ("yes", "correct"),
        ("Yes.", "correct"),
        (" YES, it does", "correct"),
        ("No", "wrong"),
        ("no!", "wrong"),
        ("maybe", None),
        ("", None),
        ("I cannot decide", None),
    ],
)
def test_verdict_reads_the_first_word(reply: str, label: str | None) -> None:
    assert judge.verdict(chat(reply)) == label


def test_verdict_of_an_unreadable_answer_is_none() -> None:
    assert judge.verdict(b"not json") is None
    assert judge.verdict(b'{"choices": []}') is None
    assert judge.verdict(chat(None)) is None


def test_answer_text_of_json_and_streamed_answers() -> None:
    assert judge.answer_text(chat("Paris."), "application/json") == "Paris."
    completion = json.dumps({"choices": [{"text": "Hello"}]}).encode()
    assert judge.answer_text(completion, "application/json") == "Hello"
    events = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "Par"}}]},
        {"choices": [{"delta": {"content": "is."}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"total_tokens": 3}},
    ]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    assert judge.answer_text(sse.encode(), "text/event-stream; charset=utf-8") == "Paris."
    assert judge.answer_text(b"\xff\xfe", "application/json") == ""


@given(st.text(max_size=10_000), st.text(max_size=10_000))
def test_the_prompt_is_bounded_and_holds_every_text_head(question: str, answer: str) -> None:
    body = judge.request_body("judge-model", question, "cached q", answer, "fresh")
    assert body["model"] == "judge-model" and body["temperature"] == 0
    prompt = body["messages"][-1]["content"]
    assert question[: judge.MAX_TEXT_CHARS] in prompt
    assert answer[: judge.MAX_TEXT_CHARS] in prompt
    assert len(prompt) <= 4 * (judge.MAX_TEXT_CHARS + 10) + 400

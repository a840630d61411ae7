"""Canonical keys: scope rules, the context policy, canonical forms, limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmcache.node import keys, limits
from llmcache.node.errors import EmptyPrompt, InvalidRequest, OversizeInput


def chat(*messages: tuple[str, str], **params: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": r, "content": t} for r, t in messages], **params}


def test_last_user_turn_is_embedded_and_context_goes_to_scope() -> None:
    a = keys.chat_key(
        "t",
        "n",
        chat(("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "and in Python?")),
    )
    b = keys.chat_key(
        "t",
        "n",
        chat(("system", "S"), ("user", "Q2"), ("assistant", "A2"), ("user", "and in Python?")),
    )
    assert a.text == b.text == "and in Python?"
    # The same follow-up in another conversation is another scope: never a match.
    assert a.scope != b.scope and a.exact_key != b.exact_key
    other_system = keys.chat_key(
        "t",
        "n",
        chat(("system", "T"), ("user", "Q1"), ("assistant", "A1"), ("user", "and in Python?")),
    )
    assert other_system.scope != a.scope


def test_window_embeds_last_turns() -> None:
    body = chat(("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"))
    k = keys.chat_key("t", "n", body, window=3)
    assert k.text == "user: Q1\nassistant: A1\nuser: Q2"
    k2 = keys.chat_key(
        "t",
        "n",
        chat(("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2")),
        window=1,
    )
    assert k2.text == "user: Q2"
    assert k2.scope != keys.chat_key("t", "n", body).scope  # the window is part of the scope
    with pytest.raises(InvalidRequest, match="window"):
        keys.chat_key("t", "n", body, window=-1)


def test_sampling_parameters_split_the_scope_but_identity_fields_do_not() -> None:
    base = keys.chat_key("t", "n", chat(("user", "hi"), temperature=0))
    assert keys.chat_key("t", "n", chat(("user", "hi"), temperature=0.0)).scope == base.scope
    assert keys.chat_key("t", "n", chat(("user", "hi"), temperature=0.2)).scope != base.scope
    assert keys.chat_key("t", "n", chat(("user", "hi"), temperature=0, model="x")).scope != (
        base.scope
    )
    same = keys.chat_key(
        "t", "n", chat(("user", "hi"), temperature=0, user="alice", metadata={"a": 1})
    )
    assert same.scope == base.scope and same.exact_key == base.exact_key
    streamed = keys.chat_key("t", "n", chat(("user", "hi"), temperature=0, stream=True))
    assert streamed.scope != base.scope  # stream and non-stream entries are kept apart


def test_tenant_and_namespace_are_part_of_the_exact_key() -> None:
    body = chat(("user", "hi"))
    k = keys.chat_key("a", "n", body)
    assert keys.chat_key("b", "n", body).exact_key != k.exact_key
    assert keys.chat_key("a", "m", body).exact_key != k.exact_key
    assert keys.chat_key("a", "n", body).scope_key == b"a\0n\0" + k.scope.encode()


def test_kinds_do_not_collide() -> None:
    text = keys.text_key("t", "n", "hello", {"model": "m"})
    completion = keys.completion_key("t", "n", {"model": "m", "prompt": "hello"})
    chat_k = keys.chat_key("t", "n", chat(("user", "hello")))
    assert len({text.scope, completion.scope, chat_k.scope}) == 3
    assert keys.completion_key("t", "n", {"model": "m", "prompt": ["hello"]}) == completion


def test_multimodal_parts() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:a"}}
    other = {"type": "image_url", "image_url": {"url": "data:b"}}
    k1 = keys.chat_key(
        "t",
        "n",
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}
            ]
        },
    )
    k2 = keys.chat_key(
        "t",
        "n",
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "what is this?"}, other]}
            ]
        },
    )
    assert k1.text == k2.text == "what is this?"
    assert k1.scope != k2.scope  # another image: another answer


def test_bad_input() -> None:
    with pytest.raises(EmptyPrompt):
        keys.chat_key("t", "n", chat(("system", "only system")))
    with pytest.raises(EmptyPrompt):
        keys.text_key("t", "n", "   ")
    with pytest.raises(InvalidRequest, match="messages"):
        keys.chat_key("t", "n", {"messages": []})
    with pytest.raises(InvalidRequest) as exc:
        keys.chat_key("t", "n", {"messages": [{"content": "x"}]})
    assert exc.value.field == "messages[0]"
    with pytest.raises(InvalidRequest) as exc:
        keys.text_key("bad tenant!", "n", "x")
    assert exc.value.field == "tenant"
    with pytest.raises(InvalidRequest, match="prompt"):
        keys.completion_key("t", "n", {"prompt": [1, 2, 3]})
    with pytest.raises(OversizeInput):
        keys.text_key("t", "n", "x" * (limits.MAX_EMBED_TEXT_CHARS + 1))
    with pytest.raises(InvalidRequest) as exc:
        keys.kv_key("t", "n", "")
    assert exc.value.field == "key"


@given(
    st.dictionaries(
        st.sampled_from(["temperature", "top_p", "seed", "max_tokens", "stop"]),
        st.integers(0, 3) | st.floats(0, 2, allow_nan=False),
        max_size=5,
    )
)
def test_field_order_and_number_form_never_split_the_cache(params: dict[str, object]) -> None:
    body = chat(("user", "q"), **params)
    reordered = dict(reversed(list(body.items())))
    as_float = {k: float(v) if isinstance(v, int) else v for k, v in body.items()}
    k = keys.chat_key("t", "n", body)
    assert keys.chat_key("t", "n", reordered) == k
    assert keys.chat_key("t", "n", as_float) == k


@given(st.text(min_size=1).filter(str.strip), st.text(min_size=1).filter(str.strip))
def test_distinct_texts_distinct_exact_keys(a: str, b: str) -> None:
    ka, kb = keys.text_key("t", "n", a), keys.text_key("t", "n", b)
    assert (ka.exact_key == kb.exact_key) == (a == b)

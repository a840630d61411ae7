"""The judge: an LLM that labels a sample of an adaptive namespace's lookups for its threshold.

Adaptive thresholds (``node/adaptive.py``) learn from labels: was the candidate's answer right
for the new question? With ``judge_model`` set on a namespace, the proxy (``node/proxy.py``)
asks that model of the namespace's upstream, for a share ``judge_rate`` of the namespace's
**semantic hits** and, at the same rate, of its **probes** (misses with a candidate):

- a probe already has the fresh answer (the miss went upstream): one judge call;
- a semantic hit has none: the caller's request goes upstream once more (not streamed), then
  the judge call. This is what labelling hits costs, at ``judge_rate`` of them.

The two are sampled at the same rate because the bound assumes labels are a uniform sample of
lookups: labelling probes but not hits would make the estimate of wrong hits too low.

This module knows no HTTP: :func:`request_body` builds the chat-completions body of the judge
call, :func:`verdict` reads its answer, :func:`answer_text` pulls the text out of a stored or
fresh upstream answer (JSON or server-sent events). Each text in the prompt is cut to
:data:`MAX_TEXT_CHARS`, which bounds a judge call's tokens.
"""

from __future__ import annotations

import json
from typing import Any

MAX_TEXT_CHARS = 4000
"""Characters of each question and answer put in the judge's prompt (the rest is cut)."""

SYSTEM = (
    "You check a semantic cache. A new question arrived; the cache holds an answer given to "
    "an earlier, similar question. Reply with one word: yes if the cached answer answers the "
    "new question as well as the fresh answer does, no if it does not."
)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + " [...]"


def request_body(
    model: str, question: str, cached_question: str, cached_answer: str, fresh_answer: str
) -> dict[str, Any]:
    """The body of the judge's ``/chat/completions`` call (temperature 0, a one-word reply)."""
    prompt = (
        f"New question:\n{_cut(question)}\n\n"
        f"Earlier question:\n{_cut(cached_question)}\n\n"
        f"Cached answer (to the earlier question):\n{_cut(cached_answer)}\n\n"
        f"Fresh answer (to the new question):\n{_cut(fresh_answer)}\n\n"
        "Can the cached answer be served for the new question? yes or no."
    )
    return {
        "model": model,
        "temperature": 0,
        "max_tokens": 3,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
    }


def verdict(raw: bytes) -> str | None:
    """``correct`` / ``wrong`` from the judge's chat-completion answer (first word yes / no),
    None when the answer is not one (unreadable, refused, another word)."""
    text = answer_text(raw, "application/json").strip().lower()
    word = text.split()[0].strip(".,!:;\"'") if text else ""
    return {"yes": "correct", "no": "wrong"}.get(word)


def answer_text(raw: bytes, content_type: str) -> str:
    """The generated text of a chat or text completion, JSON or streamed (first choice);
    empty when there is none."""
    if content_type.startswith("text/event-stream"):
        parts = []
        for line in raw.decode("utf-8", "replace").splitlines():
            data = line[5:].strip() if line.startswith("data:") else ""
            if not data or data == "[DONE]":
                continue
            choice = _first_choice(_loads(data))
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            parts.append(piece if isinstance(piece, str) else "")
        return "".join(parts)
    choice = _first_choice(_loads(raw.decode("utf-8", "replace")))
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _first_choice(answer: Any) -> dict[str, Any]:
    choices = answer.get("choices") if isinstance(answer, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    return first if isinstance(first, dict) else {}

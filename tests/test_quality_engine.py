"""Guards and adaptive thresholds in the real engine, store and state machine (supplied vectors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmcache.cluster import commands as c
from llmcache.node import adaptive, keys
from llmcache.node.errors import InvalidRequest, MalformedCommand
from llmcache.node.local import LocalCache
from tests.conftest import unit_vector


def at_similarity(v: np.ndarray, s: float, seed: str = "other") -> list[float]:
    """A unit vector whose cosine similarity with ``v`` is exactly ``s``."""
    u = unit_vector(seed, len(v))
    u = u - float(np.dot(u, v)) * v
    u /= np.linalg.norm(u)
    return (s * v + np.sqrt(1 - s * s) * u).astype(np.float32).tolist()  # type: ignore[no-any-return]


def put(cache: LocalCache, text: str, vector: np.ndarray, namespace: str = "ns") -> int:
    key = keys.text_key("t1", namespace, text)
    result = cache.propose(cache.engine.prepare_put(key, b"{}", vector=vector.tolist()))
    assert result.ok, result
    return int(result.value["id"])


@pytest.mark.parametrize(
    ("stored", "asked", "guard"),
    [
        ("How do I enable 2FA?", "How do I disable 2FA?", "negation"),
        ("What was the price in 2023?", "What was the price in 2024?", "numbers"),
    ],
)
def test_default_guards_turn_look_alikes_into_misses(
    cache: LocalCache, stored: str, asked: str, guard: str
) -> None:
    v = unit_vector(stored)
    entry_id = put(cache, stored, v)
    key = keys.text_key("t1", "ns", asked)
    result = cache.engine.lookup(key, vector=at_similarity(v, 0.97))
    assert result.status == "miss" and result.hit is None
    assert result.rejected == ((entry_id, guard),)
    assert result.candidates[0].similarity == pytest.approx(0.97, abs=1e-4)
    # Guards are a namespace setting: switched off, the same lookup hits.
    cache.propose(cache.engine.prepare_config({"guards": "none"}, "t1", "ns"))
    assert cache.engine.lookup(key, vector=at_similarity(v, 0.97)).status == "semantic_hit"


def test_a_vetoed_best_candidate_lets_the_next_one_hit(cache: LocalCache) -> None:
    cache.propose(cache.engine.prepare_config({"top_k": 2}, "t1", "ns"))
    v = unit_vector("q")
    vetoed = put(cache, "How do I disable 2FA?", v)
    good = put(cache, "How can I turn on 2FA?", np.array(at_similarity(v, 0.99, "a")))
    result = cache.engine.lookup(keys.text_key("t1", "ns", "How do I enable 2FA?"), vector=v)
    assert result.status == "semantic_hit" and result.hit and result.hit.entry.id == good
    assert result.rejected == ((vetoed, "negation"),)


def test_unknown_guard_setting_is_refused(cache: LocalCache) -> None:
    with pytest.raises(InvalidRequest) as exc:
        cache.engine.prepare_config({"guards": "numbers,vibes"}, "t1", "ns")
    assert exc.value.field == "guards"


def feedback(cache: LocalCache, entry_id: int, similarity: float, label: str) -> None:
    command = cache.engine.prepare_feedback("t1", entry_id, label, similarity=similarity)
    result = cache.propose(command)
    assert result.ok and result.value["learned"], result


def test_adaptive_threshold_learns_from_replicated_feedback(cache: LocalCache) -> None:
    engine = cache.engine
    settings = {"threshold": 0.95, "adaptive_delta": 0.05, "adaptive_bound": "hits"}
    cache.propose(engine.prepare_config(settings, "t1", "ns"))
    v = unit_vector("stored")
    entry_id = put(cache, "How do I reset my password?", v)
    key = keys.text_key("t1", "ns", "Steps to reset a password?")
    query = at_similarity(v, 0.92)
    first = engine.lookup(key, vector=query)
    # Too few labels: the configured 0.95 holds, and the 0.92 candidate is a probe.
    assert first.status == "miss" and first.threshold == 0.95
    assert first.probe is not None and first.probe.entry.id == entry_id
    for i in range(60):  # correct labels between 0.90 and 0.96
        feedback(cache, entry_id, 0.90 + 0.001 * i, "correct")
    learned = engine.lookup(key, vector=query)
    assert learned.status == "semantic_hit" and learned.threshold == pytest.approx(0.90)
    # A request's own threshold still wins over the learned one.
    assert engine.lookup(key, vector=query, threshold=0.99).status == "miss"
    # Wrong answers around 0.92 push the threshold back up above them.
    for _ in range(30):
        feedback(cache, entry_id, 0.925, "wrong")
    after = engine.lookup(key, vector=query)
    assert after.status == "miss" and after.threshold > 0.92
    labels = engine.labels("t1", "ns")
    assert labels.total == 90 and sum(labels.wrong) == 30
    # Labels that refute even the configured 0.95: exact hits only, misses still probed.
    for _ in range(60):
        feedback(cache, entry_id, 0.97, "wrong")
    refuted = engine.lookup(key, vector=at_similarity(v, 0.97))
    assert refuted.status == "miss" and refuted.threshold == adaptive.NO_SEMANTIC_HITS
    assert refuted.probe is not None
    assert engine.lookup(keys.text_key("t1", "ns", "How do I reset my password?")).status == "hit"


def test_wrong_hit_rate_bound_learns_from_probes_of_every_miss(cache: LocalCache) -> None:
    """The default bound (``should_miss``): every miss is a probe, a vetoed candidate's probe
    carries similarity 0, and wrong labels anywhere below dilute the rate so the threshold can
    go down to where the wrong ones above it are few enough."""
    engine = cache.engine
    cache.propose(engine.prepare_config({"threshold": 0.95, "adaptive_delta": 0.05}, "t1", "ns"))
    v = unit_vector("stored")
    entry_id = put(cache, "How do I enable 2FA?", v)
    far = engine.lookup(keys.text_key("t1", "ns", "bake a cake"), vector=at_similarity(v, 0.4))
    assert far.status == "miss" and far.probe is not None
    assert far.probe.similarity == pytest.approx(0.4, abs=1e-4)
    # Vetoed by a guard, above or below the threshold: the probe's similarity is 0.
    for s in (0.97, 0.9):
        twin = engine.lookup(
            keys.text_key("t1", "ns", "How do I disable 2FA?"), vector=at_similarity(v, s)
        )
        assert twin.status == "miss" and twin.probe is not None
        assert twin.probe.entry.id == entry_id and twin.probe.similarity == 0.0
    key = keys.text_key("t1", "ns", "How can I turn on 2FA?")
    query = at_similarity(v, 0.9)
    assert engine.lookup(key, vector=query).status == "miss"
    for i in range(60):  # wrong candidates far below, right ones from 0.9 up
        feedback(cache, entry_id, 0.3 + 0.01 * i, "wrong")
        feedback(cache, entry_id, 0.9 + 0.001 * i, "correct")
    learned = engine.lookup(key, vector=query)
    assert learned.status == "semantic_hit" and learned.threshold == pytest.approx(0.90)
    # Wrong ones at 0.9 that are more than 5 % of all wrong ones: the threshold goes back up.
    for _ in range(10):
        feedback(cache, entry_id, 0.905, "wrong")
    assert engine.lookup(key, vector=query).status == "miss"


def test_an_adaptive_namespace_with_a_verifier_learns_its_probability_cut(
    cache: LocalCache,
) -> None:
    """With a verifier, labels are filed under its probability and the cut is what is learned;
    the threshold stays the configured gate."""
    engine = cache.engine
    overlap = '{"format":1,"weights":{"word_jaccard":40.0},"bias":-20.4,"cut":0.5}'
    settings = {"threshold": 0.8, "verifier": overlap, "adaptive_delta": 0.1}
    cache.propose(engine.prepare_config(settings, "t1", "ns"))
    v = unit_vector("stored")
    entry_id = put(cache, "reset my password", v)
    # Word Jaccard 0.5: probability sigmoid(40 * 0.5 - 20.4) = 0.401, under the cut 0.5.
    key = keys.text_key("t1", "ns", "reset my cat")
    first = engine.lookup(key, vector=at_similarity(v, 0.9))
    assert first.status == "miss" and first.threshold == 0.8
    assert first.rejected == ((entry_id, "verifier"),)
    assert first.probe is not None and first.probe.label_at == pytest.approx(0.401, abs=1e-3)
    hit = engine.lookup(keys.text_key("t1", "ns", "reset my password now"), vector=v.tolist())
    assert hit.status == "semantic_hit" and hit.hit is not None
    assert hit.hit.label_at == hit.hit.score and hit.hit.label_at > 0.99
    # Below the gate the verifier never runs: the probe is filed under 0.
    low = engine.lookup(key, vector=at_similarity(v, 0.5))
    assert low.probe is not None and low.probe.label_at == 0.0
    for i in range(60):  # wrong ones at low probabilities, right ones from 0.40 up
        feedback(cache, entry_id, 0.05 + 0.005 * i, "wrong")
        feedback(cache, entry_id, 0.40 + 0.005 * i, "correct")
    learned = engine.lookup(key, vector=at_similarity(v, 0.9))
    assert learned.status == "semantic_hit" and learned.threshold == 0.8
    assert learned.hit is not None and learned.hit.label_at == pytest.approx(0.401, abs=1e-3)


def test_feedback_learning_is_deterministic_and_survives_entry_deletion(tmp_path: Path) -> None:
    """Two replicas applying the same log hold the same histograms (same digest); a label on an
    entry deleted meanwhile still counts in the namespace the proposer saw."""
    log: list[bytes] = []
    with LocalCache(tmp_path / "a", embedders={}) as a:
        e = a.engine
        for make in (
            lambda: e.prepare_config({"embedder": "supplied"}),
            lambda: e.prepare_tenant("t1"),
            lambda: e.prepare_put(
                keys.text_key("t1", "ns", "q"), b"{}", vector=unit_vector("q").tolist()
            ),
        ):
            command = make()
            log.append(c.encode(command))
            assert a.propose(command).ok
        late = e.prepare_feedback("t1", 1, "wrong", similarity=0.9)
        assert late.namespace == "ns"
        for command in (
            e.prepare_feedback("t1", 1, "correct", similarity=0.95),
            e.prepare_feedback("t1", 1, "correct"),  # no similarity: kept, not learned
            e.prepare_delete("t1", [1]),
            late,
        ):
            log.append(c.encode(command))
            assert a.propose(command).ok
        with LocalCache(tmp_path / "b", embedders={}) as b:
            for data in log:
                assert b.propose(c.decode(data)).ok
            assert a.store.digest() == b.store.digest()
            labels = b.engine.labels("t1", "ns")
            assert labels.correct[adaptive.bucket(0.95)] == 1
            assert labels.wrong[adaptive.bucket(0.9)] == 1 and labels.total == 2
            assert b.propose(
                b.engine.prepare_feedback("t1", 1, "correct", similarity=0.5)
            ).value == {
                "learned": False  # entry gone, no namespace known
            }
            b.propose(c.TenantDelete(tenant="t1"))
            b.propose(b.engine.prepare_tenant("t1"))
            assert b.engine.labels("t1", "ns").total == 0


def test_feedback_similarity_out_of_range_is_malformed() -> None:
    bad = c.Feedback(tenant="t1", entry_id=1, label="correct", similarity=1.5)
    with pytest.raises(MalformedCommand, match="similarity"):
        c.decode(c.encode(bad))

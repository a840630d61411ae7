"""The learned verifier: features, the stored form, training, and its decisions in the real
engine (LocalCache with LMDB, state machine and indexes; caller-supplied vectors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcache.node import keys
from llmcache.node import verifier as learned
from llmcache.node.errors import InvalidRequest
from llmcache.node.local import LocalCache
from tests.conftest import unit_vector
from tests.test_quality_engine import at_similarity, put

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)


@given(texts, texts, st.floats(-1, 1), st.one_of(st.none(), st.floats(-1, 1)))
def test_features_are_finite_ordered_and_pure(a: str, b: str, cos: float, rr: float | None) -> None:
    values = learned.features(a, b, cos, rr)
    assert len(values) == len(learned.FEATURES)
    assert all(math.isfinite(v) for v in values)
    assert values == learned.features(a, b, cos, rr)
    by_name = dict(zip(learned.FEATURES, values, strict=True))
    assert by_name["cosine"] == cos
    if rr is None:
        assert by_name["rerank_cosine"] == by_name["cosine_x_rerank"] == 0.0
    assert 0.0 <= by_name["word_jaccard"] <= 1.0 and 0.0 <= by_name["char3_jaccard"] <= 1.0


def test_features_see_what_a_cosine_does_not() -> None:
    def f(a: str, b: str) -> dict[str, float]:
        return dict(zip(learned.FEATURES, learned.features(a, b, 0.9), strict=True))

    same = f("How do I learn Python quickly?", "How can I learn Python quickly?")
    other = f("How did God create the universe?", "Why did God create the universe?")
    assert same["same_question_type"] == 1.0 and other["same_question_type"] == 0.0
    assert same["content_jaccard"] == 1.0
    rare = f("What is photosynthesis?", "What is chemosynthesis?")
    assert rare["only_one_long"] == rare["only_one_count"] == 2.0
    assert rare["content_jaccard"] == 0.0
    assert f("price in 2023", "price in 2024")["numbers"] == 1.0


weights = st.lists(
    st.floats(-50, 50), min_size=len(learned.FEATURES), max_size=len(learned.FEATURES)
)


@given(
    weights,
    st.floats(-50, 50),
    st.floats(0, 1),
    st.sets(st.sampled_from(learned.FEATURES), min_size=1),
    st.from_regex(learned.DIGEST, fullmatch=True),
)
def test_stored_form_round_trips_exactly(
    w: list[float], bias: float, cut: float, used: set[str], digest: str
) -> None:
    v = learned.Verifier(
        tuple((n, x) for n, x in zip(learned.FEATURES, w, strict=True) if n in used),
        bias,
        cut,
        digest if used & learned.CROSS_FEATURES else "",
    )
    back = learned.Verifier.loads(v.dumps())
    assert back == v
    assert learned.parse(v.dumps()) == v


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ('{"format": 2, "weights": {"cosine": 1}, "bias": 0}', "format 1"),
        ('{"format": 1, "weights": {}, "bias": 0}', "non-empty"),
        ('{"format": 1, "weights": {"shoe_size": 1}, "bias": 0}', "shoe_size"),
        ('{"format": 1, "weights": {"cosine": "1"}, "bias": 0}', "finite numbers"),
        ('{"format": 1, "weights": {"cosine": 1}, "bias": 0, "cut": 2}', "between 0 and 1"),
        ('{"format": 1, "weights": {"cosine": 1e999}, "bias": 0}', "finite numbers"),
    ],
)
def test_bad_stored_verifiers_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(learned.VerifierError, match=message):
        learned.Verifier.loads(text)


def test_fit_learns_a_rule_and_folds_its_scaling_into_the_weights() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (600, 2)) * [1.0, 100.0]  # second column on another scale
    y = (x[:, 0] * 3 - x[:, 1] / 50) > 0.5  # a linear rule with no noise
    names = ["cosine", "word_jaccard"]
    v = learned.fit(x, y, names, l2=0.01)
    predicted = learned.probabilities(v, x, names) >= 0.5
    assert (predicted == y).mean() > 0.97
    by_name = dict(v.weights)
    assert by_name["cosine"] > 0 > by_name["word_jaccard"]
    # The vectorised and the per-pair (engine) paths agree on raw features.
    full = np.zeros((len(x), len(learned.FEATURES)))
    full[:, 0], full[:, learned.FEATURES.index("word_jaccard")] = x[:, 0], x[:, 1]
    for row, p in zip(full[:20], learned.probabilities(v, x[:20], names), strict=True):
        assert v.probability(row.tolist()) == pytest.approx(p, rel=1e-12)


def test_fit_refuses_one_class() -> None:
    with pytest.raises(ValueError, match="both"):
        learned.fit(np.zeros((4, 1)), np.ones(4, bool), ["cosine"])


# -- in the engine ----------------------------------------------------------------------------

# Accepts a pair when its words overlap (Jaccard >= 0.5), whatever the cosine.
OVERLAP = learned.Verifier((("word_jaccard", 40.0),), -20.0, 0.5)


def test_the_verifier_decides_candidates_in_the_engine(cache: LocalCache) -> None:
    engine = cache.engine
    cache.propose(
        engine.prepare_config({"threshold": 0.8, "verifier": OVERLAP.dumps()}, "t1", "ns")
    )
    base = unit_vector("base")
    entry = put(cache, "how do I reset my password", base)
    near = at_similarity(base, 0.95)
    hit = engine.lookup(keys.text_key("t1", "ns", "how can I reset my password"), vector=near)
    assert hit.status == "semantic_hit" and hit.hit is not None and hit.hit.entry.id == entry
    miss = engine.lookup(keys.text_key("t1", "ns", "what is a good pasta recipe"), vector=near)
    assert miss.status == "miss" and miss.rejected == ((entry, "verifier"),)
    low = engine.lookup(
        keys.text_key("t1", "ns", "how do I reset my password?"), vector=at_similarity(base, 0.7)
    )
    assert low.status == "miss" and low.rejected == ()  # below the threshold: never verified


def test_a_vetoed_best_candidate_lets_the_next_verified_one_hit(cache: LocalCache) -> None:
    engine = cache.engine
    settings = {"threshold": 0.5, "top_k": 2, "verifier": OVERLAP.dumps()}
    cache.propose(engine.prepare_config(settings, "t1", "ns"))
    base = unit_vector("b2")
    far = put(cache, "completely different words here", base)
    close = put(cache, "reset my password please", np.asarray(at_similarity(base, 0.9), np.float32))
    found = engine.lookup(keys.text_key("t1", "ns", "reset my password"), vector=base.tolist())
    assert [h.entry.id for h in found.candidates] == [far, close]
    assert found.hit is not None and found.hit.entry.id == close
    assert found.rejected == ((far, "verifier"),)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(texts.filter(str.strip), st.floats(0.5, 0.99)), min_size=1, max_size=6))
def test_engine_decisions_equal_the_pure_function(
    tmp_path_factory: pytest.TempPathFactory, queries: list[tuple[str, float]]
) -> None:
    stored = "how do I reset my password"
    verifier = learned.Verifier(
        (("cosine", 8.0), ("word_jaccard", 6.0), ("question_type", -3.0)), -9.0, 0.5
    )
    with LocalCache(tmp_path_factory.mktemp("v"), embedders={}, durable=False) as cache:
        engine = cache.engine
        cache.propose(engine.prepare_config({"embedder": "supplied"}))
        cache.propose(engine.prepare_tenant("t1"))
        cache.propose(
            engine.prepare_config({"threshold": 0.4, "verifier": verifier.dumps()}, "t1", "ns")
        )
        base = unit_vector("p")
        put(cache, stored, base)
        for i, (text, s) in enumerate(queries):
            found = engine.lookup(
                keys.text_key("t1", "ns", text), vector=at_similarity(base, s, seed=str(i))
            )
            best = found.candidates[0]
            probability = verifier.probability(learned.features(text, stored, best.similarity))
            expect = text == stored or probability >= verifier.cut
            assert (found.status != "miss") == expect


@pytest.mark.parametrize(
    "value", ["{", '{"format": 1, "weights": {"x": 1}, "bias": 0}', "x" * 5000]
)
def test_a_bad_verifier_setting_is_refused_naming_the_field(cache: LocalCache, value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        cache.engine.prepare_config({"verifier": value}, "t1", "ns")
    assert info.value.field == "verifier"

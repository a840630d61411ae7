"""The harness's checkers on hand-made histories: known linearizable and known
non-linearizable register histories (with info operations), stale-read bounds, lost and
duplicated set elements, availability gaps."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from jepsen_like import checkers, wgl
from jepsen_like.history import History, Op, pair, windows

INF = math.inf


def w(value: object, call: float, ret: float) -> wgl.RegOp:
    return wgl.RegOp("write", value, call, ret)


def r(value: object, call: float, ret: float) -> wgl.RegOp:
    return wgl.RegOp("read", value, call, ret)


def test_sequential_history_is_linearizable() -> None:
    assert wgl.check([w(1, 0, 1), r(1, 2, 3), w(2, 4, 5), r(2, 6, 7)]) is True


def test_read_of_an_overwritten_value_is_rejected() -> None:
    # write 1, then write 2 completes, then a read returns 1: a stale read.
    assert wgl.check([w(1, 0, 1), w(2, 2, 3), r(1, 4, 5)]) is False


def test_read_of_absent_after_an_acknowledged_write_is_rejected() -> None:
    assert wgl.check([w(1, 0, 1), r(None, 2, 3)]) is False


def test_concurrent_operations_may_take_effect_in_either_order() -> None:
    assert wgl.check([w(1, 0, 10), r(None, 1, 2), r(1, 3, 4), w(2, 5, 6), r(2, 7, 8)]) is True


def test_a_value_cannot_be_unseen() -> None:
    # Two reads after the write began: new value, then the old one again.
    assert wgl.check([w(1, 0, 10), r(1, 1, 2), r(None, 3, 4)]) is False


def test_info_write_may_have_happened() -> None:
    assert wgl.check([w(1, 0, INF), r(1, 5, 6)]) is True


def test_info_write_may_not_have_happened() -> None:
    assert wgl.check([w(1, 0, INF), r(None, 5, 6), r(None, 7, 8)]) is True


def test_info_write_cannot_happen_before_it_was_called() -> None:
    assert wgl.check([r(1, 0, 1), w(1, 2, INF)]) is False


def test_info_write_seen_then_unseen_is_rejected() -> None:
    assert wgl.check([w(1, 0, INF), r(1, 5, 6), r(None, 7, 8)]) is False


def test_search_budget_gives_unknown() -> None:
    ops = [w(i, 0, 100) for i in range(12)] + [r(None, 101, 102)]
    assert wgl.check(ops, max_steps=10) is None


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_histories_from_a_real_register_are_accepted(data: st.DataObject) -> None:
    """Run a register in one order, then widen each operation's window around its
    linearization point: the checker must find an order again."""
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    count = data.draw(st.integers(1, 12))
    state, ops = None, []
    for i in range(count):
        point = float(i * 10)
        call, ret = point - rng.uniform(0, 15), point + rng.uniform(0, 15)
        if rng.random() < 0.5:
            state = i
            info = rng.random() < 0.2
            ops.append(w(i, call, INF if info else ret))
        else:
            ops.append(r(state, call, ret))
    assert wgl.check(ops) is True


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32))
def test_a_stale_read_after_real_history_is_rejected(seed: int) -> None:
    """A sequential history plus, at the end, a read of a value overwritten before it."""
    rng = random.Random(seed)
    ops = [w(i, i * 10.0, i * 10.0 + 5) for i in range(rng.randint(2, 8))]
    old = rng.randrange(len(ops) - 1)
    ops.append(r(old, 1000.0, 1001.0))
    assert wgl.check(ops) is False


def op(
    f: str, key: str, value: object, call: float, ret: float, type_: str = "ok", **extra: object
) -> Op:
    return Op(0, f, key, value, call, ret, type_, "n0", dict(extra))


def test_stale_reads_measured_from_the_newer_acknowledged_write() -> None:
    ops = [
        op("write", "k", "a", 0, 1, id=1),
        op("write", "k", "b", 2, 3, id=2),
        op("read", "k", "a", 5.5, 6, id=1),  # b was acknowledged 2.5 s before this read
        op("read", "k", "b", 7, 8, id=2),
    ]
    result = checkers.stale_reads(ops, bound_s=2.0)
    assert result["stale_reads"] == 1 and result["max_staleness_s"] == 2.5
    assert result["valid"] is False
    assert checkers.stale_reads(ops, bound_s=3.0)["valid"] is True


def test_linearizable_checker_names_the_bad_key() -> None:
    ops = [
        op("write", "good", "x", 0, 1),
        op("read", "good", "x", 2, 3),
        op("write", "bad", "y", 0, 1),
        op("read", "bad", None, 2, 3),
        op("read", "bad", None, 4, INF, "info"),  # a read without a result is ignored
    ]
    result = checkers.linearizable(ops)
    assert result["valid"] is False and result["non_linearizable_keys"] == ["bad"]


def test_set_checker_finds_lost_duplicated_and_unexpected() -> None:
    ops = [
        op("add", "s1", "s1", 0, 1, id=1),
        op("add", "s2", "s2", 0, 1, id=2),
        op("add", "s3", "s3", 0, INF, "info"),
        op("add", "s4", "s4", 0, 1, id=4, duplicate_of=3),
    ]
    good = {"n0": {"s1": 1, "s2": 2, "s4": 4}, "n1": {"s1": 1, "s2": 2, "s3": 3, "s4": 4}}
    result = checkers.set_checker(ops, good)
    assert result["valid"] is True and result["retries_deduplicated"] == 1
    bad = {"n0": {"s1": 1, "s4": 9, "zz": 7}}
    result = checkers.set_checker(ops, bad)
    assert result["valid"] is False
    assert result["lost"] == {"n0": ["s2"]}
    assert result["duplicated"] == ["n0:s4"] and result["unexpected"] == {"n0": ["zz"]}


def test_availability_gap_and_failover() -> None:
    ops = [op("write", "k", i, t, t + 0.1) for i, t in enumerate([0.0, 1.0, 5.0, 5.5])]
    result = checkers.availability(ops, [(1.5, 3.0, "kill-leader")], end=6.0, max_gap_s=2.0)
    assert result["max_write_gap_s"] == 4.0 and result["valid"] is False
    assert result["failover"] == [{"fault": "kill-leader", "at": 1.5, "next_ack_s": 3.6}]


def test_history_pairs_and_windows() -> None:
    history = History()
    a = history.invoke(1, "write", "k", "v", "n0")
    history.nemesis("start", "kill-leader")
    b = history.invoke(2, "read", "k", None, "n1")
    history.complete(b, "ok", "v", id=3)
    history.complete(a, "ok", "v", id=3)
    history.invoke(3, "write", "k", "never", "n2")
    history.nemesis("stop", "kill-leader")
    ops = pair(history.events)
    assert [(o.f, o.type, o.value) for o in ops] == [
        ("write", "ok", "v"),
        ("read", "ok", "v"),
        ("write", "info", "never"),
    ]
    assert ops[2].ret == INF and ops[1].extra == {"id": 3}
    spans = windows(history.events, end=99.0)
    assert len(spans) == 1 and spans[0][2] == "kill-leader"


def test_cache_checker_flags_disagreement_and_expired_entries() -> None:
    ops = [
        op("put", "c1", {"ttl_s": 3, "tag": "t0"}, 0, 1),
        op("put", "c2", {"ttl_s": 0, "tag": "t1"}, 0, 1),
        op("put", "c3", {"ttl_s": 0, "tag": "t2"}, 0, 1),
        op("invalidate", None, "t2", 2, 3),
    ]
    good = {
        "n0": {"c1": False, "c2": True, "c3": False},
        "n1": {"c1": False, "c2": True, "c3": False},
    }
    assert checkers.cache_checker(ops, good)["valid"] is True
    bad = {
        "n0": {"c1": True, "c2": True, "c3": False},
        "n1": {"c1": False, "c2": False, "c3": False},
    }
    result = checkers.cache_checker(ops, bad)
    assert result["valid"] is False
    assert result["expired_but_present"] == ["c1"] and len(result["nodes_disagree"]) == 2


def test_schedules_are_bounded_and_random_ones_follow_the_seed() -> None:
    from typing import Any, cast

    from jepsen_like.nemesis import Nemesis, Schedule

    nemeses = [Nemesis(n, cast(Any, None), cast(Any, None), History()) for n in ("a", "b")]

    def plan(kind: str, seed: int) -> list[tuple[float, float, str]]:
        schedule = Schedule(nemeses, kind, 120.0, seed, History(), interval_s=10.0)
        return [(start, length, n.name) for start, length, n in schedule.plan()]

    assert len(plan("single", 1)) == 1
    assert [name for _, _, name in plan("alternating", 1)][:4] == ["a", "b", "a", "b"]
    assert plan("random", 5) == plan("random", 5) != plan("random", 6)
    for kind in ("single", "alternating", "random"):
        windows = plan(kind, 3)
        assert all(start > 0 and start + length <= 120.0 for start, length, _ in windows)
        ends = [start + length for start, length, _ in windows]
        assert all(end <= nxt for end, (nxt, _, _) in zip(ends, windows[1:], strict=False))


def test_cache_checker_rejects_an_expired_probe_seen_on_one_node() -> None:
    ops = [op("put", "c1", {"ttl_s": 0, "tag": "t0"}, 0, 1)]
    final: dict[str, object] = {"n0": {"c1": True}, "n1": {"c1": True}}
    assert checkers.cache_checker(ops, final | {"ttl_probe": {"n0": "MISS", "n1": "MISS"}})["valid"]
    skewed = checkers.cache_checker(ops, final | {"ttl_probe": {"n0": "MISS", "n1": "HIT"}})
    assert skewed["valid"] is False and skewed["ttl_probe"]["n1"] == "HIT"

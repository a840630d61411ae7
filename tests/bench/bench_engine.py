"""In-process benchmark of the node core: engine lookups, put apply rate, memory, rebuild, embedder.

    python tests/bench/bench_engine.py [--sizes 10000,100000] [--put-n 20000] [--no-embedder]
                                       [--profile] [--json out.json]

Everything runs in one process per case (a fresh child process each, so RSS deltas are not hidden
by another case's freed heap) over a real LMDB store, state machine, index feed and engine
(:class:`LocalCache`), 384-d vectors, 1 KB responses, the default TTL (with its expiry row).

* **scope N** (``--sizes``): N entries in ONE scope of a namespace whose embedder is
  ``supplied`` (callers send vectors), loaded in batches of ``--batch`` puts per transaction
  (``durable=False``), the index caught up after every batch as a lookup would. Then:
  exact lookup latency (``Engine.lookup`` of a stored key, no vector: exact hits never embed);
  semantic lookup latency at top_k 1 with a caller vector (cosine ~0.95 to a stored one, a text
  that is not stored) end to end (LMDB reads included), with the vector as a float32 array and as
  a JSON-style list; ``IndexSet.search`` alone (k=5, what the engine asks for top_k 1); memory
  per entry beyond the 1,536 B vector (RSS and anonymous RSS deltas, ``IndexSet.memory_bytes()``);
  LMDB bytes per entry; ``IndexFeed.rebuild`` rate.
* **put**: ``--put-n`` Put commands made by ``Engine.prepare_put`` (timed on their own), encoded
  as log entries, then applied through ``StateMachine.apply_batch`` in batches, with
  ``IndexFeed.catch_up`` after each batch: entries/s for apply alone and apply + index, with
  ``durable`` False and True, into one scope (an hnswlib graph) and into scopes of 10 entries
  (flat indexes).
* **embedder**: the real default embedder: single short query latency, batch-32 throughput, and
  a semantic lookup that embeds its text (``--no-embedder`` skips it).

Targets are printed beside the numbers, not asserted. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from llmcache.cluster import commands as c
from llmcache.node import keys
from llmcache.node.local import LocalCache

DIM = 384
VECTOR_BYTES = DIM * 4
RESPONSE = b'{"answer": "' + b"x" * (1024 - 14) + b'"}'  # 1 KB
TENANT, NAMESPACE = "bench", "ns"
PARAMS = {"model": "bench-model", "temperature": 0}
TARGET_SEMANTIC_P99_US = 1000.0  # at 1M entries in one scope
TARGET_PUT_RATE = 5000.0  # entries/s
TARGET_BYTES_BEYOND_PAYLOAD = 2500.0

T = TypeVar("T")
Vectors = npt.NDArray[np.float32]
Result = dict[str, Any]


# -- helpers ----------------------------------------------------------------------------------


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory() -> tuple[int, int]:
    """(RSS, anonymous RSS) after collecting and handing glibc's free heap back."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return proc_status("VmRSS"), proc_status("RssAnon")


def percentiles(ns: list[int]) -> tuple[float, float]:
    """p50 and p99 in microseconds."""
    p50, p99 = np.percentile(np.array(ns, np.float64) / 1000.0, [50, 99])
    return float(p50), float(p99)


def timed(fn: Callable[[T], object], items: Iterable[T]) -> list[int]:
    """Nanoseconds of ``fn(item)`` for each item."""
    out = []
    for item in items:
        t = time.perf_counter_ns()
        fn(item)
        out.append(time.perf_counter_ns() - t)
    return out


def batch_vectors(seed: int, n: int) -> Vectors:
    """``n`` random unit vectors, reproducible from ``seed`` (one seed per load batch)."""
    v = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    out: Vectors = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def near(v: Vectors, noise: float, rng: np.random.Generator) -> Vectors:
    w = v + noise * rng.standard_normal(v.shape, dtype=np.float32) / np.sqrt(DIM)
    out: Vectors = (w / np.linalg.norm(w)).astype(np.float32)
    return out


def prompt(i: int) -> str:
    return f"bench question number {i}: how do I configure the cache for my application?"


def new_cache(path: Path, durable: bool, embedders: dict[str, Any] | None = None) -> LocalCache:
    cache = LocalCache(path, embedders=embedders or {}, durable=durable)
    e = cache.engine
    if not embedders:
        cache.propose(e.prepare_config({"embedder": "supplied"}))
    cache.propose(e.prepare_tenant(TENANT))
    return cache


def apply_encoded(cache: LocalCache, entries: list[bytes]) -> list[int]:
    """Apply encoded commands as the next log entries, in one transaction; their new ids."""
    start = cache.store.applied_index() + 1
    results = cache.fsm.apply_batch([(start + i, data) for i, data in enumerate(entries)])
    ids = []
    for r in results:
        if not r.ok:
            raise RuntimeError(f"apply failed: {r}")
        ids.append(r.value["id"])
    return ids


def lmdb_bytes(cache: LocalCache) -> dict[str, int]:
    info, stat = cache.store.env.info(), cache.store.env.stat()
    data = cache.path / "store" / "data.mdb"
    st = data.stat()
    out = {
        "used": (info["last_pgno"] + 1) * stat["psize"],
        "file": st.st_size,
        "allocated": st.st_blocks * 512,
    }
    with cache.store.read() as txn:
        for name in ("entries", "vectors"):
            db = txn.stat(cache.store.dbs[name])
            pages = db["branch_pages"] + db["leaf_pages"] + db["overflow_pages"]
            out[name] = pages * stat["psize"]
    return out


@contextmanager
def profiled(enabled: bool, title: str) -> Iterator[None]:
    if not enabled:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(f"--- cProfile: {title} (sorted by own time) ---")
        print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))


# -- case: N entries in one scope -------------------------------------------------------------


def case_scope(n: int, batch: int, queries: int, profile: bool) -> Result:
    res: Result = {"n": n, "batch": batch}
    with tempfile.TemporaryDirectory(prefix="llmcache-bench-") as tmp:
        cache = new_cache(Path(tmp), durable=False)
        engine, feed = cache.engine, cache.feed
        rss0, anon0 = memory()
        prepare_s = apply_s = index_s = 0.0
        ids = np.empty(n, np.int64)
        for lo in range(0, n, batch):
            m = min(batch, n - lo)
            vecs = batch_vectors(lo, m)
            batch_keys = [
                keys.text_key(TENANT, NAMESPACE, prompt(lo + j), PARAMS) for j in range(m)
            ]
            t0 = time.perf_counter()
            entries = [
                c.encode(engine.prepare_put(k, RESPONSE, vector=v))
                for k, v in zip(batch_keys, vecs, strict=True)
            ]
            t1 = time.perf_counter()
            ids[lo : lo + m] = apply_encoded(cache, entries)
            t2 = time.perf_counter()
            feed.catch_up()
            t3 = time.perf_counter()
            prepare_s += t1 - t0
            apply_s += t2 - t1
            index_s += t3 - t2
            if lo and lo % 100_000 == 0:
                print(f"  loaded {lo:,}", flush=True)
        del entries, vecs, batch_keys
        rss1, anon1 = memory()
        res.update(
            prepare_rate=n / prepare_s,
            apply_rate=n / apply_s,
            index_rate=n / index_s,
            apply_index_rate=n / (apply_s + index_s),
            index_bytes_beyond=feed.indexes.memory_bytes() / n - VECTOR_BYTES,
            rss_beyond=(rss1 - rss0) / n - VECTOR_BYTES,
            anon_beyond=(anon1 - anon0) / n - VECTOR_BYTES,
        )
        disk = lmdb_bytes(cache)
        text_bytes = len(prompt(n // 2).encode())
        res.update(
            lmdb_used_per_entry=disk["used"] / n,
            lmdb_file_per_entry=disk["allocated"] / n,
            lmdb_beyond_payload=disk["used"] / n - len(RESPONSE) - VECTOR_BYTES - text_bytes,
            lmdb_entries_db_per_entry=disk["entries"] / n,
            lmdb_vectors_db_per_entry=disk["vectors"] / n,
        )
        print(
            f"N={n:,}: load prepare_put {res['prepare_rate']:,.0f}/s, apply "
            f"{res['apply_rate']:,.0f}/s, index catch-up {res['index_rate']:,.0f}/s, "
            f"apply+index {res['apply_index_rate']:,.0f}/s",
            flush=True,
        )

        rng = np.random.default_rng(12345)
        picks = rng.integers(0, n, queries)
        scope = keys.text_key(TENANT, NAMESPACE, prompt(0), PARAMS).scope_key

        # Exact: a stored key, no vector.
        exact_keys = [keys.text_key(TENANT, NAMESPACE, prompt(int(i)), PARAMS) for i in picks]
        for k in exact_keys[:100]:  # warm up
            engine.lookup(k)
        lat = timed(engine.lookup, exact_keys)
        res["exact_p50"], res["exact_p99"] = percentiles(lat)
        assert engine.lookup(exact_keys[0]).status == "hit"

        # Semantic: a text not stored, a vector near a stored entry's.
        qvecs = np.stack(
            [
                near(batch_vectors(int(i) - int(i) % batch, batch)[int(i) % batch], 0.3, rng)
                for i in picks
            ]
        )
        qkeys = [
            keys.text_key(TENANT, NAMESPACE, f"paraphrase {j}", PARAMS) for j in range(queries)
        ]
        found = [engine.lookup(k, vector=q) for k, q in zip(qkeys, qvecs, strict=True)]
        res["semantic_hit_rate"] = float(np.mean([f.status == "semantic_hit" for f in found]))
        res["semantic_correct"] = float(
            np.mean(
                [
                    bool(f.hit and f.hit.entry.id == ids[i])
                    for f, i in zip(found, picks, strict=True)
                ]
            )
        )
        lat = timed(lambda j: engine.lookup(qkeys[j], vector=qvecs[j]), range(queries))
        res["semantic_p50"], res["semantic_p99"] = percentiles(lat)
        qlists = [q.tolist() for q in qvecs]
        lat = timed(lambda j: engine.lookup(qkeys[j], vector=qlists[j]), range(queries))
        res["semantic_list_p50"], res["semantic_list_p99"] = percentiles(lat)
        for k in (5, 1):
            lat = timed(lambda q, k=k: feed.indexes.search(scope, q, k), qvecs)
            res[f"search{k}_p50"], res[f"search{k}_p99"] = percentiles(lat)
        print(
            f"  exact lookup p50 {res['exact_p50']:.0f} us, p99 {res['exact_p99']:.0f} us; "
            f"semantic lookup p50 {res['semantic_p50']:.0f} us, p99 {res['semantic_p99']:.0f} us "
            f"(list vector: {res['semantic_list_p50']:.0f} / {res['semantic_list_p99']:.0f} us; "
            f"hit {res['semantic_hit_rate']:.3f}, right entry {res['semantic_correct']:.3f}); "
            f"IndexSet.search k=5 p50 {res['search5_p50']:.0f} us, p99 {res['search5_p99']:.0f} us",
            flush=True,
        )
        if profile:
            with profiled(True, f"{queries} exact lookups, N={n:,}"):
                for k in exact_keys:
                    engine.lookup(k)
            with profiled(True, f"{queries} semantic lookups, N={n:,}"):
                for k, q in zip(qkeys, qvecs, strict=True):
                    engine.lookup(k, vector=q)

        t0 = time.perf_counter()
        feed.rebuild()
        res["rebuild_rate"] = n / (time.perf_counter() - t0)
        print(
            f"  memory beyond the {VECTOR_BYTES} B vector: IndexSet.memory_bytes() "
            f"{res['index_bytes_beyond']:,.0f} B/entry, "
            f"RSS delta {res['rss_beyond']:,.0f} B/entry, "
            f"anonymous RSS delta {res['anon_beyond']:,.0f} B/entry; LMDB "
            f"{res['lmdb_used_per_entry']:,.0f} B/entry used ({res['lmdb_beyond_payload']:,.0f} "
            f"beyond response+vector+text), {res['lmdb_file_per_entry']:,.0f} B/entry on disk; "
            f"rebuild {res['rebuild_rate']:,.0f} entries/s",
            flush=True,
        )
        cache.close(checkpoint=False)
    return res


# -- case: put apply rate ---------------------------------------------------------------------


def case_put(n: int, batch: int, durable: bool, per_scope: int) -> Result:
    res: Result = {"n": n, "batch": batch, "durable": durable, "per_scope": per_scope}
    with tempfile.TemporaryDirectory(prefix="llmcache-bench-") as tmp:
        cache = new_cache(Path(tmp), durable=durable)
        engine = cache.engine
        vecs = batch_vectors(7, n)
        put_keys = [
            keys.text_key(TENANT, NAMESPACE, prompt(i), {**PARAMS, "scope": i // per_scope})
            for i in range(n)
        ]
        t0 = time.perf_counter()
        puts = [
            engine.prepare_put(k, RESPONSE, vector=v) for k, v in zip(put_keys, vecs, strict=True)
        ]
        res["prepare_rate"] = n / (time.perf_counter() - t0)
        entries = [c.encode(p) for p in puts]
        del puts
        apply_s = index_s = 0.0
        for lo in range(0, n, batch):
            t1 = time.perf_counter()
            apply_encoded(cache, entries[lo : lo + batch])
            t2 = time.perf_counter()
            cache.feed.catch_up()
            t3 = time.perf_counter()
            apply_s += t2 - t1
            index_s += t3 - t2
        res["apply_rate"] = n / apply_s
        res["apply_index_rate"] = n / (apply_s + index_s)
        scopes = "one scope" if per_scope >= n else f"scopes of {per_scope}"
        print(
            f"put x{n:,} ({scopes}, {batch} per transaction, durable={durable}): prepare_put "
            f"{res['prepare_rate']:,.0f}/s, apply {res['apply_rate']:,.0f}/s, apply+index "
            f"{res['apply_index_rate']:,.0f}/s",
            flush=True,
        )
        cache.close(checkpoint=False)
    return res


# -- case: embedder ---------------------------------------------------------------------------

PHRASES = [
    "how do i reset my password",
    "what is the capital of france",
    "explain caching to a child",
    "write a poem about the sea",
    "summarise this article in three sentences",
    "translate hello",
]
WORDS = " ".join(PHRASES).split()


def sentences(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 15)))) for _ in range(n)]


def case_embedder(queries: int) -> Result:
    from llmcache.node.embed import default_embedder

    res: Result = {}
    emb = default_embedder()
    emb.embed(["warm up"])
    rng = np.random.default_rng(0)
    lat = timed(lambda text: emb.embed([text]), sentences(rng, queries))
    res["single_p50"], res["single_p99"] = percentiles(lat)
    batches = [sentences(rng, 32) for _ in range(20)]
    t0 = time.perf_counter()
    for b in batches:
        emb.embed(b)
    res["batch32_rate"] = 32 * len(batches) / (time.perf_counter() - t0)

    # A lookup that embeds its text: default-embedder namespace, 1,000 entries in one scope.
    with tempfile.TemporaryDirectory(prefix="llmcache-bench-") as tmp:
        cache = new_cache(Path(tmp), durable=False, embedders={"default": emb})
        engine = cache.engine
        vecs = batch_vectors(3, 1000)
        cache.propose_many(
            [
                engine.prepare_put(
                    keys.text_key(TENANT, NAMESPACE, prompt(i), PARAMS), RESPONSE, vector=vecs[i]
                )
                for i in range(1000)
            ]
        )
        qkeys = [keys.text_key(TENANT, NAMESPACE, t, PARAMS) for t in sentences(rng, queries)]
        lat = timed(engine.lookup, qkeys)
        res["lookup_embed_p50"], res["lookup_embed_p99"] = percentiles(lat)
        cache.close(checkpoint=False)
    print(
        f"embedder {emb.identity}: single short query p50 {res['single_p50'] / 1000:.2f} ms, "
        f"p99 {res['single_p99'] / 1000:.2f} ms; batch 32: {res['batch32_rate']:,.0f} texts/s; "
        f"lookup that embeds: p50 {res['lookup_embed_p50'] / 1000:.2f} ms, "
        f"p99 {res['lookup_embed_p99'] / 1000:.2f} ms",
        flush=True,
    )
    return res


# -- driver -----------------------------------------------------------------------------------


def run_child(case: str, args: argparse.Namespace) -> Result:
    """Run one case in a fresh process; its printed lines pass through, its result comes back."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--out",
        str(out),
        "--batch",
        str(args.batch),
        "--queries",
        str(args.queries),
    ]
    if args.profile:
        cmd.append("--profile")
    try:
        subprocess.run(cmd, check=True)
        result: Result = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    return result


def run_case(case: str, args: argparse.Namespace) -> Result:
    kind, _, arg = case.partition(":")
    if kind == "scope":
        return case_scope(int(arg), args.batch, args.queries, args.profile)
    if kind == "put":
        n, durable, per_scope = arg.split(",")
        return case_put(int(n), args.batch, durable == "durable", int(per_scope))
    if kind == "embedder":
        return case_embedder(min(args.queries, 500))
    raise SystemExit(f"unknown case {case!r}")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt_lat(p50: float, p99: float) -> str:
    return f"{p50:,.0f} / {p99:,.0f}"


def print_summary(results: Result, sizes: list[int]) -> None:
    scopes: list[Result] = [results["scope"][str(n)] for n in sizes]
    if scopes:
        print_scopes(scopes, sizes)
    print_puts_and_embedder(results)


def print_scopes(scopes: list[Result], sizes: list[int]) -> None:
    head = f"{'':44}" + "".join(f"{f'N={n:,}':>18}" for n in sizes) + "  target"
    print("\n== one scope, 384-d, top_k 1 (latency p50 / p99 in us) ==")
    print(head)

    def row(label: str, cells: list[str], target: str = "") -> None:
        print(f"{label:44}" + "".join(f"{x:>18}" for x in cells) + f"  {target}")

    row(
        "exact lookup (Engine.lookup, no vector)",
        [fmt_lat(r["exact_p50"], r["exact_p99"]) for r in scopes],
    )
    row(
        "semantic lookup (Engine.lookup, ndarray)",
        [fmt_lat(r["semantic_p50"], r["semantic_p99"]) for r in scopes],
        f"p99 < {TARGET_SEMANTIC_P99_US:,.0f} us at 1M",
    )
    row(
        "semantic lookup (vector as a JSON list)",
        [fmt_lat(r["semantic_list_p50"], r["semantic_list_p99"]) for r in scopes],
    )
    row(
        "IndexSet.search alone, k=5 (engine's ask)",
        [fmt_lat(r["search5_p50"], r["search5_p99"]) for r in scopes],
    )
    row("IndexSet.search alone, k=1", [fmt_lat(r["search1_p50"], r["search1_p99"]) for r in scopes])
    row(
        "semantic hit rate / right entry (cos ~0.95)",
        [f"{r['semantic_hit_rate']:.3f} / {r['semantic_correct']:.3f}" for r in scopes],
    )
    row("load: prepare_put entries/s", [f"{r['prepare_rate']:,.0f}" for r in scopes])
    row(
        "load: apply (apply_batch, durable=False) /s",
        [f"{r['apply_rate']:,.0f}" for r in scopes],
        f">= {TARGET_PUT_RATE:,.0f}/s",
    )
    row("load: index catch-up entries/s", [f"{r['index_rate']:,.0f}" for r in scopes])
    row(
        "load: apply + index entries/s",
        [f"{r['apply_index_rate']:,.0f}" for r in scopes],
        f">= {TARGET_PUT_RATE:,.0f}/s",
    )
    row(
        "index rebuild (IndexFeed.rebuild) entries/s", [f"{r['rebuild_rate']:,.0f}" for r in scopes]
    )
    row(
        "IndexSet.memory_bytes()/N - 1,536 B",
        [f"{r['index_bytes_beyond']:,.0f} B" for r in scopes],
        f"<= {TARGET_BYTES_BEYOND_PAYLOAD:,.0f} B",
    )
    row(
        "RSS delta/N - 1,536 B",
        [f"{r['rss_beyond']:,.0f} B" for r in scopes],
        f"<= {TARGET_BYTES_BEYOND_PAYLOAD:,.0f} B",
    )
    row(
        "anonymous RSS delta/N - 1,536 B",
        [f"{r['anon_beyond']:,.0f} B" for r in scopes],
        f"<= {TARGET_BYTES_BEYOND_PAYLOAD:,.0f} B",
    )
    row("LMDB used pages per entry", [f"{r['lmdb_used_per_entry']:,.0f} B" for r in scopes])
    row("  beyond response + vector + text", [f"{r['lmdb_beyond_payload']:,.0f} B" for r in scopes])
    row(
        "  of which db entries / db vectors",
        [
            f"{r['lmdb_entries_db_per_entry']:,.0f} / {r['lmdb_vectors_db_per_entry']:,.0f} B"
            for r in scopes
        ],
    )
    row("LMDB data.mdb allocated per entry", [f"{r['lmdb_file_per_entry']:,.0f} B" for r in scopes])


def print_puts_and_embedder(results: Result) -> None:
    if results.get("put"):
        print("\n== put apply rate (entries/s; Put commands prepared and encoded beforehand) ==")
        print(f"{'case':58}{'prepare_put':>12}{'apply':>10}{'apply+index':>13}  target")
        for r in results["put"]:
            scopes_label = (
                "1 scope (graph)"
                if r["per_scope"] >= r["n"]
                else f"scopes of {r['per_scope']} (flat)"
            )
            label = f"{r['n']:,} puts, {scopes_label}, {r['batch']}/txn, durable={r['durable']}"
            print(
                f"{label:58}{r['prepare_rate']:>12,.0f}{r['apply_rate']:>10,.0f}"
                f"{r['apply_index_rate']:>13,.0f}  >= {TARGET_PUT_RATE:,.0f}/s"
            )
    if results.get("embedder"):
        e = results["embedder"]
        print("\n== default embedder (latency in ms) ==")
        single = f"{e['single_p50'] / 1000:.2f} / {e['single_p99'] / 1000:.2f}"
        print(f"single short query p50 / p99:        {single}")
        print(f"batch 32 throughput:                 {e['batch32_rate']:,.0f} texts/s")
        print(
            f"lookup that embeds (1k-entry scope): {e['lookup_embed_p50'] / 1000:.2f} / "
            f"{e['lookup_embed_p99'] / 1000:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--sizes", default="10000,100000", help="entries in the one scope (1000000 takes long)"
    )
    parser.add_argument(
        "--put-n", type=int, default=20_000, help="puts per put-rate case (0 skips)"
    )
    parser.add_argument("--batch", type=int, default=100, help="puts per apply transaction")
    parser.add_argument("--queries", type=int, default=2000, help="lookups per latency figure")
    parser.add_argument("--no-embedder", action="store_true", help="skip the real embedder")
    parser.add_argument("--profile", action="store_true", help="cProfile the lookups")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        result = run_case(args.case, args)
        if args.out:
            args.out.write_text(json.dumps(result))
        return

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    print(
        f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}, load average {loadavg()}",
        flush=True,
    )
    results: Result = {
        "cpus": os.cpu_count(),
        "load_start": os.getloadavg(),
        "scope": {},
        "put": [],
    }
    for n in sizes:
        results["scope"][str(n)] = run_child(f"scope:{n}", args)
    if args.put_n:
        for per_scope in (args.put_n, 10):
            for durable in ("fast", "durable"):
                results["put"].append(run_child(f"put:{args.put_n},{durable},{per_scope}", args))
    if not args.no_embedder:
        results["embedder"] = run_child("embedder", args)
    results["load_end"] = os.getloadavg()
    print_summary(results, sizes)
    print(f"\nload average at end: {loadavg()} ({os.cpu_count()} cpus)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""``llmcache-cli`` for users, against one real node (default embedder, open access): ``cache``
and ``tenant`` commands through click's runner, exit codes that mean something, then
``export`` → wipe the node → ``import`` as real subprocesses giving identical lookups, an
interrupted import resumed, and ``bench``."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from llmcache.client import CacheClient
from llmcache.client import export as exporting
from llmcache.client.cli import main
from llmcache.client.errors import UnknownTenant
from tests.node_process import NodeProcess, free_port


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(Path(tmp_path_factory.mktemp("cli-cache")))
    try:
        yield proc.start()
    finally:
        proc.stop()


def cli(node: NodeProcess, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--url", node.url])


def as_json(result: Result) -> Any:
    assert result.stdout.strip(), result.output
    return json.loads(result.stdout)


def test_cache_commands_round_trip(node: NodeProcess) -> None:
    stored = cli(
        node,
        "cache",
        "store",
        "How do I reset my password?",
        "-n",
        "cli",
        "--response",
        "Settings → Security",
        "--tag",
        "faq",
        "--json",
    )
    assert stored.exit_code == 0, stored.output
    entry_id = as_json(stored)["id"]
    hit = cli(node, "cache", "lookup", "how can i reset my password", "-n", "cli")
    assert hit.exit_code == 0, hit.output
    assert (
        hit.stdout.startswith("SEMANTIC_HIT similarity=0.9") and "Settings → Security" in hit.stdout
    )
    exact = as_json(
        cli(node, "cache", "lookup", "How do I reset my password?", "-n", "cli", "--json")
    )
    assert exact["status"] == "HIT" and exact["entry"]["id"] == entry_id
    got = as_json(cli(node, "cache", "get", str(entry_id), "--json"))
    assert got["tags"] == ["faq"] and got["response"] == "Settings → Security"
    kv = cli(node, "cache", "store", "--key", "k1", "--response", "v1", "-n", "cli", "--ttl", "60")
    assert kv.exit_code == 0 and kv.stdout.startswith("stored entry ")
    assert cli(node, "cache", "lookup", "--key", "k1", "-n", "cli").stdout.endswith("v1\n")
    gone = cli(node, "cache", "invalidate", "--tag", "faq", "--json")
    assert gone.exit_code == 0 and as_json(gone)["deleted"] == 1
    kv_id = as_json(cli(node, "cache", "lookup", "--key", "k1", "-n", "cli", "--json"))
    assert cli(node, "cache", "delete", str(kv_id["entry"]["id"])).exit_code == 0
    missed = cli(node, "cache", "lookup", "--key", "k1", "-n", "cli", "--json")
    assert missed.exit_code == 3 and as_json(missed)["status"] == "MISS"


def test_tenant_commands_and_a_token_that_works(node: NodeProcess) -> None:
    created = cli(node, "tenant", "create", "cli-shop", "--config", '{"description": "d"}')
    assert created.exit_code == 0 and "tenant cli-shop" in created.stdout
    listed = as_json(cli(node, "tenant", "list", "--json"))
    assert "cli-shop" in {t["tenant"] for t in listed["tenants"]}
    assert "cli-shop" in cli(node, "tenant", "list").stdout
    token = cli(node, "tenant", "token", "cli-shop", "--role", "writer").stdout.strip()
    assert token.startswith("lc_")
    stored = cli(node, "cache", "store", "--key", "a", "--response", "b", "--token", token)
    assert stored.exit_code == 0, stored.output
    with CacheClient(node.url) as admin:
        assert admin.lookup(key="a", tenant="cli-shop").status == "HIT"
    assert cli(node, "tenant", "delete", "cli-shop").exit_code == 0


def test_exit_codes_and_messages(node: NodeProcess) -> None:
    refused = CliRunner().invoke(
        main, ["cache", "lookup", "x", "--url", f"http://127.0.0.1:{free_port()}"]
    )
    assert refused.exit_code == 2 and "no node answered" in refused.stderr
    wrong = CliRunner().invoke(main, ["cache", "lookup", "x", "--url", "127.0.0.1:1"])
    assert wrong.exit_code == 2 and "not an http(s)://host[:port] URL" in wrong.stderr
    unknown = cli(node, "cache", "lookup", "x", "--tenant", "nobody-here")
    assert unknown.exit_code == 1 and "unknown_tenant" in unknown.stderr
    bad_token = cli(node, "cache", "lookup", "x", "--token", "lc_not-a-token")
    assert bad_token.exit_code == 1 and "unauthorized" in bad_token.stderr
    assert cli(node, "cache", "lookup").exit_code == 2  # no selector
    assert cli(node, "cache", "lookup", "--request", "{not json").exit_code == 2
    assert cli(node, "cache", "get", "999999").exit_code == 1
    assert cli(node, "bench", "--mix", "exact=1,fast=2").exit_code == 2


# -- export / import ----------------------------------------------------------------------------

QUERIES: list[dict[str, Any]] = [
    {"text": "What is the refund policy?", "namespace": "faq"},
    {"text": "what's your policy on refunds", "namespace": "faq"},
    {"text": "Can I change my shipping address after ordering?", "namespace": "faq"},
    {"text": "can i change my shipping address after i ordered", "namespace": "faq"},
    {"text": "Tell me about the moons of Jupiter", "namespace": "faq"},
    {
        "request": {
            "model": "m",
            "temperature": 0,
            "messages": [{"role": "user", "content": "Summarise our SLA"}],
        }
    },
    {"key": "blob", "namespace": "kv"},
    {"key": "json", "namespace": "kv"},
]


def _seed(client: CacheClient) -> None:
    client.create_tenant("shop", {"description": "exported", "max_entries": 10_000})
    client.set_settings("shop", {"threshold": 0.8}, namespace="faq")
    client.store(
        "What is the refund policy?",
        "30 days.",
        namespace="faq",
        tags=["policy"],
        usage={"prompt_tokens": 7, "completion_tokens": 3},
        meta={"src": "kb"},
    )
    client.store(
        "Can I change my shipping address after ordering?",
        "Within 1 hour.",
        namespace="faq",
        ttl_s=3600,
    )
    client.store(request=QUERIES[5]["request"], response={"choices": [{"text": "99.9%"}]})
    client.store(key="blob", response=bytes(range(256)), namespace="kv")
    client.store(key="json", response={"a": 1}, namespace="kv", tags=["x", "y"])


def _answers(client: CacheClient) -> list[Any]:
    answers = []
    for query in QUERIES:
        found = client.lookup(**query)
        entry = found.entry
        answers.append(
            (
                found.status,
                None if found.similarity is None else round(found.similarity, 6),
                entry and {k: v for k, v in entry.view.items() if k not in ("id", "age_s")},
            )
        )
    return answers


def _full(client: CacheClient) -> list[dict[str, Any]]:
    views = [e.view for e in client.iter_entries(full=True)]
    return sorted(
        ({k: v for k, v in v.items() if k not in ("id", "age_s")} for v in views),
        key=lambda v: (v["namespace"], v["key"], v["text"]),
    )


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "llmcache.client.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_export_wipe_import_gives_identical_lookups(node: NodeProcess, tmp_path: Path) -> None:
    with CacheClient(node.url, tenant="shop") as client:
        _seed(client)
        before, full_before = _answers(client), _full(client)
    assert [a[0] for a in before] == [
        "HIT",
        "SEMANTIC_HIT",
        "HIT",
        "SEMANTIC_HIT",
        "MISS",
        "HIT",
        "HIT",
        "HIT",
    ]
    dump = tmp_path / "shop.llmcache"
    done = _run_cli("export", "--tenant", "shop", "--out", str(dump), "--url", node.url, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"exported": 5, "file": str(dump)}

    node.stop()
    shutil.rmtree(node.data_dir)
    node.start()
    with CacheClient(node.url) as client, pytest.raises(UnknownTenant):
        client.get_tenant("shop")

    loaded = _run_cli("import", str(dump), "--url", node.url, "--json")
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout) == {"imported": 5, "duplicates": 0, "expired": 0, "skipped": 0}
    with CacheClient(node.url, tenant="shop") as client:
        assert _answers(client) == before
        assert _full(client) == full_before
        view = client.get_tenant("shop")
        assert view["config"]["max_entries"] == 10_000
        assert view["namespaces"]["faq"]["threshold"] == 0.8
    again = _run_cli("import", str(dump), "--url", node.url, "--json")
    assert json.loads(again.stdout)["duplicates"] == 5  # idempotent


def test_an_interrupted_import_resumes_and_a_damaged_file_is_refused(
    node: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CacheClient(node.url, tenant="resume") as client:
        client.create_tenant("resume")
        for i in range(7):
            client.store(key=f"k{i}", response=f"v{i}", namespace="r")
        dump = tmp_path / "resume.llmcache"
        with dump.open("wb") as out:
            assert exporting.export(client, out) == 7
        monkeypatch.setattr(exporting, "BATCH", 2)
        first = exporting.import_file(client, dump, tenant="copy", stop_after=2)
        assert (first.imported, first.duplicates) == (4, 0)  # into a new, empty tenant
        assert exporting.progress_path(dump, "copy").exists()
        rest = exporting.import_file(client, dump, tenant="copy")
        assert rest.skipped == 4 and rest.imported + rest.duplicates == 3
        assert not exporting.progress_path(dump, "copy").exists()
        copied = sorted(e.key for e in client.iter_entries(tenant="copy"))
        assert copied == [f"k{i}" for i in range(7)]

    data = gzip.decompress(dump.read_bytes())
    cut = tmp_path / "cut.llmcache"
    cut.write_bytes(gzip.compress(data[: len(data) - 12]))
    refused = _run_cli("import", str(cut), "--tenant", "cut", "--url", node.url)
    assert refused.returncode == 2 and (
        "truncated" in refused.stderr or "damaged" in refused.stderr
    )
    not_export = tmp_path / "junk"
    not_export.write_bytes(b"hello")
    junk = _run_cli("import", str(not_export), "--url", node.url)
    assert junk.returncode == 2 and "not an LLM-Cache export" in junk.stderr


def test_bench_reports_throughput_and_percentiles(node: NodeProcess) -> None:
    done = _run_cli(
        "bench",
        "--url",
        node.url,
        "--duration",
        "1",
        "--concurrency",
        "4",
        "--keys",
        "20",
        "--vector-dim",
        "16",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["ops"]) == {"exact", "semantic", "store"} and report["total"]["errors"] == 0
    for stats in report["ops"].values():
        assert stats["count"] > 0 and stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert report["ops"]["exact"]["hit_rate"] == 1.0
    assert report["ops"]["semantic"]["hit_rate"] > 0.5
    human = CliRunner().invoke(
        main,
        [
            "bench",
            "--url",
            node.url,
            "-d",
            "0.5",
            "-c",
            "2",
            "-k",
            "5",
            "--vector-dim",
            "8",
            "--mix",
            "exact=1",
        ],
    )
    assert human.exit_code == 0, human.output
    assert "ops/s" in human.stdout and "p99 ms" in human.stdout

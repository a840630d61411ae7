"""``llmcache-cli`` commands for users of the cache, over :class:`CacheClient`: ``cache``
(lookup, store, invalidate, get, delete), ``tenant`` (create, list, token, delete),
``export``, ``import`` and ``bench``. ``cli.py`` adds them to its group.

Output is for people unless ``--json`` (one JSON document on stdout); messages and progress
bars go to stderr. Exit codes (``targets``): 0 ok; 1 the server refused (unknown tenant, bad
token, not found, server too old...); 2 usage error or no node reachable; 3 a lookup missed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from llmcache.client import bench as benchmark
from llmcache.client import export as exporting
from llmcache.client.errors import ConnectionFailed, InvalidURL, LLMCacheError
from llmcache.client.models import Entry, LookupResult
from llmcache.client.protocol import RetryPolicy
from llmcache.client.sync import CacheClient
from llmcache.client.targets import EXIT_MISS, EXIT_UNHEALTHY, EXIT_USAGE, fail, seed_urls

F = TypeVar("F", bound=Callable[..., Any])
CLI_RETRY = RetryPolicy(attempts=5, base_s=0.1, cap_s=1.0)
"""A person waits for the answer: give up after ~1.5 s of failures (a store's --request-id
makes running the command again safe)."""


def connection(fn: F) -> F:
    """The options every command shares: --url (repeatable), --token, --tenant, --json."""
    options = [
        click.option(
            "--url",
            "urls",
            multiple=True,
            help="A node of the group (repeatable); else $LLMCACHE_URL, the dev "
            "cluster's state file, or http://127.0.0.1:8080.",
        ),
        click.option("--token", envvar="LLMCACHE_TOKEN", help="Token (default $LLMCACHE_TOKEN)."),
        click.option("--tenant", envvar="LLMCACHE_TENANT", help="Tenant to act on (admins)."),
        click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@contextmanager
def opened(urls: tuple[str, ...], token: str | None, tenant: str | None) -> Iterator[CacheClient]:
    """A client, with every library error turned into a message and an exit code."""
    try:
        with CacheClient(seed_urls(urls), token=token, tenant=tenant, retry=CLI_RETRY) as client:
            yield client
    except (ConnectionFailed, InvalidURL) as exc:
        fail(str(exc), EXIT_USAGE)
    except LLMCacheError as exc:
        where = f" (field {exc.field})" if exc.field else ""
        fail(f"{exc.code}: {exc}{where}", EXIT_UNHEALTHY)


def emit(as_json: bool, document: Any, human: str) -> None:
    click.echo(json.dumps(document, ensure_ascii=False) if as_json else human)


def json_arg(value: str | None, name: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=name) from None


def entry_doc(entry: Entry) -> dict[str, Any]:
    return {k: v for k, v in entry.view.items() if k != "vector_base64"}


def entry_text(entry: Entry) -> str:
    try:
        return entry.response.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(entry.response)} bytes of {entry.content_type}>"


def selector(text: str | None, key: str | None, request: str | None, vector: str | None,
             namespace: str | None) -> dict[str, Any]:  # fmt: skip
    chosen = [name for name, v in (("TEXT", text), ("--key", key), ("--request", request)) if v]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of TEXT, --key or --request")
    found: dict[str, Any] = {"key": key, "request": json_arg(request, "--request")}
    found.update(vector=json_arg(vector, "--vector"), namespace=namespace)
    return {k: v for k, v in found.items() if v is not None}


# -- cache ---------------------------------------------------------------------------------------


@click.group()
def cache() -> None:
    """Look up, store, invalidate, read and delete cache entries."""


select_options = [
    click.argument("text", required=False),
    click.option("--key", help="A caller's key (exact-only entries) instead of TEXT."),
    click.option("--request", help="An OpenAI chat/completion body (JSON) instead of TEXT."),
    click.option("--vector", help="A JSON list of floats (namespaces with supplied vectors)."),
    click.option("--namespace", "-n", help="Namespace (default: default)."),
]


def selecting(fn: F) -> F:
    for option in reversed(select_options):
        fn = option(fn)
    return fn


@cache.command("lookup")
@selecting
@click.option("--threshold", type=click.FloatRange(0, 1), help="Minimum similarity.")
@click.option("--consistency", type=click.Choice(["stale", "leader", "linearizable"]))
@connection
def lookup_command(text: str | None, key: str | None, request: str | None, vector: str | None,
                   namespace: str | None, threshold: float | None, consistency: str | None,
                   urls: tuple[str, ...], token: str | None, tenant: str | None,
                   as_json: bool) -> None:  # fmt: skip
    """Look TEXT (or --key, --request) up; exits 3 on a miss."""
    options = selector(text, key, request, vector, namespace)
    if threshold is not None:
        options["threshold"] = threshold
    if consistency:
        options["consistency"] = consistency
    with opened(urls, token, tenant) as client:
        found: LookupResult = client.lookup(text, **options)
    if found.entry is None:
        similarity = "" if found.similarity is None else f" (best {found.similarity:.4f})"
        emit(as_json, {"status": found.status, "similarity": found.similarity}, "MISS" + similarity)
        sys.exit(EXIT_MISS)
    document = {"status": found.status, "similarity": found.similarity, "age_s": found.age_s,
                "entry": entry_doc(found.entry)}  # fmt: skip
    human = (
        f"{found.status} similarity={found.similarity:.4f} entry={found.entry.id} "
        f"age={found.age_s:.0f}s\n{entry_text(found.entry)}"
    )
    emit(as_json, document, human)


@cache.command("store")
@selecting
@click.option("--response", "-r", required=True, help="The response ('-' reads stdin).")
@click.option("--content-type", help="Default: text/plain; charset=utf-8.")
@click.option("--ttl", "ttl_s", type=click.IntRange(0), help="Seconds to live (0: forever).")
@click.option("--tag", "tags", multiple=True, help="A tag (repeatable).")
@click.option("--request-id", help="Reuse to make a retried store apply once.")
@connection
def store_command(text: str | None, key: str | None, request: str | None, vector: str | None,
                  namespace: str | None, response: str, content_type: str | None,
                  ttl_s: int | None, tags: tuple[str, ...], request_id: str | None,
                  urls: tuple[str, ...], token: str | None, tenant: str | None,
                  as_json: bool) -> None:  # fmt: skip
    """Store --response for TEXT (or --key, --request)."""
    options = selector(text, key, request, vector, namespace)
    extra = {"content_type": content_type, "ttl_s": ttl_s, "request_id": request_id}
    options.update({k: v for k, v in extra.items() if v is not None})
    if tags:
        options["tags"] = list(tags)
    body: str | bytes = sys.stdin.buffer.read() if response == "-" else response
    with opened(urls, token, tenant) as client:
        stored = client.store(text, body, **options)
    emit(as_json, dataclasses.asdict(stored),
         f"stored entry {stored.id} at index {stored.index}"
         + (" (a retry: already stored)" if stored.duplicate else ""))  # fmt: skip


@cache.command("invalidate")
@click.option("--namespace", "-n")
@click.option("--tag", "tags", multiple=True)
@click.option("--key-prefix")
@click.option("--id", "ids", type=click.IntRange(1), multiple=True)
@connection
def invalidate_command(namespace: str | None, tags: tuple[str, ...], key_prefix: str | None,
                       ids: tuple[int, ...], urls: tuple[str, ...], token: str | None,
                       tenant: str | None, as_json: bool) -> None:  # fmt: skip
    """Delete the entries matching every given filter (at least one)."""
    if not (namespace or tags or key_prefix or ids):
        raise click.UsageError("give at least one of --namespace, --tag, --key-prefix, --id")
    with opened(urls, token, tenant) as client:
        result = client.invalidate(
            namespace=namespace, tags=list(tags) or None, key_prefix=key_prefix,
            ids=list(ids) or None,
        )  # fmt: skip
    emit(as_json, dataclasses.asdict(result), f"deleted {result.deleted} entries")


@cache.command("get")
@click.argument("entry_id", type=click.IntRange(1))
@connection
def get_command(entry_id: int, urls: tuple[str, ...], token: str | None, tenant: str | None,
                as_json: bool) -> None:  # fmt: skip
    """Show entry ENTRY_ID."""
    with opened(urls, token, tenant) as client:
        entry = client.get_entry(entry_id)
    human = (
        f"entry {entry.id} ({entry.kind}) namespace={entry.namespace} age={entry.age_s:.0f}s "
        f"tags={','.join(entry.tags) or '-'}\n{entry.key or entry.text}\n{entry_text(entry)}"
    )
    emit(as_json, entry_doc(entry), human)


@cache.command("delete")
@click.argument("entry_id", type=click.IntRange(1))
@connection
def delete_command(entry_id: int, urls: tuple[str, ...], token: str | None, tenant: str | None,
                   as_json: bool) -> None:  # fmt: skip
    """Delete entry ENTRY_ID."""
    with opened(urls, token, tenant) as client:
        result = client.delete_entry(entry_id)
    emit(as_json, dataclasses.asdict(result), f"deleted entry {entry_id}")


# -- tenants -------------------------------------------------------------------------------------


@click.group()
def tenant() -> None:
    """Create and list tenants, and issue their tokens (admin token)."""


@tenant.command("create")
@click.argument("name")
@click.option("--config", help="Tenant configuration as JSON, e.g. '{\"max_entries\": 100000}'.")
@connection
def tenant_create(name: str, config: str | None, urls: tuple[str, ...], token: str | None,
                  tenant: str | None, as_json: bool) -> None:  # fmt: skip
    """Create tenant NAME (or replace its configuration)."""
    with opened(urls, token, tenant) as client:
        answer = client.create_tenant(name, json_arg(config, "--config"))
    emit(as_json, answer, f"{'created' if answer['created'] else 'updated'} tenant {name}")


@tenant.command("list")
@connection
def tenant_list(urls: tuple[str, ...], token: str | None, tenant: str | None,
                as_json: bool) -> None:  # fmt: skip
    """Every tenant with its entry count, namespaces and tokens (ids and roles only)."""
    with opened(urls, token, tenant) as client:
        tenants = client.list_tenants()
    lines = [f"{'TENANT':<24}{'ENTRIES':>9}{'BYTES':>12}  NAMESPACES  TOKENS"]
    for t in tenants:
        stats = t.get("stats", {})
        tokens = ",".join(f"{k['id']}:{k['role']}" for k in t.get("tokens", ())) or "-"
        lines.append(
            f"{t['tenant']:<24}{stats.get('entries', 0):>9}{stats.get('bytes', 0):>12}  "
            f"{','.join(t.get('namespaces', {})) or '-'}  {tokens}"
        )
    emit(as_json, {"tenants": tenants}, "\n".join(lines))


@tenant.command("token")
@click.argument("name")
@click.option("--role", type=click.Choice(["reader", "writer", "admin"]), default="writer",
              show_default=True)  # fmt: skip
@connection
def tenant_token(name: str, role: str, urls: tuple[str, ...], token: str | None,
                 tenant: str | None, as_json: bool) -> None:  # fmt: skip
    """Issue a token of ROLE for tenant NAME (printed once; the server keeps its hash)."""
    with opened(urls, token, tenant) as client:
        issued = client.create_token(name, role)  # type: ignore[arg-type]  # a click.Choice
    emit(as_json, dataclasses.asdict(issued), issued.token)


@tenant.command("delete")
@click.argument("name")
@connection
def tenant_delete(name: str, urls: tuple[str, ...], token: str | None, tenant: str | None,
                  as_json: bool) -> None:  # fmt: skip
    """Delete tenant NAME with all its entries."""
    with opened(urls, token, tenant) as client:
        result = client.delete_tenant(name)
    emit(as_json, dataclasses.asdict(result), f"deleted tenant {name} ({result.deleted} entries)")


# -- export / import -----------------------------------------------------------------------------


@click.command("export")
@click.option("--out", "-o", "out", type=click.Path(path_type=Path, dir_okay=False),
              required=True, help="The file to write (gzip'd msgpack, version 1).")  # fmt: skip
@click.option("--namespace", "-n", help="Only this namespace.")
@connection
def export_command(out: Path, namespace: str | None, urls: tuple[str, ...], token: str | None,
                   tenant: str | None, as_json: bool) -> None:  # fmt: skip
    """Write every live entry of the tenant, vectors included, to --out."""
    tmp = out.with_name(out.name + ".partial")
    try:
        with (
            opened(urls, token, tenant) as client,
            tmp.open("wb") as stream,
            _progress("exporting", as_json) as advance,
        ):
            count = exporting.export(client, stream, namespace=namespace, progress=advance)
        tmp.replace(out)  # a file named --out is always complete
    finally:
        tmp.unlink(missing_ok=True)
    emit(as_json, {"exported": count, "file": str(out)}, f"exported {count} entries to {out}")


@click.command("import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--no-resume", is_flag=True, help="Start from the top, ignoring FILE's progress.")
@connection
def import_command(file: Path, no_resume: bool, urls: tuple[str, ...], token: str | None,
                   tenant: str | None, as_json: bool) -> None:  # fmt: skip
    """Import an export FILE into --tenant (default: the exported tenant, created with its
    settings if missing). Idempotent and resumable: run it again after an interruption."""
    with opened(urls, token, tenant) as client, _progress("importing", as_json) as advance:
        try:
            report = exporting.import_file(
                client, file, tenant=tenant, resume=not no_resume, progress=advance
            )
        except exporting.ExportFormatError as exc:
            fail(str(exc), EXIT_USAGE)
    human = (
        f"imported {report.imported} entries ({report.duplicates} already there, "
        f"{report.expired} expired, {report.skipped} done by an earlier run)"
    )
    emit(as_json, dataclasses.asdict(report), human)


@contextmanager
def _progress(label: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (entries so far); silent with --json or off a terminal."""
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    bar: Any = click.progressbar(length=None, label=label, file=sys.stderr, show_pos=True)
    with bar:
        yield bar.update


# -- bench ---------------------------------------------------------------------------------------


@click.command("bench")
@click.option("--duration", "-d", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds of load after the keys are stored.")  # fmt: skip
@click.option("--concurrency", "-c", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--mix", default="exact=60,semantic=20,store=20", show_default=True,
              help="Weights of the operations.")  # fmt: skip
@click.option("--keys", "-k", type=click.IntRange(1, 1_000_000), default=200, show_default=True,
              help="Entries stored before the timed run.")  # fmt: skip
@click.option("--vector-dim", type=click.IntRange(1, 4096),
              help="Send random vectors of this dimension (supplied-vector namespace) instead "
              "of having the node embed.")  # fmt: skip
@click.option("--seed", type=int, default=1, show_default=True)
@connection
def bench_command(duration: float, concurrency: int, mix: str, keys: int, vector_dim: int | None,
                  seed: int, urls: tuple[str, ...], token: str | None, tenant: str | None,
                  as_json: bool) -> None:  # fmt: skip
    """Load a node or group like redis-benchmark; print throughput and latency percentiles."""
    try:
        weights = benchmark.parse_mix(mix)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--mix") from None
    config = benchmark.BenchConfig(
        urls=seed_urls(urls), token=token, tenant=tenant, duration_s=duration,
        concurrency=concurrency, mix=weights, keys=keys, vector_dim=vector_dim, seed=seed,
    )  # fmt: skip
    with opened(urls, token, tenant):  # the error handling; the run has its own async client
        report = asyncio.run(benchmark.run(config))
    emit(as_json, report, benchmark.render(report))
    if report["total"]["errors"]:
        sys.exit(EXIT_UNHEALTHY)


COMMANDS = (cache, tenant, export_command, import_command, bench_command)

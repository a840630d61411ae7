"""A server worker process: the aiohttp application over a read-only view of the node's LMDB.

Each worker has its own embedder, derived indexes (kept current from the change feed, and
checkpointed to ``<data_dir>/index/worker-<n>`` on shutdown) and one IPC connection to
raft-core, through which all its writes go. Workers share the HTTP port with SO_REUSEPORT, so
the kernel spreads connections over them.

SIGTERM/SIGINT: aiohttp stops accepting, lets in-flight requests finish (up to
``SHUTDOWN_GRACE_S``), then the cleanup context checkpoints the indexes and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from llmcache.cluster.ipc import IpcProposer
from llmcache.node import forwarding, metrics, proxy
from llmcache.node.app import make_app
from llmcache.node.clock import ClusterClock
from llmcache.node.config import NodeConfig
from llmcache.node.cross_encoder import CrossEncoders
from llmcache.node.embed import (
    CachedEmbedder,
    Embedder,
    EmbeddingCache,
    RemoteEmbedder,
    bge,
    default_embedder,
)
from llmcache.node.engine import Engine
from llmcache.node.index import IndexParams
from llmcache.node.index_feed import IndexFeed
from llmcache.node.services import PriceEntry, ServerSettings, Services
from llmcache.node.store import Store

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 20.0
STATUS_PERIOD_S = 2.0


def store_path(cfg: NodeConfig) -> Path:
    return Path(cfg.data_dir) / "store"


def socket_path(cfg: NodeConfig) -> Path:
    return Path(cfg.data_dir) / "raft-core.sock"


def embedders(cfg: NodeConfig) -> dict[str, Embedder]:
    """The node's embedder under the name ``default`` (namespaces may also say ``supplied``),
    and the re-ranking model as ``rerank`` when it is installed (loaded at first use, through
    the same embedding cache: a cached entry's text is re-rank-embedded once)."""
    rerank = bge.available()
    if cfg.embedder == "none" and not rerank:
        return {}
    cache = EmbeddingCache(
        Path(cfg.data_dir) / "embedding-cache", max_bytes=cfg.embedding_cache_bytes
    )
    out: dict[str, Embedder] = {}
    if rerank:
        out["rerank"] = CachedEmbedder(bge.LazyEmbedder(), cache)
    if cfg.embedder == "none":
        return out
    inner: Embedder
    if cfg.embedder == "remote":
        assert cfg.remote_embedder_url and cfg.remote_embedder_model and cfg.remote_embedder_dim
        key = cfg.remote_embedder_api_key
        inner = RemoteEmbedder(
            cfg.remote_embedder_url,
            cfg.remote_embedder_model,
            cfg.remote_embedder_dim,
            api_key=key.get_secret_value() if key else None,
        )
    else:
        inner = default_embedder()
    out["default"] = CachedEmbedder(inner, cache)
    return out


def server_settings(cfg: NodeConfig) -> ServerSettings:
    admin = cfg.admin_token.get_secret_value() if cfg.admin_token else None
    upstream_key = cfg.upstream_api_key.get_secret_value() if cfg.upstream_api_key else None
    password = cfg.raft_password.get_secret_value() if cfg.raft_password else None
    return ServerSettings(
        node_id=cfg.node_name,
        max_body_bytes=cfg.max_body_bytes,
        upstream_base_url=cfg.upstream_base_url,
        upstream_timeout_s=cfg.upstream_timeout_s,
        upstream_api_key=upstream_key,
        cache_enabled=cfg.enabled,
        admin_token=admin,
        open_access=cfg.open_access,
        prices={
            m: PriceEntry(p.get("prompt", 0.0), p.get("completion", 0.0))
            for m, p in cfg.prices.items()
        },
        peers_http={p.raft_address: p.http_url for p in cfg.peers},
        peer_key=forwarding.peer_key(password) if password else None,
    )


def build_app(cfg: NodeConfig, worker_no: int) -> web.Application:
    """The worker's application; the store is opened read-only (raft-core is its writer)."""
    store = Store(store_path(cfg), readonly=True, max_map_size=cfg.max_map_size)
    params = IndexParams(
        m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction, ef_search=cfg.hnsw_ef_search
    )
    feed = IndexFeed(store, params)
    checkpoint = Path(cfg.data_dir) / "index" / f"worker-{worker_no}"
    how = feed.open(checkpoint)
    log.info(
        "worker %d: indexes %s at applied index %d", worker_no, how, feed.indexes.applied_index
    )
    clock = ClusterClock(store.last_ts_ms)
    engine = Engine(
        store,
        feed,
        embedders(cfg),
        clock=clock,
        cross_encoders=CrossEncoders(cfg.models_dir or Path(cfg.data_dir) / "models"),
    )
    settings = server_settings(cfg)
    proposer = IpcProposer(socket_path(cfg))
    forwarder = forwarding.ForwardingProposer(
        proposer, settings.peers_http, settings.peer_key, store, clock=clock
    )
    services = Services(engine, forwarder, settings)
    app = make_app(
        services,
        extra_routes=[*proxy.routes, *forwarding.routes],
        extra_paths=proxy.openapi_paths(),
    )
    proxy.setup(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_refresh_metrics(services))
        follow = asyncio.create_task(clock.follow())
        report = asyncio.create_task(_report_access(services, proposer, cfg.access_report_period_s))
        log.info("worker %d: serving", worker_no)
        yield
        task.cancel()
        follow.cancel()
        report.cancel()
        await asyncio.to_thread(feed.checkpoint, checkpoint)
        log.info("worker %d: indexes checkpointed at %d", worker_no, feed.indexes.applied_index)
        await forwarder.close()
        await proposer.close()
        store.close()

    app.cleanup_ctx.append(lifecycle)
    return app


async def _refresh_metrics(services: Services) -> None:
    """Raft and tenant gauges, refreshed in the background (never on a request's path)."""
    store = services.engine.store
    while True:
        try:
            status = await services.proposer.status()
            metrics.RAFT_TERM.set(status.term)
            metrics.RAFT_COMMIT_INDEX.set(status.commit_index)
            metrics.RAFT_APPLIED_INDEX.set(status.applied_index)
            metrics.RAFT_IS_LEADER.set(1 if status.role == "leader" else 0)
            metrics.APPLY_LAG.set(max(0, status.commit_index - status.applied_index))
            with store.read() as txn:
                for tenant, _ in store.tenants(txn):
                    stats = store.stats(txn, tenant)
                    metrics.ENTRIES.labels(tenant).set(stats["entries"])
                    metrics.ENTRY_BYTES.labels(tenant).set(stats["bytes"])
                    metrics.EVICTIONS.labels(tenant).set(stats["evicted"])
                    metrics.EXPIRATIONS.labels(tenant).set(stats["expired"])
        except Exception as exc:  # raft-core restarting: try again next period
            log.debug("metrics refresh failed: %s", exc)
        await asyncio.sleep(STATUS_PERIOD_S)


async def _report_access(services: Services, proposer: IpcProposer, period_s: float) -> None:
    """Every ``period_s``, hand this worker's access statistics to raft-core, which puts them
    in the log (``Touch``) for the leader's eviction. Best effort: a report raft-core cannot
    take (restarting) is dropped, which only makes eviction less informed."""
    while True:
        await asyncio.sleep(period_s)
        stats = services.engine.access.drain()
        if not stats:
            continue
        try:
            await proposer.report_access(stats)
        except Exception as exc:
            log.debug("access report of %d entries dropped: %s", len(stats), exc)


def run(cfg: NodeConfig, worker_no: int) -> None:
    """Entry point of a worker process (started by the supervisor)."""
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format=f"%(asctime)s worker-{worker_no} %(levelname)s %(name)s: %(message)s",
    )
    ssl_context = None
    if cfg.tls_cert and cfg.tls_key:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    # A stop requested while the app is still being built (indexes, embedder) is a clean exit:
    # nothing is served yet. aiohttp installs its own handler once the app runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    web.run_app(
        build_app(cfg, worker_no),
        host=cfg.host,
        port=cfg.port,
        reuse_port=True,
        ssl_context=ssl_context,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        # aiohttp's default of 128 pending connections turns a burst of clients into seconds
        # of connect retries.
        backlog=4096,
        print=None,
        access_log=None,
    )

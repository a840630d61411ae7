"""Shared fixtures: real stores in tmp dirs, the real default embedder loaded once per session."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmcache.node.embed import MiniLMEmbedder, default_embedder
from llmcache.node.local import LocalCache

EVAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "eval-data"


def unit_vector(seed: int | str, dim: int = 16) -> np.ndarray:
    """A deterministic random unit vector."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def near(v: np.ndarray, noise: float, seed: int = 0) -> np.ndarray:
    """``v`` with a little noise added, renormalised: a "paraphrase" of ``v``."""
    rng = np.random.default_rng(seed)
    w = v + noise * rng.standard_normal(v.shape).astype(np.float32)
    return (w / np.linalg.norm(w)).astype(np.float32)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[LocalCache]:
    """A local cache whose namespaces take caller-supplied vectors, with tenants t1 and t2."""
    with LocalCache(tmp_path / "cache", embedders={}) as local:
        engine = local.engine
        local.propose(engine.prepare_config({"embedder": "supplied"}))
        local.propose(engine.prepare_tenant("t1"))
        local.propose(engine.prepare_tenant("t2"))
        yield local


@pytest.fixture(scope="session")
def minilm() -> MiniLMEmbedder:
    return default_embedder()

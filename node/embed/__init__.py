"""Embedders: text -> unit-length float32 vectors.

- :class:`MiniLMEmbedder` (the default; offline all-MiniLM-L6-v2 int8 ONNX, 384 dims),
  shared per process through :func:`default_embedder`;
- :class:`RemoteEmbedder`, an OpenAI-compatible ``/v1/embeddings`` client;
- :func:`validate_vector` for vectors that callers bring themselves;
- :class:`EmbeddingCache` / :class:`CachedEmbedder`, a node-local exact text -> vector cache.
"""

from llmcache.node.embed.base import Embedder, EmbedResult, normalize_rows
from llmcache.node.embed.cache import CachedEmbedder, EmbeddingCache
from llmcache.node.embed.minilm import MiniLMEmbedder, ModelIntegrityError, default_embedder
from llmcache.node.embed.remote import RemoteEmbedder
from llmcache.node.embed.supplied import validate_vector

__all__ = [
    "CachedEmbedder",
    "EmbedResult",
    "Embedder",
    "EmbeddingCache",
    "MiniLMEmbedder",
    "ModelIntegrityError",
    "RemoteEmbedder",
    "default_embedder",
    "normalize_rows",
    "validate_vector",
]

"""Explicit size limits, enforced by the engine and documented in README.md.

They protect the store and the Raft log: one log entry must stay well below what pysyncobj
moves comfortably, and one request must not be able to make a node embed for seconds.
"""

from __future__ import annotations

MAX_TENANT_LEN = 128
MAX_NAMESPACE_LEN = 128
MAX_KEY_LEN = 1024  # caller keys of exact-only entries
MAX_PROMPT_CHARS = 128 * 1024  # the full prompt (all messages) that the exact key covers
MAX_EMBED_TEXT_CHARS = 32 * 1024  # the part that is embedded (before head+tail token cut)
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_TAGS = 32
MAX_TAG_LEN = 128
MAX_VECTOR_DIM = 4096
MAX_TOP_K = 100
MAX_BATCH = 256  # ids in one Delete/Expire/Evict command, texts in one embed call
MAX_TTL_S = 10 * 365 * 24 * 3600
MAX_MESSAGES = 1024

"""LLM-Cache node: the cache core (store, indexes, embedders, engine) under the HTTP server."""

"""LLM-Cache Python client (to come: see the client issue)."""

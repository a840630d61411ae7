"""LLM-Cache cluster: the replicated log's command codec and the state machine that applies it."""

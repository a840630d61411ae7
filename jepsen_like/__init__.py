"""jepsen_like: a fault-injection harness for LLM-Cache clusters (see DESIGN.md)."""

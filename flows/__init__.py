"""Prefect flows: the orchestration layer of ClaudeCluster (thin, the work is in tasks)."""

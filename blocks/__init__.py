"""Prefect blocks holding ClaudeCluster settings and repository credentials."""

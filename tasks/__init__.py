"""Prefect tasks: the units of work a ClaudeCluster flow orchestrates."""

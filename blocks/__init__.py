"""Prefect blocks holding ClaudeCluster settings and repository credentials.

Register them with the server (they then show in the UI's Blocks page)::

    prefect block register -m claudecluster.blocks

``claudecluster setup`` does this for you. Flows and the CLI load blocks by name
(``--settings-block``, ``--repo-block``); command-line flags override a block's values, which
override the defaults.
"""

from claudecluster.blocks.repository import TargetRepository
from claudecluster.blocks.settings import ClaudeCodeSettings

__all__ = ["ClaudeCodeSettings", "TargetRepository"]

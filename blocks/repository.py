"""The target repository block: where the code lives, and how to reach it."""

from __future__ import annotations

from typing import cast

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class TargetRepository(Block):
    """A repository ClaudeCluster works on: a local path or a git URL, with credentials.

    Load it by name with ``claudecluster run --repo-block NAME`` or in a deployment's
    ``repo_block`` parameter. The credentials stay in the block (encrypted by Prefect) and are
    never written to logs, results or flow run parameters.
    """

    _block_type_name = "ClaudeCluster Target Repository"
    _block_type_slug = "claudecluster-target-repository"
    _description = "A git repository ClaudeCluster runs goals on: path or URL, branch, token."

    location: str = Field(description="Local path of a clone, or a git URL (https or ssh).")
    branch: str | None = Field(
        default=None, description="Branch or commit to start from; None means HEAD."
    )
    username: str | None = Field(
        default=None, description="User name for https credentials (e.g. 'x-access-token')."
    )
    credentials: SecretStr | None = Field(
        default=None, description="Token or password for https URLs (never logged)."
    )

    def git_env(self) -> dict[str, str]:
        """Git's environment for this block's credentials (empty without any)."""
        from claudecluster.remote import credential_env

        secret = self.credentials.get_secret_value() if self.credentials else None
        return credential_env(self.username, secret)

    @property
    def is_remote(self) -> bool:
        """True when ``location`` is a URL rather than a local path."""
        return "://" in self.location or self.location.startswith("git@")


def load_target(name: str) -> TargetRepository:
    """Load a TargetRepository block by name (from synchronous code)."""
    block = TargetRepository.load(name, _sync=True)  # type: ignore[call-arg]
    assert isinstance(block, TargetRepository)
    return block


async def git_env_from_block(name: str) -> dict[str, str]:
    """Git's environment for a TargetRepository block's credentials (empty without any)."""
    block = cast(TargetRepository, await TargetRepository.aload(name))
    return block.git_env()

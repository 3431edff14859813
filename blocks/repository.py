"""The target repository block: where the code lives, and how to reach it."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from claudecluster.blocks.loading import load_block
from claudecluster.errors import UsageError
from claudecluster.target import Target, open_target


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

    forge_token: SecretStr | None = Field(
        default=None,
        description="Token for the forge's API (GitHub, Gitea) and pushes of pull request "
        "branches; never given to a Claude Code session. Defaults to credentials.",
    )
    forge_api_url: str | None = Field(
        default=None,
        description="The forge's API base URL when it is not github.com (for example "
        "https://git.example.com/api/v3 for GitHub Enterprise, /api/v1 for Gitea).",
    )

    def forge_credentials(self) -> tuple[str | None, str | None]:
        """The forge token (the forge token, else the git credentials) and API URL."""
        secret = self.forge_token or self.credentials
        return (secret.get_secret_value() if secret else None), self.forge_api_url

    def git_env(self) -> dict[str, str]:
        """Git's environment for this block's credentials (empty without any)."""
        from claudecluster.remote import credential_env

        secret = self.credentials.get_secret_value() if self.credentials else None
        return credential_env(self.username, secret)

    @property
    def is_remote(self) -> bool:
        """True when ``location`` is a URL rather than a local path."""
        from claudecluster.remote import is_remote

        return is_remote(self.location)


def load_target(name: str) -> TargetRepository:
    """Load a TargetRepository block by name (from synchronous code)."""
    return load_block(TargetRepository, name, "repository")


def resolve_target(
    repo: str | None,
    repo_block: str | None,
    *,
    base: str | None,
    clones_root: Path,
) -> Target:
    """The repository a run works on: a path or URL, or the one a block names.

    The block's location and branch win over ``repo`` and supply a default ``base``; its
    credentials become the git environment that reaches a URL's origin.
    """
    git_env: dict[str, str] = {}
    if repo_block:
        block = load_target(repo_block)
        repo, base = block.location, base or block.branch
        git_env = block.git_env()
    if not repo:
        raise UsageError("no repository given", hint="Pass repo (a path or git URL) or repo_block.")
    return open_target(repo, base=base, git_env=git_env, clones_root=clones_root)


async def git_env_from_block(name: str) -> dict[str, str]:
    """Git's environment for a TargetRepository block's credentials (empty without any)."""
    block = cast(TargetRepository, await TargetRepository.aload(name))
    return block.git_env()

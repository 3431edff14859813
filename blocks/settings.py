"""The Claude Code settings block: model, permissions, limits and the API key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from claudecluster.blocks.loading import load_block
from claudecluster.models import (
    PermissionPolicy,
    PullRequestMode,
    PullRequestOptions,
    ReviewMode,
    WorkerSettings,
)


class ClaudeCodeSettings(Block):
    """How ClaudeCluster runs Claude Code sessions, saved on the Prefect server.

    Load it by name with ``claudecluster run --settings-block NAME`` or in a deployment's
    ``settings_block`` parameter. Flags on the command line win over the block's values.
    """

    _block_type_name = "ClaudeCluster Claude Code Settings"
    _block_type_slug = "claudecluster-claude-code-settings"
    _description = (
        "Model, permission policy, tools, limits and API credentials for ClaudeCluster's "
        "unattended Claude Code sessions."
    )

    model: str | None = Field(default=None, description="Model for the sessions.")
    fallback_model: str | None = Field(
        default=None, description="Model to switch to when the main one is overloaded."
    )
    permission_policy: PermissionPolicy = Field(
        default="safe", description="'safe' (default), 'read-only' or 'container'."
    )
    allowed_tools: list[str] = Field(
        default_factory=list, description="Extra Claude Code permission rules to allow."
    )
    disallowed_tools: list[str] = Field(
        default_factory=list, description="Claude Code permission rules to deny."
    )
    max_turns: int | None = Field(default=None, ge=1, description="Turn limit per session.")
    max_budget_usd: float | None = Field(
        default=None, gt=0, description="Spending limit per session, in USD."
    )
    timeout_s: float | None = Field(
        default=None, gt=0, description="Wall-clock limit per session, in seconds."
    )
    verify_timeout_s: float | None = Field(
        default=None, gt=0, description="Wall-clock limit for verify commands, in seconds."
    )
    budget_usd: float | None = Field(
        default=None, gt=0, description="Spending limit per goal, in USD (no new task after)."
    )
    api_key: SecretStr | None = Field(
        default=None, description="Anthropic API key given to the sessions (never logged)."
    )
    base_url: str | None = Field(
        default=None, description="Anthropic-compatible endpoint, if not the default API."
    )

    pull_request: PullRequestMode | None = Field(
        default=None,
        description="What runs do with their integration branch: off, branch (push it), "
        "draft or ready (open or update a pull request). Off when unset.",
    )
    review: ReviewMode | None = Field(
        default=None,
        description="The review a pull request gets: none, summary (one comment) or lines "
        "(the comment and a review with line comments). Summary when unset.",
    )

    def worker_settings(self, **overrides: Any) -> WorkerSettings:
        """WorkerSettings from this block; non-None ``overrides`` (flags) win."""
        values: dict[str, Any] = {
            "model": self.model,
            "fallback_model": self.fallback_model,
            "permission_policy": self.permission_policy,
            "allowed_tools": list(self.allowed_tools),
            "disallowed_tools": list(self.disallowed_tools),
            "max_turns": self.max_turns,
            "max_budget_usd": self.max_budget_usd,
            "timeout_s": self.timeout_s,
            "verify_timeout_s": self.verify_timeout_s,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return WorkerSettings(**{k: v for k, v in values.items() if v is not None})

    def session_env(self) -> dict[str, str]:
        """Environment the sessions need for this block's credentials and endpoint."""
        env: dict[str, str] = {}
        if self.api_key is not None:
            env["ANTHROPIC_API_KEY"] = self.api_key.get_secret_value()
        if self.base_url:
            env["ANTHROPIC_BASE_URL"] = self.base_url
        return env


@dataclass(frozen=True)
class ResolvedSettings:
    """A run's settings, resolved once: flags over the block over the defaults."""

    settings: WorkerSettings
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    budget_usd: float | None = None


def resolve_settings(
    settings: WorkerSettings | None,
    block_name: str | None,
    *,
    budget_usd: float | None = None,
) -> ResolvedSettings:
    """Settings, session environment and goal budget: explicit values over the block over
    the defaults.

    Only fields set explicitly on ``settings`` (command-line flags, deployment parameters)
    override the block; its unset fields keep the block's values. ``env`` holds the block's
    credentials and endpoint: it goes to sessions, never into parameters or logs.
    """
    if not block_name:
        return ResolvedSettings(settings or WorkerSettings(), {}, budget_usd)
    block = load_settings_block(block_name)
    explicit = settings.model_dump(exclude_unset=True) if settings else {}
    return ResolvedSettings(
        block.worker_settings(**explicit),
        block.session_env(),
        budget_usd if budget_usd is not None else block.budget_usd,
    )


async def session_env_from_block(block_name: str) -> dict[str, str]:
    """The session environment (credentials, endpoint) of a ClaudeCodeSettings block."""
    block = cast(ClaudeCodeSettings, await ClaudeCodeSettings.aload(block_name))
    return block.session_env()


def load_settings_block(name: str) -> ClaudeCodeSettings:
    """Load a ClaudeCodeSettings block by name (from synchronous code)."""
    return load_block(ClaudeCodeSettings, name, "settings")


def resolve_pull_request(
    mode: PullRequestMode | None,
    review: ReviewMode | None,
    forge_api_url: str | None,
    block_name: str | None,
) -> PullRequestOptions:
    """What the run does on the forge: explicit values over the settings block over the
    defaults (off; a summary review)."""
    block = load_settings_block(block_name) if block_name else None
    values: dict[str, Any] = {
        "mode": mode or (block.pull_request if block else None),
        "review": review or (block.review if block else None),
        "forge_api_url": forge_api_url,
    }
    return PullRequestOptions(**{k: v for k, v in values.items() if v is not None})

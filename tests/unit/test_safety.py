"""Permission policies, secret redaction and pytest-summary parsing (pure units)."""

from __future__ import annotations

import pytest

from claudecluster.errors import ConfigError
from claudecluster.permissions import permissions_for
from claudecluster.redact import REDACTED, redact, redact_obj
from claudecluster.verify import parse_pytest_counts


class TestPermissionPolicies:
    """The safe default, the read-only planner, and bypass only inside containers."""

    def test_safe_policy_allows_edits_in_the_worktree_only(self) -> None:
        perms = permissions_for("safe", verify="make check")
        assert perms.mode == "dontAsk"
        assert "Edit(./**)" in perms.allowed
        assert "Write(./**)" in perms.allowed
        assert "Edit" not in perms.allowed  # an unscoped Edit would reach outside
        assert "Bash(make check:*)" in perms.allowed
        assert not any(rule in ("Bash", "Bash(*)") for rule in perms.allowed)

    def test_read_only_policy(self) -> None:
        perms = permissions_for("read-only")
        assert perms.tools == ["Read", "Glob", "Grep"]
        assert perms.mode == "dontAsk"

    def test_bypass_refused_outside_a_container(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("IS_SANDBOX", raising=False)
        monkeypatch.setattr("claudecluster.permissions.Path.exists", lambda self: False)
        with pytest.raises(ConfigError, match="only allowed inside a container"):
            permissions_for("container")

    def test_bypass_inside_a_container(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("IS_SANDBOX", "1")
        assert permissions_for("container").mode == "bypassPermissions"


class TestRedaction:
    """Secrets are masked by value and by shape."""

    def test_env_secret_values(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-1234567890")
        assert redact("auth tok-1234567890 ok") == f"auth {REDACTED} ok"

    def test_token_shapes(self) -> None:
        text = (
            "key sk-ant-api03-abcdefghijkl and https://user:pass@host/x "
            "and Bearer abcdefghijklmnopqrst"
        )
        out = redact(text)
        assert "sk-ant-api03" not in out
        assert "user:pass" not in out
        assert "abcdefghijklmnopqrst" not in out

    def test_nested_values(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-secret-value")
        assert redact_obj({"a": ["x sk-test-secret-value"]}) == {"a": [f"x {REDACTED}"]}

    def test_short_values_are_left_alone(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SOME_KEY", "abc")
        assert redact("abc abc") == "abc abc"


class TestPytestSummary:
    """Counts come from pytest's summary line, and only from it."""

    @pytest.mark.parametrize(
        ("output", "counts"),
        [
            ("..\n2 passed in 0.01s", (2, 0, 0)),
            ("== 3 passed, 1 failed, 2 skipped in 1.2s ==", (3, 1, 2)),
            ("1 failed, 1 passed, 1 error in 0.3s", (1, 2, 0)),
            ("no tests ran in 0.01s", (0, 0, 0)),
            ("make: *** [check] Error 2", (None, None, None)),
        ],
    )
    def test_counts(self, output: str, counts: tuple[int | None, ...]) -> None:
        assert parse_pytest_counts(output) == counts

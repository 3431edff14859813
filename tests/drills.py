"""Fault drills as a user meets them: the ``claudecluster`` CLI in a process of its own, its
embedded Prefect server in a process of its own, both in a fresh ClaudeCluster home, so a
test can ``kill -9`` either and watch what happens."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from claudecluster.prefect_server import stop_server
from claudecluster.testing import ScriptedModelServer

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Drill:
    """A ClaudeCluster home with its embedded server, and the CLI pointed at it."""

    home: Path
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``claudecluster ARGS`` to its end."""
        return subprocess.run(
            [sys.executable, "-m", "claudecluster.cli", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start ``claudecluster ARGS`` and return at once."""
        return subprocess.Popen(
            [sys.executable, "-m", "claudecluster.cli", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def server_pid(self) -> int:
        """The embedded server's pid (the leader of its process group)."""
        state: dict[str, Any] = json.loads((self.home / "server.json").read_text())
        return int(state["pid"])

    def kill_server(self) -> None:
        """``kill -9`` the embedded server and everything it started."""
        os.killpg(self.server_pid(), signal.SIGKILL)

    def server_start(self) -> None:
        proc = self.cli("server", "start", timeout=120)
        assert proc.returncode == 0, proc.stderr

    def run_ids(self) -> list[str]:
        """Runs with a journal in this home."""
        runs = self.home / "runs"
        return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


@contextlib.contextmanager
def drill(home: Path, model_server: ScriptedModelServer) -> Iterator[Drill]:
    """A fresh home, its embedded server started, the CLI's environment pointed at both."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(model_server.env(max_retries=2))
    env.update({"CLAUDECLUSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"})
    made = Drill(home, env)
    try:
        made.server_start()
        yield made
    finally:
        stop_server(home)


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.1)


def processes_with(needle: str) -> list[int]:
    """Pids of live processes whose environment holds ``needle`` (``KEY=value``)."""
    wanted = needle.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in environ:
            found.append(int(entry.name))
    return found


def claude_sessions_of(home: Path) -> list[int]:
    """Pids of Claude Code sessions (and their children) a run in ``home`` started."""
    return [
        pid
        for pid in processes_with(f"CLAUDECLUSTER_HOME={home}")
        if _has_var(pid, "CLAUDECLUSTER_SESSION_MARKER")
    ]


def _has_var(pid: int, name: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(item.startswith(f"{name}=".encode()) for item in environ)

"""Sessions die with the process that runs them, even when it is killed with SIGKILL.

Every Claude Code session (and every process it starts) carries two markers in its
environment: one for the session (:data:`SESSION_VAR`) and one for the process that owns it
(:data:`OWNER_VAR`). The first process of a driver or worker that starts a session also starts
a reaper: this file run as a script, by path, so it starts in milliseconds with nothing but
the standard library. The reaper blocks reading a pipe whose other end only its owner holds.
When the owner exits, or dies however it dies, the pipe closes and the reaper kills every
process that still carries the owner's marker, then exits. The same scan, per session, cleans
up after each session (:func:`kill_marked`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

SESSION_VAR = "CLAUDECLUSTER_SESSION_MARKER"
OWNER_VAR = "CLAUDECLUSTER_OWNER"

_lock = threading.Lock()
_owner: tuple[int, str, subprocess.Popen[bytes]] | None = None  # (pid, token, reaper)


def marked_pids(var: str, value: str) -> list[int]:
    """Pids of live processes whose environment has ``var=value``."""
    needle = f"{var}={value}".encode()
    pids: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def kill_marked(var: str, value: str) -> int:
    """SIGKILL every process whose environment has ``var=value``; how many were killed."""
    killed = 0
    for _ in range(3):  # a dying parent may fork once more; a few passes catch stragglers
        pids = [pid for pid in marked_pids(var, value) if pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    return killed


def owner_token() -> str:
    """This process's owner marker for its sessions, starting its reaper on first use."""
    global _owner
    with _lock:
        if _owner is not None and _owner[0] == os.getpid() and _owner[2].poll() is None:
            return _owner[1]
        token = uuid.uuid4().hex
        reaper = subprocess.Popen(
            [sys.executable, "-I", "-S", str(Path(__file__).resolve()), token],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C to the terminal must not kill it before its owner.
            start_new_session=True,
            close_fds=True,
        )
        _owner = (os.getpid(), token, reaper)
        return token


def _reap(token: str) -> None:
    """Wait until the owner's end of stdin closes, then kill what carries its marker."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    kill_marked(OWNER_VAR, token)


if __name__ == "__main__":
    _reap(sys.argv[1])

"""Run a task's verify command and turn its output into a :class:`TestReport`.

The command runs through the shell in the task's worktree, in its own process group, so a
hung test run is killed whole at its timeout. API keys are removed from its environment: a
project's tests have no business with them, and it keeps them out of test output.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from claudecluster.models import TestReport
from claudecluster.redact import redact, secret_values

TAIL_LINES = 60
TAIL_BYTES = 8_000

_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")
# pytest's last line looks like "==== 3 passed, 1 skipped in 0.12s ====" or, with -q,
# "3 passed, 1 skipped in 0.12s"; anything else is not a pytest summary.
_SUMMARY = re.compile(r"^=*\s*(\d+ \w+(, )?)+.* in [\d.]+s\b.*$")


def parse_pytest_counts(output: str) -> tuple[int | None, int | None, int | None]:
    """(passed, failed, skipped) from pytest's summary line; Nones if there is none."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if _SUMMARY.match(line) or line.startswith("no tests ran"):
            counts = {"passed": 0, "failed": 0, "skipped": 0}
            for number, word in _COUNT.findall(line):
                key = "failed" if word.startswith("error") else word
                key = {"xfailed": "skipped", "xpassed": "passed"}.get(key, key)
                counts[key] += int(number)
            return counts["passed"], counts["failed"], counts["skipped"]
    return None, None, None


def _tail(text: str) -> str:
    tail = "\n".join(text.splitlines()[-TAIL_LINES:])
    return tail[-TAIL_BYTES:]


def verify_env() -> dict[str, str]:
    """This process's environment without API keys and tokens."""
    secrets = set(secret_values())
    return {k: v for k, v in os.environ.items() if v not in secrets}


def run_verify(command: str, cwd: Path, timeout_s: float) -> TestReport:
    """Run ``command`` in ``cwd`` and report; kills the whole process group on timeout."""
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        shell=True,
        cwd=cwd,
        env=verify_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    timed_out = False
    try:
        out, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(process.pid)
        out, _ = process.communicate()
    finally:
        # Children that backgrounded themselves would otherwise outlive the verify step.
        _kill_group(process.pid)
    output = redact(out.decode(errors="replace"))
    passed, failed, skipped = parse_pytest_counts(output)
    tail = _tail(output)
    if timed_out:
        tail += f"\n[killed after {timeout_s:g} s verify timeout]"
    return TestReport(
        command=command,
        exit_code=None if timed_out else process.returncode,
        passed=passed,
        failed=failed,
        skipped=skipped,
        duration_s=round(time.monotonic() - started, 3),
        timed_out=timed_out,
        output_tail=tail,
    )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)

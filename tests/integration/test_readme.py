"""The README's "Run it on Prefect" walkthrough, run as written.

The bash block is taken from README.md as it stands and run by bash from the repository root,
top to bottom, with ``set -e``: the scripted model (``claudecluster demo --serve-model``), the
embedded server, ``claudecluster setup``, the sweep's block, ``prefect deploy --all``, a
process worker, three goal runs (deployment local, deployment pool, CLI) and the sweep. Only
where things are kept is changed (a temporary ClaudeCluster and Prefect home), and the
background jobs and the server are stopped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from claudecluster.prefect_server import stop_server

pytestmark = [pytest.mark.integration, pytest.mark.prefect_server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DONE = "README-WALKTHROUGH-DONE"


def readme_block(section: str) -> str:
    """The first ```bash block of the README section headed ``section``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    match = re.search(r"```bash\n(.*?)```", text[start:end], re.S)
    assert match, f"no bash block in README section {section!r}"
    return match.group(1)


def run_walkthrough(tmp_path: Path, block: str) -> tuple[str, Path]:
    """Run ``block`` with bash from the repository root, as a new user's shell would (the
    venv active, nothing of Prefect's set); stop what it left running. Its output and the
    sample repository it made."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ANTHROPIC_"))}
    env.update(
        {
            "CLAUDECLUSTER_HOME": str(home),
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # The interpreter running the tests is the one the README's shell has activated.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "TMPDIR": str(tmp_path),
        }
    )
    script = (
        "set -euo pipefail\n"
        "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + block + f'echo {DONE} "$REPO"\n'
    )
    untracked_before = untracked_files()
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the worker's flow runs, the model
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        stop_server(home)  # the embedded server the walkthrough started
    output = stdout + stderr
    assert proc.returncode == 0 and DONE in stdout, output[-5000:]
    # The walkthrough runs from the user's checkout: it must leave nothing behind in it.
    assert untracked_files() == untracked_before
    return output, Path(stdout.split(DONE, 1)[1].split()[0])


def untracked_files() -> set[str]:
    status = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line[3:] for line in status.splitlines() if line.startswith("??")}


def integration_branches(repo: Path) -> list[str]:
    return subprocess.run(
        ["git", "-C", str(repo), "branch", "--list", "claudecluster/*/integration"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def test_run_it_on_prefect_as_written(tmp_path: Path) -> None:
    output, repo = run_walkthrough(tmp_path, readme_block("Run it on Prefect"))
    # Three goal runs and the sweep each ended on an integration branch.
    assert len(integration_branches(repo)) == 4, output[-3000:]
    # The two goal deployment runs and the sweep deployment run completed.
    assert output.count("Flow run finished successfully") == 3, output[-3000:]


def test_pull_requests_as_written(tmp_path: Path) -> None:
    """The "Pull requests and reviews" walkthrough, against the forge test server."""
    output, repo = run_walkthrough(tmp_path, readme_block("Pull requests and reviews"))
    pull = "http://127.0.0.1:8092/acme/sample/pull/1"
    assert f"PR:      {pull} (#1, opened)" in output, output[-3000:]
    # What a reviewer sees: the body from the run, one review comment, one line comment.
    assert "| `pricing-tests` | succeeded |" in output
    assert "<details><summary>Review summary</summary>" in output
    assert "inventory/pricing.py 6 For a negative value the nudge points the wrong way" in output
    # `review` of the pull request posted (edited) the same comment.
    assert "### ClaudeCluster review of pull request #1" in output
    assert "posted the review: " in output
    # `respond` answered the reviewer's thread on the pull request's branch.
    assert "answered inventory/pricing.py:6 and resolved it" in output, output[-3000:]
    forge_repo = Path(f"{repo}.forge") / "acme" / "sample.git"
    branch = next(b for b in integration_branches(forge_repo) if b)
    log = subprocess.run(
        ["git", "-C", str(forge_repo), "log", "--format=%s", branch],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Answer the review of inventory/pricing.py" in log


def test_typescript_as_written(tmp_path: Path) -> None:
    """The "TypeScript" walkthrough: the demo goal submitted and watched from Node."""
    if not (shutil.which("node") and shutil.which("npm")):
        if os.environ.get("CLAUDECLUSTER_REQUIRE_NODE") == "1":
            pytest.fail("the TypeScript walkthrough needs Node and npm")
        pytest.skip("the TypeScript walkthrough needs Node 20 or newer and npm")
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## TypeScript\n") :]
    shown = re.search(r"```js\n(.*?)```", section, re.S)
    example = ROOT / "sdk" / "typescript" / "examples" / "demo-goal.mjs"
    assert shown and shown.group(1) == example.read_text(), "the README's example is not the file"
    assert len(example.read_text().splitlines()) <= 22

    output, repo = run_walkthrough(tmp_path, readme_block("TypeScript"))

    # The task table as it ran: all five demo tasks, running, then succeeded.
    for task in ("stock-docs", "pricing-docs", "pricing-refactor", "pricing-tests", "readme-usage"):
        assert task in output, output[-3000:]
    assert "'running'" in output and "'succeeded'" in output, output[-3000:]
    assert "run completed" in output, output[-3000:]
    branches = integration_branches(repo)
    assert len(branches) == 1 and f"succeeded: 5 tasks on {branches[0]}" in output, output[-3000:]


@pytest.mark.docker
def test_run_in_containers_as_written(tmp_path: Path) -> None:
    """Steps 0 to 4 of "Run it on Prefect", then the Docker block of "Run in containers"."""
    if os.geteuid() != 0 or shutil.which("docker") is None:
        missing = (
            pytest.fail if os.environ.get("CLAUDECLUSTER_REQUIRE_DOCKER") == "1" else pytest.skip
        )
        missing("the containers walkthrough runs as root with a Docker engine (.ci/docker-setup)")
    prefect_steps = readme_block("Run it on Prefect").split("\n# 5.", 1)[0]
    output, repo = run_walkthrough(
        tmp_path, prefect_steps + "\n" + readme_block("Run in containers")
    )
    [branch] = integration_branches(repo)
    assert "succeeded" in output, output[-3000:]
    log = subprocess.run(
        ["git", "-C", str(repo), "log", "--format=%B", branch],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert log.count("ClaudeCluster-Outcome: finished") == 5, output[-3000:]

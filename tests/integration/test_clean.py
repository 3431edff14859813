"""`claudecluster clean` reclaims finished worktrees and keeps unfinished work."""

from __future__ import annotations

from pathlib import Path

from claudecluster import gitops
from tests.conftest import git
from tests.integration.test_cli import cli


class TestClean:
    """Finished worktrees go; dirty ones stay with a reason; branches are never deleted."""

    def test_clean_keeps_unfinished_work(self, repo: Path, tmp_path: Path) -> None:
        root = tmp_path / "worktrees"
        handle = gitops.open_repo(repo)
        base = gitops.resolve_commit(handle)
        done = gitops.add_worktree(handle, root / "r1" / "done", "claudecluster/r1/done", base)
        (done.path / "work.txt").write_text("committed\n")
        assert gitops.commit_all(done.path, "done") is not None
        dirty = gitops.add_worktree(handle, root / "r1" / "dirty", "claudecluster/r1/dirty", base)
        (dirty.path / "unsaved.txt").write_text("not committed yet\n")

        dry = cli("clean", "--root", str(root), "--dry-run")

        assert dry.returncode == 0, dry.stderr
        assert f"would remove {done.path}" in dry.stdout
        assert done.path.exists()

        proc = cli("clean", "--root", str(root))

        assert proc.returncode == 0, proc.stderr
        assert f"removed {done.path}" in proc.stdout
        assert f"kept {dirty.path}: it has uncommitted changes" in proc.stdout
        assert not done.path.exists()
        assert (dirty.path / "unsaved.txt").read_text() == "not committed yet\n"
        # The removed worktree's commits are still on their branch.
        assert git(repo, "show", "claudecluster/r1/done:work.txt") == "committed\n"
        assert str(done.path) not in git(repo, "worktree", "list")

"""Where each sweep last succeeded, kept in a Prefect Variable per sweep name.

The Variable ``claudecluster-sweep-<name>`` maps a repository key (its root commit, shared
by all its clones) to the base commit of the last successful sweep of that name, so
"changed since the last sweep" works across machines that share the Prefect server.
"""

from __future__ import annotations

import git
from prefect.variables import Variable

from claudecluster import gitops
from claudecluster.errors import UsageError
from claudecluster.sweep import repo_key, state_variable


def last_swept_commit(name: str, repo: git.Repo) -> str | None:
    """The base commit of the last successful sweep ``name`` of this repository."""
    value = Variable.get(state_variable(name), default=None)
    if not isinstance(value, dict):
        return None
    commit = value.get(repo_key(repo))
    if not isinstance(commit, str):
        return None
    try:
        return gitops.resolve_commit(repo, commit)
    except UsageError:
        return None  # that commit is gone (e.g. history rewritten): sweep everything again


def record_sweep(name: str, repo: git.Repo, base: str) -> None:
    """Remember ``base`` as the last successful sweep ``name`` of this repository."""
    variable = state_variable(name)
    value = Variable.get(variable, default=None)
    data = dict(value) if isinstance(value, dict) else {}
    data[repo_key(repo)] = base
    Variable.set(variable, data, overwrite=True)

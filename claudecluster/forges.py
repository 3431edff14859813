"""Forges: where a repository's pull requests live (GitHub, GitHub Enterprise, Gitea, Forgejo).

:func:`locate` works out the forge, owner and name from a git remote URL;
:func:`connect` returns a :class:`Forge` for it: :class:`GitHubForge` through githubkit,
:class:`GiteaForge` through Gitea's REST API (Forgejo speaks the same). The token is held
by the forge object and sent in request headers only; git gets it through its environment
(:func:`claudecluster.remote.credential_env`), never in a URL.

Which forge: ``github.com`` is GitHub (API ``https://api.github.com``); any other host
needs its API base URL (``--forge-api-url``, the repository block's ``forge_api_url`` or
``CLAUDECLUSTER_FORGE_API_URL``): ``https://HOST/api/v3`` is GitHub Enterprise and
``https://HOST/api/v1`` is Gitea or Forgejo.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from claudecluster.errors import ForgeAccessError, ForgeError

TOKEN_VARS = ("CLAUDECLUSTER_FORGE_TOKEN", "GITHUB_TOKEN", "GH_TOKEN", "GITEA_TOKEN")
"""Where a forge token is looked for in the environment, in this order. Sessions never see
any of them (:func:`claudecluster.session.session_env` blanks them)."""

API_URL_VAR = "CLAUDECLUSTER_FORGE_API_URL"


class ForgeKind(StrEnum):
    GITHUB = "github"
    GITEA = "gitea"


@dataclass(frozen=True)
class ForgeRepository:
    """A repository on a forge."""

    kind: ForgeKind
    api_url: str
    web_url: str  # https://HOST/OWNER/NAME
    owner: str
    name: str

    def compare_url(self, base: str, head: str) -> str:
        if self.kind is ForgeKind.GITEA:
            return f"{self.web_url}/compare/{base}...{head}"
        return f"{self.web_url}/compare/{base}...{head}?expand=1"


@dataclass
class ForgePull:
    """A pull request as a forge reports it."""

    number: int
    url: str
    title: str
    body: str
    state: str
    draft: bool
    head: str
    base: str


@dataclass
class ThreadComment:
    id: int
    author: str
    body: str


@dataclass
class ReviewThread:
    """An unresolved conversation on a line of a pull request."""

    id: str
    path: str
    line: int | None
    comments: list[ThreadComment] = field(default_factory=list)


@dataclass(frozen=True)
class LineComment:
    path: str
    line: int
    body: str


class Forge(Protocol):
    """What ClaudeCluster asks of a forge."""

    repository: ForgeRepository

    def check_access(self) -> None:
        """ForgeAccessError unless the token is valid and may push to the repository."""

    def find_open(self, head: str) -> ForgePull | None: ...

    def get(self, number: int) -> ForgePull: ...

    def create(self, *, title: str, body: str, head: str, base: str, draft: bool) -> ForgePull: ...

    def update(self, number: int, *, title: str | None, body: str) -> ForgePull: ...

    def upsert_comment(self, number: int, marker: str, body: str) -> str:
        """Edit the comment holding ``marker`` (or post it); the comment's URL."""

    def create_review(self, number: int, body: str, comments: list[LineComment]) -> None:
        """One review with line comments, as a plain comment (never an approval)."""

    def line_comments(self, number: int) -> list[LineComment]:
        """The line comments already on the pull request (to post none of them twice)."""

    def open_threads(self, number: int) -> list[ReviewThread]: ...

    def reply(self, number: int, thread: ReviewThread, body: str) -> None: ...

    def resolve(self, thread: ReviewThread) -> bool:
        """Resolve ``thread`` where the forge's API allows it; whether it did."""


def find_token(explicit: str | None = None) -> str | None:
    """The forge token: the one given (a block's), else the first of :data:`TOKEN_VARS`."""
    if explicit:
        return explicit
    return next((os.environ[v] for v in TOKEN_VARS if os.environ.get(v)), None)


_SCP_LIKE = re.compile(r"^(?:[\w.-]+@)?([\w.-]+):(?!//)(.+)$")


def locate(remote_url: str, api_url: str | None = None) -> ForgeRepository:
    """The forge repository behind ``remote_url`` (https, ssh or ``git@host:owner/name``)."""
    api_url = api_url or os.environ.get(API_URL_VAR) or None
    scp = _SCP_LIKE.match(remote_url) if "://" not in remote_url else None
    if scp:
        scheme, host, path = "https", scp.group(1), scp.group(2)
    else:
        parts = urlsplit(remote_url)
        scheme = parts.scheme if parts.scheme in ("http", "https") else "https"
        host, path = parts.netloc.rpartition("@")[2], parts.path
    segments = [s for s in path.removesuffix(".git").strip("/").split("/") if s]
    if len(segments) < 2:
        raise ForgeAccessError(
            f"cannot tell the owner and name of the repository from {remote_url}",
            forge=host,
            hint="Use a remote URL like https://HOST/OWNER/NAME.git.",
        )
    owner, name = segments[-2], segments[-1]
    if api_url is None:
        if host not in ("github.com", "www.github.com"):
            raise ForgeAccessError(
                f"which forge serves {host} is not known",
                forge=host,
                hint=f"Pass --forge-api-url https://{host}/api/v3 (GitHub Enterprise) or "
                f"https://{host}/api/v1 (Gitea, Forgejo).",
            )
        api_url = "https://api.github.com"
    api_url = api_url.rstrip("/")
    kind = ForgeKind.GITEA if api_url.endswith("/api/v1") else ForgeKind.GITHUB
    web_host = "github.com" if host == "www.github.com" else host
    return ForgeRepository(kind, api_url, f"{scheme}://{web_host}/{owner}/{name}", owner, name)


def connect(repository: ForgeRepository, token: str | None) -> Forge:
    """A forge client for ``repository``; ForgeAccessError without a token."""
    if not token:
        raise ForgeAccessError(
            f"no token for {repository.web_url}",
            forge=repository.api_url,
            hint="Export CLAUDECLUSTER_FORGE_TOKEN (or GITHUB_TOKEN), or put it in the "
            "repository block's forge_token.",
        )
    if repository.kind is ForgeKind.GITEA:
        return GiteaForge(repository, token)
    return GitHubForge(repository, token)


def _refused(repository: ForgeRepository, status: int) -> ForgeAccessError:
    return ForgeAccessError(
        f"{repository.api_url} refused the forge token for {repository.owner}/"
        f"{repository.name} (HTTP {status})",
        forge=repository.api_url,
        hint="Check the token and that it may push to the repository.",
    )


class GitHubForge:
    """GitHub and GitHub Enterprise, through githubkit."""

    def __init__(self, repository: ForgeRepository, token: str) -> None:
        from githubkit import GitHub

        self.repository = repository
        self._github = GitHub(token, base_url=repository.api_url + "/", auto_retry=False)
        self._names = (repository.owner, repository.name)

    def _call(self, what: str, call: Any) -> Any:
        from githubkit.exception import GitHubException, RequestFailed

        try:
            return call()
        except RequestFailed as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise _refused(self.repository, status) from None
            raise ForgeError(
                f"GitHub refused to {what}: HTTP {status} {exc.response.text[:200]}",
                forge=self.repository.api_url,
                status=status,
            ) from None
        except GitHubException as exc:
            raise ForgeError(
                f"cannot reach {self.repository.api_url} to {what}: {exc}",
                forge=self.repository.api_url,
            ) from None

    def check_access(self) -> None:
        repo = self._call("read the repository", lambda: self._github.rest.repos.get(*self._names))
        permissions = repo.parsed_data.permissions
        if permissions is not None and not permissions.push:
            raise ForgeAccessError(
                f"the forge token may not push to {self.repository.web_url}",
                forge=self.repository.api_url,
                hint="Use a token with write access to the repository's contents and pull "
                "requests.",
            )

    @staticmethod
    def _pull(data: Any) -> ForgePull:
        return ForgePull(
            number=data.number,
            url=data.html_url,
            title=data.title,
            body=data.body or "",
            state="merged" if getattr(data, "merged", False) is True else data.state,
            draft=bool(data.draft),
            head=data.head.ref,
            base=data.base.ref,
        )

    def find_open(self, head: str) -> ForgePull | None:
        found = self._call(
            "list pull requests",
            lambda: self._github.rest.pulls.list(
                *self._names, head=f"{self.repository.owner}:{head}", state="open"
            ),
        ).parsed_data
        return self.get(found[0].number) if found else None

    def get(self, number: int) -> ForgePull:
        response = self._call(
            "read the pull request", lambda: self._github.rest.pulls.get(*self._names, number)
        )
        return self._pull(response.parsed_data)

    def create(self, *, title: str, body: str, head: str, base: str, draft: bool) -> ForgePull:
        response = self._call(
            "open a pull request",
            lambda: self._github.rest.pulls.create(
                *self._names, title=title, body=body, head=head, base=base, draft=draft
            ),
        )
        return self._pull(response.parsed_data)

    def update(self, number: int, *, title: str | None, body: str) -> ForgePull:
        changes: dict[str, Any] = {"body": body}
        if title is not None:
            changes["title"] = title
        response = self._call(
            "update the pull request",
            lambda: self._github.rest.pulls.update(*self._names, number, **changes),
        )
        return self._pull(response.parsed_data)

    def upsert_comment(self, number: int, marker: str, body: str) -> str:
        comments = self._call(
            "read comments", lambda: self._github.rest.issues.list_comments(*self._names, number)
        ).parsed_data
        mine = next((c for c in comments if marker in (c.body or "")), None)
        if mine is not None:
            edited = self._call(
                "edit a comment",
                lambda: self._github.rest.issues.update_comment(*self._names, mine.id, body=body),
            )
            return str(edited.parsed_data.html_url)
        posted = self._call(
            "comment",
            lambda: self._github.rest.issues.create_comment(*self._names, number, body=body),
        )
        return str(posted.parsed_data.html_url)

    def create_review(self, number: int, body: str, comments: list[LineComment]) -> None:
        self._call(
            "post a review",
            lambda: self._github.rest.pulls.create_review(
                *self._names,
                number,
                event="COMMENT",
                body=body,
                comments=[
                    {"path": c.path, "line": c.line, "side": "RIGHT", "body": c.body}
                    for c in comments
                ],
            ),
        )

    def line_comments(self, number: int) -> list[LineComment]:
        found = self._call(
            "read review comments",
            lambda: self._github.rest.pulls.list_review_comments(*self._names, number),
        ).parsed_data
        return [LineComment(c.path, c.line or 0, c.body) for c in found]

    _THREADS = """
query($owner: String!, $name: String!, $number: Int!) {
  repository(owner: $owner, name: $name) {
    pullRequest(number: $number) {
      reviewThreads(first: 100) {
        nodes { id isResolved path line
          comments(first: 50) { nodes { databaseId body author { login } } } }
      }
    }
  }
}"""

    def open_threads(self, number: int) -> list[ReviewThread]:
        data = self._call(
            "read review threads",
            lambda: self._github.graphql(
                self._THREADS,
                {"owner": self.repository.owner, "name": self.repository.name, "number": number},
            ),
        )
        nodes = data["repository"]["pullRequest"]["reviewThreads"]["nodes"]
        return [
            ReviewThread(
                id=node["id"],
                path=node["path"],
                line=node.get("line"),
                comments=[
                    ThreadComment(
                        c["databaseId"], (c.get("author") or {}).get("login", ""), c["body"]
                    )
                    for c in node["comments"]["nodes"]
                ],
            )
            for node in nodes
            if not node["isResolved"]
        ]

    def reply(self, number: int, thread: ReviewThread, body: str) -> None:
        first = thread.comments[0].id
        self._call(
            "reply to a review comment",
            lambda: self._github.rest.pulls.create_reply_for_review_comment(
                *self._names, number, first, body=body
            ),
        )

    def resolve(self, thread: ReviewThread) -> bool:
        mutation = (
            "mutation($id: ID!) { resolveReviewThread(input: {threadId: $id}) "
            "{ thread { id isResolved } } }"
        )
        data = self._call(
            "resolve a review thread",
            lambda: self._github.graphql(mutation, {"threadId": thread.id}),
        )
        return bool(data["resolveReviewThread"]["thread"]["isResolved"])


class GiteaForge:
    """Gitea and Forgejo, through their REST API (``/api/v1``). Drafts are pull requests
    whose title starts with ``WIP:``; review threads can be resolved in the web UI only."""

    DRAFT_PREFIX = "WIP: "

    def __init__(self, repository: ForgeRepository, token: str) -> None:
        self.repository = repository
        self._http = httpx.Client(
            base_url=f"{repository.api_url}/repos/{repository.owner}/{repository.name}",
            headers={"Authorization": f"token {token}", "Accept": "application/json"},
            timeout=30,
        )

    def _request(self, what: str, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ForgeError(
                f"cannot reach {self.repository.api_url} to {what}: {exc}",
                forge=self.repository.api_url,
            ) from None
        if response.status_code in (401, 403):
            raise _refused(self.repository, response.status_code)
        if response.status_code >= 400:
            raise ForgeError(
                f"Gitea refused to {what}: HTTP {response.status_code} {response.text[:200]}",
                forge=self.repository.api_url,
                status=response.status_code,
            )
        return response.json() if response.content else None

    def check_access(self) -> None:
        repo = self._request("read the repository", "GET", "")
        if not (repo.get("permissions") or {}).get("push", False):
            raise ForgeAccessError(
                f"the forge token may not push to {self.repository.web_url}",
                forge=self.repository.api_url,
                hint="Use a token with write access to the repository.",
            )

    def _pull(self, data: dict[str, Any]) -> ForgePull:
        title = data["title"]
        return ForgePull(
            number=data["number"],
            url=data["html_url"],
            title=title,
            body=data.get("body") or "",
            state="merged" if data.get("merged") else data["state"],
            draft=bool(data.get("draft")) or title.startswith(self.DRAFT_PREFIX.strip()),
            head=data["head"]["ref"],
            base=data["base"]["ref"],
        )

    def find_open(self, head: str) -> ForgePull | None:
        pulls = self._request("list pull requests", "GET", "/pulls", params={"state": "open"})
        return next((self._pull(p) for p in pulls if p["head"]["ref"] == head), None)

    def get(self, number: int) -> ForgePull:
        return self._pull(self._request("read the pull request", "GET", f"/pulls/{number}"))

    def create(self, *, title: str, body: str, head: str, base: str, draft: bool) -> ForgePull:
        title = self.DRAFT_PREFIX + title if draft else title
        data = {"title": title, "body": body, "head": head, "base": base}
        return self._pull(self._request("open a pull request", "POST", "/pulls", json=data))

    def update(self, number: int, *, title: str | None, body: str) -> ForgePull:
        data: dict[str, Any] = {"body": body}
        if title is not None:
            data["title"] = title
        return self._pull(
            self._request("update the pull request", "PATCH", f"/pulls/{number}", json=data)
        )

    def upsert_comment(self, number: int, marker: str, body: str) -> str:
        comments = self._request("read comments", "GET", f"/issues/{number}/comments")
        mine = next((c for c in comments if marker in (c.get("body") or "")), None)
        if mine is not None:
            edited = self._request(
                "edit a comment", "PATCH", f"/issues/comments/{mine['id']}", json={"body": body}
            )
            return str(edited["html_url"])
        posted = self._request("comment", "POST", f"/issues/{number}/comments", json={"body": body})
        return str(posted["html_url"])

    def create_review(self, number: int, body: str, comments: list[LineComment]) -> None:
        data = {
            "event": "COMMENT",
            "body": body,
            "comments": [
                {"path": c.path, "body": c.body, "new_position": c.line} for c in comments
            ],
        }
        self._request("post a review", "POST", f"/pulls/{number}/reviews", json=data)

    def line_comments(self, number: int) -> list[LineComment]:
        return [
            LineComment(t.path, t.line or 0, t.comments[0].body)
            for t in self._threads(number, resolved=True)
        ]

    def open_threads(self, number: int) -> list[ReviewThread]:
        return self._threads(number, resolved=False)

    def _threads(self, number: int, *, resolved: bool) -> list[ReviewThread]:
        threads: list[ReviewThread] = []
        for review in self._request("read reviews", "GET", f"/pulls/{number}/reviews"):
            comments = self._request(
                "read review comments", "GET", f"/pulls/{number}/reviews/{review['id']}/comments"
            )
            for c in comments:
                if c.get("resolver") and not resolved:
                    continue
                threads.append(
                    ReviewThread(
                        id=str(c["id"]),
                        path=c["path"],
                        line=c.get("position") or c.get("new_position"),
                        comments=[ThreadComment(c["id"], c["user"]["login"], c["body"])],
                    )
                )
        return threads

    def reply(self, number: int, thread: ReviewThread, body: str) -> None:
        # Gitea's API has no reply to a review comment: answer on the conversation instead,
        # quoting the comment.
        quoted = "\n".join("> " + line for line in thread.comments[0].body.splitlines())
        text = f"On `{thread.path}` line {thread.line}:\n{quoted}\n\n{body}"
        self._request("comment", "POST", f"/issues/{number}/comments", json={"body": text})

    def resolve(self, thread: ReviewThread) -> bool:
        return False

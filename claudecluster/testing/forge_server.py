"""A forge on loopback for tests and the README: real git over HTTP and a GitHub-shaped API.

:class:`ForgeServer` serves bare repositories with ``git http-backend`` (smart HTTP, so
clones, fetches and pushes are real), behind token authentication, and a stateful subset of
the GitHub REST API under ``/api/v3`` (repositories, pull requests, issue comments, reviews,
review comments and replies) plus the two GraphQL operations ClaudeCluster uses (review
threads, resolving one). Every answer is validated against githubkit's own models before it
is sent, so a client that works here parses GitHub's answers too. ``flavor="gitea"`` serves
the Gitea/Forgejo shape of the same state under ``/api/v1`` instead.

Run one by hand: ``python -m claudecluster.testing.forge_server --root DIR --token T``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import re
import subprocess
import threading
import types
import typing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

BOT_LOGIN = "claudecluster-bot"
REVIEWER_LOGIN = "reviewer"

Flavor = Literal["github", "gitea"]


@dataclass
class Comment:
    """An issue comment, a review comment (with ``path``) or a reply (``in_reply_to``)."""

    id: int
    body: str
    user: str
    path: str | None = None
    line: int | None = None
    in_reply_to: int | None = None
    review_id: int | None = None
    resolved: bool = False


@dataclass
class PullState:
    number: int
    title: str
    body: str
    head: str
    base: str
    draft: bool
    state: str = "open"
    comments: list[Comment] = field(default_factory=list)
    review_comments: list[Comment] = field(default_factory=list)
    reviews: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RepoState:
    owner: str
    name: str
    pulls: dict[int, PullState] = field(default_factory=dict)


class ForgeServer:
    """Bare repositories under ``root`` served at ``http://127.0.0.1:<port>/<owner>/<name>.git``
    with the forge's API beside them. Use as a context manager."""

    def __init__(
        self,
        root: Path,
        token: str,
        *,
        flavor: Flavor = "github",
        reviewer_token: str | None = None,
        port: int = 0,
    ) -> None:
        self.root = root
        self.token = token
        self.flavor = flavor
        self.port = port
        # Who each token is: ClaudeCluster's, and a person reviewing its pull requests.
        self.users = {token: BOT_LOGIN}
        if reviewer_token:
            self.users[reviewer_token] = REVIEWER_LOGIN
        self.caller = threading.local()
        self.repos: dict[tuple[str, str], RepoState] = {}
        self.pushes: list[str] = []  # repository of every accepted receive-pack
        self.api_calls: list[str] = []  # "METHOD path" of every API request
        self.rejected = 0  # requests refused for a missing or wrong token
        self._ids = itertools.count(1000)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """The API base URL a client is configured with."""
        return f"{self.url}/api/v3" if self.flavor == "github" else f"{self.url}/api/v1"

    def git_url(self, owner: str, name: str) -> str:
        return f"{self.url}/{owner}/{name}.git"

    def create_repo(self, owner: str, name: str, *, source: Path | None = None) -> Path:
        """A bare repository (with ``source``'s branches pushed into it, if given)."""
        path = self.root / owner / f"{name}.git"
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "init", "--quiet", "--bare", "--initial-branch=main", str(path)], check=True
        )
        subprocess.run(["git", "-C", str(path), "config", "http.receivepack", "true"], check=True)
        if source is not None:
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(source),
                    "push",
                    "--quiet",
                    str(path),
                    "refs/heads/*:refs/heads/*",
                ],
                check=True,
            )
        self.repos[(owner, name)] = RepoState(owner, name)
        return path

    def add_review_comment(
        self, owner: str, name: str, number: int, *, path: str, line: int, body: str, user: str
    ) -> int:
        """A reviewer's comment on a line of a pull request (a new thread); its id."""
        pull = self.repos[(owner, name)].pulls[number]
        comment = Comment(next(self._ids), body, user, path=path, line=line)
        pull.review_comments.append(comment)
        return comment.id

    def pull(self, owner: str, name: str, number: int) -> PullState:
        return self.repos[(owner, name)].pulls[number]

    def __enter__(self) -> ForgeServer:
        handler = type("Handler", (_Handler,), {"forge": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # -- requests ---------------------------------------------------------------------

    def user_of(self, header: str | None) -> str | None:
        """The login a request's Authorization header belongs to; None if it is no one's."""
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("token", "bearer"):
            return self.users.get(value)
        if scheme.lower() == "basic":
            with contextlib.suppress(ValueError):
                return self.users.get(base64.b64decode(value).decode().partition(":")[2])
        return None

    def api(
        self, user: str, method: str, path: str, query: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        with self._lock:
            self.caller.login = user
            self.api_calls.append(f"{method} {path}")
            if self.flavor == "github":
                return _GitHubApi(self).handle(method, path, query, body)
            return _GiteaApi(self).handle(method, path, query, body)

    def next_id(self) -> int:
        return next(self._ids)


class _Handler(BaseHTTPRequestHandler):
    forge: ForgeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        body = self._body()
        user = self.forge.user_of(self.headers.get("Authorization"))
        if user is None:
            self.forge.rejected += 1
            self._send(
                401,
                json.dumps({"message": "Bad credentials"}).encode(),
                {"Content-Type": "application/json", "WWW-Authenticate": 'Basic realm="forge"'},
            )
            return
        if parts.path.startswith("/api/"):
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            data = json.loads(body) if body else None
            status, answer = self.forge.api(user, self.command, parts.path, query, data)
            payload = b"" if answer is None else json.dumps(answer).encode()
            self._send(status, payload, {"Content-Type": "application/json"})
            return
        self._git(parts.path, parts.query, body)

    def _git(self, path: str, query: str, body: bytes) -> None:
        env = {
            **os.environ,
            "GIT_PROJECT_ROOT": str(self.forge.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": BOT_LOGIN,
            "REMOTE_ADDR": "127.0.0.1",
        }
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        proc = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        )
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        status, headers = 200, {}
        for line in head.decode(errors="replace").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers[key] = value.strip()
        if path.endswith("/git-receive-pack") and status == 200:
            self.forge.pushes.append(path.removesuffix("/git-receive-pack"))
        self._send(status, payload, headers)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle  # noqa: N815 - the stdlib names them


# -- the API shapes ------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def complete(model: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with placeholders for the required fields of ``model`` it lacks, checked by
    ``model`` itself: the answer is one a githubkit client accepts."""
    filled = dict(data)
    for name, info in model.model_fields.items():
        key = info.alias or name
        if key in filled or not info.is_required():
            continue
        filled[key] = _placeholder(info.annotation, key)
    model.model_validate(filled)
    return filled


def _placeholder(annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args:
            return None
        return _placeholder(args[0], key)
    if origin is Literal:
        return args[0]
    if origin in (list, tuple, set):
        return []
    if origin is dict:
        return {}
    if origin is typing.Annotated:
        return _placeholder(args[0], key)
    if isinstance(annotation, type):
        if issubclass(annotation, bool):
            return False
        if issubclass(annotation, int):
            return 1
        if issubclass(annotation, float):
            return 0.0
        if issubclass(annotation, datetime):
            return _now()
        if issubclass(annotation, str):
            return "https://forge.invalid/" + key if "url" in key else key
        if hasattr(annotation, "model_fields"):
            return complete(annotation, {})
    return None


class _GitHubApi:
    def __init__(self, forge: ForgeServer) -> None:
        self.forge = forge

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        if path == "/api/graphql":
            return self.graphql(body)
        match = re.fullmatch(r"/api/v3/repos/([^/]+)/([^/]+)(/.*)?", path)
        repo = self.forge.repos.get((match.group(1), match.group(2))) if match else None
        if match is None or repo is None:
            return 404, {"message": "Not Found"}
        rest = (match.group(3) or "").rstrip("/")
        for pattern, verb, handler in self.routes():
            found = re.fullmatch(pattern, rest)
            if found and verb == method:
                return handler(repo, *found.groups(), query=query, body=body or {})  # type: ignore[no-any-return]
        return 404, {"message": "Not Found"}

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("", "GET", self.get_repo),
            ("/pulls", "GET", self.list_pulls),
            ("/pulls", "POST", self.create_pull),
            (r"/pulls/(\d+)", "GET", self.get_pull),
            (r"/pulls/(\d+)", "PATCH", self.update_pull),
            (r"/issues/(\d+)/comments", "GET", self.list_comments),
            (r"/issues/(\d+)/comments", "POST", self.create_comment),
            (r"/issues/comments/(\d+)", "PATCH", self.update_comment),
            (r"/pulls/(\d+)/reviews", "POST", self.create_review),
            (r"/pulls/(\d+)/reviews", "GET", self.list_reviews),
            (r"/pulls/(\d+)/comments", "GET", self.list_review_comments),
            (r"/pulls/(\d+)/comments", "POST", self.create_review_comment),
            (r"/pulls/(\d+)/comments/(\d+)/replies", "POST", self.reply),
        ]

    # shapes

    def user(self, login: str) -> dict[str, Any]:
        from githubkit_schemas.latest.models import SimpleUser

        return complete(SimpleUser, {"login": login, "id": 1, "type": "User"})

    def repo_json(self, repo: RepoState) -> dict[str, Any]:
        from githubkit_schemas.latest.models import FullRepository

        return complete(
            FullRepository,
            {
                "name": repo.name,
                "full_name": f"{repo.owner}/{repo.name}",
                "owner": self.user(repo.owner),
                "private": True,
                "default_branch": "main",
                "html_url": f"{self.forge.url}/{repo.owner}/{repo.name}",
                "clone_url": self.forge.git_url(repo.owner, repo.name),
                "permissions": {"admin": False, "push": True, "pull": True},
            },
        )

    def pull_json(self, repo: RepoState, pull: PullState, model: Any = None) -> dict[str, Any]:
        from githubkit_schemas.latest.models import PullRequest

        def ref(name: str) -> dict[str, Any]:
            return {
                "ref": name,
                "label": f"{repo.owner}:{name}",
                "sha": "0" * 40,
                "repo": self.repo_json(repo),
                "user": self.user(repo.owner),
            }

        url = f"{self.forge.url}/{repo.owner}/{repo.name}/pull/{pull.number}"
        return complete(
            model or PullRequest,
            {
                "number": pull.number,
                "id": pull.number,
                "state": pull.state,
                "title": pull.title,
                "body": pull.body,
                "draft": pull.draft,
                "html_url": url,
                "head": ref(pull.head),
                "base": ref(pull.base),
                "user": self.user(BOT_LOGIN),
                "merged": False,
                "locked": False,
                "created_at": _now(),
                "updated_at": _now(),
            },
        )

    def comment_json(self, repo: RepoState, pull: PullState, comment: Comment) -> dict[str, Any]:
        from githubkit_schemas.latest.models import IssueComment

        return complete(
            IssueComment,
            {
                "id": comment.id,
                "body": comment.body,
                "user": self.user(comment.user),
                "html_url": f"{self.forge.url}/{repo.owner}/{repo.name}/pull/{pull.number}"
                f"#issuecomment-{comment.id}",
                "created_at": _now(),
                "updated_at": _now(),
            },
        )

    def review_comment_json(self, repo: RepoState, pull: PullState, c: Comment) -> dict[str, Any]:
        from githubkit_schemas.latest.models import PullRequestReviewComment

        data: dict[str, Any] = {
            "id": c.id,
            "body": c.body,
            "path": c.path,
            "line": c.line,
            "side": "RIGHT",
            "user": self.user(c.user),
            "pull_request_review_id": c.review_id,
            "html_url": f"{self.forge.url}/{repo.owner}/{repo.name}/pull/{pull.number}"
            f"#discussion_r{c.id}",
            "created_at": _now(),
            "updated_at": _now(),
            "_links": {
                "self": {"href": "https://forge.invalid/self"},
                "html": {"href": "https://forge.invalid/html"},
                "pull_request": {"href": "https://forge.invalid/pull"},
            },
        }
        if c.in_reply_to is not None:
            data["in_reply_to_id"] = c.in_reply_to
        return complete(PullRequestReviewComment, data)

    # handlers

    def get_repo(self, repo: RepoState, **_: Any) -> tuple[int, Any]:
        return 200, self.repo_json(repo)

    def list_pulls(self, repo: RepoState, *, query: dict[str, str], **_: Any) -> tuple[int, Any]:
        from githubkit_schemas.latest.models import PullRequestSimple

        state = query.get("state", "open")
        head = query.get("head")
        found = [
            p
            for p in repo.pulls.values()
            if (state == "all" or p.state == state)
            and (head is None or head in (p.head, f"{repo.owner}:{p.head}"))
        ]
        return 200, [self.pull_json(repo, p, PullRequestSimple) for p in found]

    def create_pull(self, repo: RepoState, *, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        head = body["head"].split(":")[-1]
        if any(p.head == head and p.state == "open" for p in repo.pulls.values()):
            return 422, {
                "message": "Validation Failed",
                "errors": [{"message": f"A pull request already exists for {head}."}],
            }
        number = len(repo.pulls) + 1
        pull = PullState(
            number,
            body["title"],
            body.get("body") or "",
            head,
            body["base"],
            bool(body.get("draft")),
        )
        repo.pulls[number] = pull
        return 201, self.pull_json(repo, pull)

    def get_pull(self, repo: RepoState, number: str, **_: Any) -> tuple[int, Any]:
        pull = repo.pulls.get(int(number))
        return (200, self.pull_json(repo, pull)) if pull else (404, {"message": "Not Found"})

    def update_pull(
        self, repo: RepoState, number: str, *, body: dict[str, Any], **_: Any
    ) -> tuple[int, Any]:
        pull = repo.pulls[int(number)]
        for key in ("title", "body", "state"):
            if key in body:
                setattr(pull, key, body[key])
        return 200, self.pull_json(repo, pull)

    def list_comments(self, repo: RepoState, number: str, **_: Any) -> tuple[int, Any]:
        pull = repo.pulls[int(number)]
        return 200, [self.comment_json(repo, pull, c) for c in pull.comments]

    def create_comment(
        self, repo: RepoState, number: str, *, body: dict[str, Any], **_: Any
    ) -> tuple[int, Any]:
        pull = repo.pulls[int(number)]
        comment = Comment(self.forge.next_id(), body["body"], self.forge.caller.login)
        pull.comments.append(comment)
        return 201, self.comment_json(repo, pull, comment)

    def update_comment(
        self, repo: RepoState, comment_id: str, *, body: dict[str, Any], **_: Any
    ) -> tuple[int, Any]:
        for pull in repo.pulls.values():
            for comment in pull.comments:
                if comment.id == int(comment_id):
                    comment.body = body["body"]
                    return 200, self.comment_json(repo, pull, comment)
        return 404, {"message": "Not Found"}

    def create_review(
        self, repo: RepoState, number: str, *, body: dict[str, Any], **_: Any
    ) -> tuple[int, Any]:
        from githubkit_schemas.latest.models import PullRequestReview

        pull = repo.pulls[int(number)]
        if body.get("event") not in ("COMMENT", "REQUEST_CHANGES", "APPROVE"):
            return 422, {"message": "Validation Failed: event"}
        review_id = self.forge.next_id()
        for item in body.get("comments", []):
            if "line" not in item or "path" not in item:
                return 422, {"message": "Validation Failed: comments need path and line"}
            pull.review_comments.append(
                Comment(
                    self.forge.next_id(),
                    item["body"],
                    self.forge.caller.login,
                    path=item["path"],
                    line=int(item["line"]),
                    review_id=review_id,
                )
            )
        review = {
            "id": review_id,
            "body": body.get("body", ""),
            "event": body["event"],
            "comments": body.get("comments", []),
        }
        pull.reviews.append(review)
        return 200, complete(
            PullRequestReview,
            {
                "id": review_id,
                "body": review["body"],
                "state": "COMMENTED",
                "user": self.user(BOT_LOGIN),
                "commit_id": "0" * 40,
                "html_url": f"{self.forge.url}/{repo.owner}/{repo.name}/pull/{pull.number}",
                "_links": {
                    "html": {"href": "https://forge.invalid/html"},
                    "pull_request": {"href": "https://forge.invalid/pull"},
                },
            },
        )

    def list_reviews(self, repo: RepoState, number: str, **_: Any) -> tuple[int, Any]:
        return 200, []

    def list_review_comments(self, repo: RepoState, number: str, **_: Any) -> tuple[int, Any]:
        pull = repo.pulls[int(number)]
        return 200, [self.review_comment_json(repo, pull, c) for c in pull.review_comments]

    def create_review_comment(
        self, repo: RepoState, number: str, *, body: dict[str, Any], **_: Any
    ) -> tuple[int, Any]:
        pull = repo.pulls[int(number)]
        if "path" not in body or "line" not in body:
            return 422, {"message": "Validation Failed: path and line are required"}
        comment = Comment(
            self.forge.next_id(),
            body["body"],
            self.forge.caller.login,
            path=body["path"],
            line=int(body["line"]),
        )
        pull.review_comments.append(comment)
        return 201, self.review_comment_json(repo, pull, comment)

    def reply(
        self, repo: RepoState, number: str, comment_id: str, *, body: dict[str, Any], **_: Any
    ) -> tuple[int, Any]:
        pull = repo.pulls[int(number)]
        parent = next((c for c in pull.review_comments if c.id == int(comment_id)), None)
        if parent is None:
            return 404, {"message": "Not Found"}
        reply = Comment(
            self.forge.next_id(),
            body["body"],
            self.forge.caller.login,
            path=parent.path,
            line=parent.line,
            in_reply_to=parent.id,
        )
        pull.review_comments.append(reply)
        return 201, self.review_comment_json(repo, pull, reply)

    def graphql(self, body: dict[str, Any]) -> tuple[int, Any]:
        query, variables = body.get("query", ""), body.get("variables") or {}
        if "resolveReviewThread" in query:
            thread = variables["threadId"]
            for repo in self.forge.repos.values():
                for pull in repo.pulls.values():
                    for c in pull.review_comments:
                        if f"thread-{c.id}" == thread:
                            c.resolved = True
                            return 200, {
                                "data": {
                                    "resolveReviewThread": {
                                        "thread": {"id": thread, "isResolved": True}
                                    }
                                }
                            }
            return 200, {"errors": [{"message": f"no thread {thread}"}]}
        if "reviewThreads" in query:
            repo = self.forge.repos[(variables["owner"], variables["name"])]
            pull = repo.pulls[int(variables["number"])]
            threads = []
            for top in (c for c in pull.review_comments if c.in_reply_to is None):
                members = [top] + [c for c in pull.review_comments if c.in_reply_to == top.id]
                threads.append(
                    {
                        "id": f"thread-{top.id}",
                        "isResolved": top.resolved,
                        "path": top.path,
                        "line": top.line,
                        "comments": {
                            "nodes": [
                                {"databaseId": c.id, "body": c.body, "author": {"login": c.user}}
                                for c in members
                            ]
                        },
                    }
                )
            return 200, {
                "data": {"repository": {"pullRequest": {"reviewThreads": {"nodes": threads}}}}
            }
        return 200, {"errors": [{"message": "unsupported query"}]}


class _GiteaApi:
    """The Gitea/Forgejo shape: drafts are titles starting with ``WIP:``, reviews take
    ``new_position`` for a line, and review threads are resolved in the web UI only."""

    def __init__(self, forge: ForgeServer) -> None:
        self.forge = forge

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        match = re.fullmatch(r"/api/v1/repos/([^/]+)/([^/]+)(/.*)?", path)
        repo = self.forge.repos.get((match.group(1), match.group(2))) if match else None
        if match is None or repo is None:
            return 404, {"message": "Not Found"}
        rest, body = (match.group(3) or "").rstrip("/"), body or {}
        if rest == "" and method == "GET":
            return 200, {
                "name": repo.name,
                "full_name": f"{repo.owner}/{repo.name}",
                "default_branch": "main",
                "permissions": {"push": True},
                "html_url": f"{self.forge.url}/{repo.owner}/{repo.name}",
            }
        if rest == "/pulls" and method == "GET":
            state = query.get("state", "open")
            return 200, [
                self.pull(repo, p)
                for p in repo.pulls.values()
                if state == "all" or p.state == state
            ]
        if rest == "/pulls" and method == "POST":
            head = body["head"]
            if any(p.head == head and p.state == "open" for p in repo.pulls.values()):
                return 409, {"message": "pull request already exists"}
            number = len(repo.pulls) + 1
            title = body["title"]
            repo.pulls[number] = PullState(
                number, title, body.get("body") or "", head, body["base"], title.startswith("WIP:")
            )
            return 201, self.pull(repo, repo.pulls[number])
        if found := re.fullmatch(r"/pulls/(\d+)", rest):
            pull = repo.pulls[int(found.group(1))]
            if method == "PATCH":
                for key in ("title", "body", "state"):
                    if key in body:
                        setattr(pull, key, body[key])
                pull.draft = pull.title.startswith("WIP:")
            return 200, self.pull(repo, pull)
        if found := re.fullmatch(r"/issues/(\d+)/comments", rest):
            pull = repo.pulls[int(found.group(1))]
            if method == "POST":
                comment = Comment(self.forge.next_id(), body["body"], BOT_LOGIN)
                pull.comments.append(comment)
                return 201, self.comment(comment)
            return 200, [self.comment(c) for c in pull.comments]
        if (found := re.fullmatch(r"/issues/comments/(\d+)", rest)) and method == "PATCH":
            for pull in repo.pulls.values():
                for comment in pull.comments:
                    if comment.id == int(found.group(1)):
                        comment.body = body["body"]
                        return 200, self.comment(comment)
            return 404, {"message": "Not Found"}
        if (found := re.fullmatch(r"/pulls/(\d+)/reviews", rest)) and method == "POST":
            pull = repo.pulls[int(found.group(1))]
            review_id = self.forge.next_id()
            for item in body.get("comments", []):
                pull.review_comments.append(
                    Comment(
                        self.forge.next_id(),
                        item["body"],
                        BOT_LOGIN,
                        path=item["path"],
                        line=int(item["new_position"]),
                        review_id=review_id,
                    )
                )
            pull.reviews.append({"id": review_id, **body})
            return 200, {"id": review_id, "body": body.get("body", ""), "state": "COMMENT"}
        if (found := re.fullmatch(r"/pulls/(\d+)/reviews", rest)) and method == "GET":
            pull = repo.pulls[int(found.group(1))]
            reviewers = {c.review_id for c in pull.review_comments}
            return 200, [{"id": r, "state": "COMMENT"} for r in reviewers if r is not None]
        if (
            found := re.fullmatch(r"/pulls/(\d+)/reviews/(\d+)/comments", rest)
        ) and method == "GET":
            pull = repo.pulls[int(found.group(1))]
            return 200, [
                {
                    "id": c.id,
                    "body": c.body,
                    "path": c.path,
                    "position": c.line,
                    "user": {"login": c.user},
                    "resolver": None,
                }
                for c in pull.review_comments
                if c.review_id == int(found.group(2))
            ]
        return 404, {"message": "Not Found"}

    def pull(self, repo: RepoState, pull: PullState) -> dict[str, Any]:
        return {
            "number": pull.number,
            "title": pull.title,
            "body": pull.body,
            "state": pull.state,
            "draft": pull.draft,
            "html_url": f"{self.forge.url}/{repo.owner}/{repo.name}/pulls/{pull.number}",
            "head": {"ref": pull.head, "label": pull.head},
            "base": {"ref": pull.base, "label": pull.base},
            "user": {"login": BOT_LOGIN},
        }

    def comment(self, comment: Comment) -> dict[str, Any]:
        return {
            "id": comment.id,
            "body": comment.body,
            "user": {"login": comment.user},
            "html_url": f"{self.forge.url}/comment/{comment.id}",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder for the bare repositories")
    parser.add_argument("--token", required=True, help="the token clients must send")
    parser.add_argument(
        "--repo",
        action="append",
        default=[],
        help="OWNER/NAME=PATH: create OWNER/NAME from the clone at PATH",
    )
    parser.add_argument("--flavor", choices=["github", "gitea"], default="github")
    parser.add_argument("--reviewer-token", help="a second token, of a user who reviews")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free one)")
    parser.add_argument("--port-file", help="write the port here once listening")
    args = parser.parse_args()
    forge_server = ForgeServer(
        Path(args.root),
        args.token,
        flavor=args.flavor,
        reviewer_token=args.reviewer_token,
        port=args.port,
    )
    with forge_server as forge:
        for spec in args.repo:
            name, _, source = spec.partition("=")
            owner, _, repo = name.partition("/")
            forge.create_repo(owner, repo, source=Path(source) if source else None)
        if args.port_file:
            Path(args.port_file).write_text(str(forge.port))
        print(f"forge at {forge.url} (API {forge.api_url})", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()

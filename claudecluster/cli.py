"""The ``claudecluster`` command line: a thin layer over the Python API.

Exit codes: 0 when everything succeeded, 1 when the run happened but something failed, 2 for
bad input or usage (and then nothing was changed). Errors are one line, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from claudecluster.errors import ClaudeClusterError, ConfigError, UsageError
from claudecluster.models import TaskResult, TaskSpec, TaskStatus, WorkerSettings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_CREDENTIAL_VARS = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
)


def require_credentials() -> None:
    """Fail fast when no session could authenticate (each runs with a fresh config dir)."""
    if not any(os.environ.get(name) for name in _CREDENTIAL_VARS):
        raise ConfigError(
            "no Anthropic credentials: ANTHROPIC_API_KEY is not set",
            hint="Export ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for another endpoint), "
            "or try `claudecluster demo`, which needs no key.",
        )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value:g}")
    return value


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """Options choosing which Prefect backend a command talks to."""
    parser.add_argument(
        "--ephemeral",
        action="store_true",
        help="use Prefect's throwaway in-process backend instead of the local server",
    )


def add_session_options(parser: argparse.ArgumentParser) -> None:
    """Options that shape each Claude Code session (WorkerSettings)."""
    group = parser.add_argument_group("session limits")
    group.add_argument("--model", help="model for the sessions (default: Claude Code's)")
    group.add_argument("--fallback-model", help="model to use when the main one is overloaded")
    group.add_argument("--max-turns", type=_positive_int, help="turn limit per session")
    group.add_argument(
        "--task-budget-usd", type=_positive_float, help="spending limit per session, in USD"
    )
    group.add_argument(
        "--timeout", type=_positive_float, help="wall-clock limit per session, in seconds"
    )
    group.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="RULE",
        help="extra permission rule to allow, e.g. 'Bash(make test:*)' (repeatable)",
    )


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    """WorkerSettings from the command line over the defaults."""
    overrides: dict[str, object] = {
        "model": args.model,
        "fallback_model": args.fallback_model,
        "max_turns": args.max_turns,
        "max_budget_usd": args.task_budget_usd,
        "timeout_s": args.timeout,
    }
    settings = WorkerSettings(**{k: v for k, v in overrides.items() if v is not None})
    if args.allow:
        settings.allowed_tools = [*settings.allowed_tools, *args.allow]
    return settings


def connect_backend(args: argparse.Namespace, *, quiet: bool = False) -> str | None:
    """Point this process at a Prefect backend; return its UI base URL when it has one."""
    from claudecluster import prefect_server

    if getattr(args, "ephemeral", False):
        prefect_server.use_ephemeral()
        return None
    if not quiet and not os.environ.get("PREFECT_API_URL"):
        status = prefect_server.server_status()
        if status is None:
            print("Starting the local Prefect server (first use only)...", file=sys.stderr)
    info = prefect_server.ensure_server()
    prefect_server.use_server(info)
    return info.ui_url


def _cmd_task(args: argparse.Namespace) -> int:
    import anyio

    from claudecluster import gitops
    from claudecluster.worker import new_run_id

    if not args.prompt.strip():
        raise UsageError("the prompt is empty", hint="Pass --prompt with the task to do.")
    repo = gitops.open_repo(args.repo)
    base = gitops.resolve_commit(repo, args.base)
    require_credentials()
    settings = settings_from_args(args)
    spec = TaskSpec(
        id=args.id,
        title=args.title or args.prompt.strip().splitlines()[0][:72],
        prompt=args.prompt,
        kind=args.kind,
    )
    run_id = new_run_id()
    connect_backend(args, quiet=args.json)
    from claudecluster.flows.single_task import single_task_flow

    async def _run() -> TaskResult:
        return await single_task_flow(
            str(Path(repo.working_dir)), base, spec, settings, run_id, verify=args.verify
        )

    result = anyio.run(_run)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        from claudecluster.report import print_task_result

        print_task_result(result)
    return EXIT_OK if result.status in (TaskStatus.SUCCEEDED, TaskStatus.NO_CHANGES) else 1


def _cmd_server(args: argparse.Namespace) -> int:
    from claudecluster import prefect_server

    if args.action == "stop":
        stopped = prefect_server.stop_server()
        print("stopped the local Prefect server" if stopped else "no local Prefect server running")
        return EXIT_OK
    if args.action == "start":
        info = prefect_server.ensure_server()
        print(f"Prefect server at {info.api_url} (UI {info.ui_url}, pid {info.pid})")
        return EXIT_OK
    status = prefect_server.server_status()
    if status is None:
        print("no local Prefect server running (it starts on first use)")
        return EXIT_FAILED
    print(f"Prefect server at {status.api_url} (UI {status.ui_url}, pid {status.pid})")
    print(f"data and log under {status.home}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="claudecluster",
        description="Run many unattended Claude Code sessions as one coding cluster on Prefect.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    task = sub.add_parser("task", help="run one Claude Code worker session on a repo")
    task.add_argument("--repo", required=True, help="path of the git repository")
    task.add_argument("--prompt", required=True, help="what the session should do")
    task.add_argument("--verify", help="shell command that checks the work, e.g. 'pytest -q'")
    task.add_argument("--base", help="commit to start from (default: HEAD)")
    task.add_argument("--id", default="task", help="task id, used in the branch name")
    task.add_argument("--title", help="one-line title for the commit (default: the prompt)")
    task.add_argument(
        "--kind", default="other", choices=["scaffold", "refactor", "test", "docs", "other"]
    )
    task.add_argument("--json", action="store_true", help="print the TaskResult as JSON only")
    add_session_options(task)
    add_backend_options(task)
    task.set_defaults(handler=_cmd_task)

    server = sub.add_parser("server", help="manage the local Prefect server")
    server.add_argument("action", choices=["status", "start", "stop"])
    server.set_defaults(handler=_cmd_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``claudecluster`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ClaudeClusterError as exc:
        print(f"claudecluster: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "input"
        print(f"claudecluster: error: invalid {where}: {first['msg']}.", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("claudecluster: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

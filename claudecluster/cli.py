"""The ``claudecluster`` command line: a thin layer over the Python API.

Exit codes: 0 when everything succeeded, 1 when the run happened but something failed, 2 for
bad input or usage (and then nothing was changed). Errors are one line, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from claudecluster import api
from claudecluster.checks import check_goal, default_parallelism, require_credentials
from claudecluster.errors import ClaudeClusterError, UsageError
from claudecluster.models import (
    PullRequestMode,
    ReviewMode,
    RunReport,
    TaskKind,
    TaskResult,
    TaskSpec,
    WorkerSettings,
    WorkUnit,
)

KINDS = [kind.value for kind in TaskKind]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3


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


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
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


def add_forge_options(parser: argparse.ArgumentParser) -> None:
    """Where the repository's forge answers (github.com needs nothing)."""
    parser.add_argument(
        "--forge-api-url",
        help="the forge's API base URL when the remote is not on github.com: "
        "https://HOST/api/v3 (GitHub Enterprise) or https://HOST/api/v1 (Gitea, Forgejo)",
    )


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    """WorkerSettings from the command line over the defaults."""
    overrides: dict[str, object] = {
        "model": args.model,
        "fallback_model": args.fallback_model,
        "max_turns": args.max_turns,
        "max_budget_usd": args.task_budget_usd,
        "timeout_s": args.timeout,
        "allowed_tools": args.allow or None,
    }
    # Only flags actually given are set, so they (and only they) override a settings block.
    return WorkerSettings(**{k: v for k, v in overrides.items() if v is not None})


def _cmd_task(args: argparse.Namespace) -> int:
    import anyio

    from claudecluster.target import open_target
    from claudecluster.workspace import new_run_id

    if not args.prompt.strip():
        raise UsageError("the prompt is empty", hint="Pass --prompt with the task to do.")
    target = open_target(args.repo, base=args.base)
    require_credentials()
    unit = WorkUnit(
        run_id=new_run_id(),
        spec=TaskSpec(
            id=args.id,
            title=args.title or args.prompt.strip().splitlines()[0][:72],
            prompt=args.prompt,
            kind=args.kind,
        ),
        repo=str(target.root),
        base_commit=target.base_commit,
        verify=args.verify,
        settings=settings_from_args(args),
    )
    api.connect(ephemeral=args.ephemeral, announce=_announce)
    from claudecluster.flows.single_task import single_task_flow

    async def _run() -> TaskResult:
        return await single_task_flow(unit)

    result = anyio.run(_run)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        from claudecluster.report import print_task_result

        print_task_result(result)
    return EXIT_OK if result.status.ok else EXIT_FAILED


def _finish(report: RunReport, *, as_json: bool) -> int:
    """Print a run's report (JSON alone on stdout with --json); its exit code."""
    from claudecluster.report import print_run_report

    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        print_run_report(report)
    return EXIT_OK if report.status == "succeeded" else EXIT_FAILED


def _announce(message: str) -> None:
    print(message, file=sys.stderr)


def _interrupted(report: RunReport, *, as_json: bool) -> None:
    """The run's Prefect server is gone: say so in one line (the report on stdout with
    --json) and exit now, without waiting for Prefect's client to give up retrying."""
    from claudecluster.journal import RunJournal

    if as_json:
        print(report.model_dump_json(indent=2))
    where = RunJournal(report.run_id).path / "report.json"
    print(f"claudecluster: {report.error} (report: {where})", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _read_goal(args: argparse.Namespace) -> str | None:
    goal: str | None = args.goal
    if goal == "-":
        goal = sys.stdin.read()
    return goal


def _cmd_run(args: argparse.Namespace) -> int:
    from claudecluster.progress import listen
    from claudecluster.report import LiveProgress

    goal = _read_goal(args)
    if args.plan is None and not (goal or "").strip():
        raise UsageError("the goal is empty", hint='Pass a goal: claudecluster run "GOAL" --repo .')
    settings = settings_from_args(args)
    kwargs: dict[str, Any] = {
        "plan_file": args.plan,
        "verify": args.verify,
        "max_parallel": args.max_parallel,
        "max_tasks": args.max_tasks,
        "settings": settings,
        "base": args.base,
        "ephemeral": args.ephemeral,
        "pool": args.pool,
        "settings_block": args.settings_block,
        "repo_block": args.repo_block,
        "budget_usd": args.budget_usd,
        "pr": args.pr,
        "review": args.review,
        "forge_api_url": args.forge_api_url,
        "pr_base": args.pr_base,
        "announce": _announce,
        "on_interrupted": partial(_interrupted, as_json=args.json),
    }
    if args.json or not sys.stderr.isatty():
        report = api.run_goal(goal, args.repo, **kwargs)
    else:
        with LiveProgress() as display, listen(display):
            report = api.run_goal(goal, args.repo, **kwargs)
    return _finish(report, as_json=args.json)


def _cmd_plan(args: argparse.Namespace) -> int:
    import anyio

    from claudecluster.checks import DEFAULT_MAX_TASKS
    from claudecluster.plan import dump_plan
    from claudecluster.planner import run_planner
    from claudecluster.session import SessionHost
    from claudecluster.target import open_target
    from claudecluster.workspace import default_worktree_root

    goal = check_goal(_read_goal(args) or "")
    target = open_target(args.repo, base=args.base)
    require_credentials()
    settings = settings_from_args(args)
    host = (
        SessionHost(log=lambda line: print(line, file=sys.stderr))
        if args.verbose
        else SessionHost()
    )

    async def _plan() -> str:
        plan, outcome = await run_planner(
            goal,
            target.root,
            target.base_commit,
            settings,
            max_tasks=args.max_tasks or DEFAULT_MAX_TASKS,
            verify=args.verify,
            worktree_root=default_worktree_root() / "planning",
            host=host,
        )
        print(
            f"planned {len(plan.tasks)} tasks in {outcome.turns} turns, ${outcome.cost_usd:.4f}",
            file=sys.stderr,
        )
        return dump_plan(plan, as_json=args.json)

    text = anyio.run(_plan)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote the plan to {args.out}; run it with --plan {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_review(args: argparse.Namespace) -> int:
    import anyio

    from claudecluster.gitops import open_repo
    from claudecluster.pr_review import open_subject, review_subject
    from claudecluster.session import SessionHost
    from claudecluster.workspace import default_worktree_root

    require_credentials()
    repo = open_repo(args.repo)
    subject = open_subject(repo, args.target, base=args.base, api_url=args.forge_api_url)
    host = (
        SessionHost(log=lambda line: print(line, file=sys.stderr))
        if args.verbose
        else SessionHost()
    )
    posted = anyio.run(
        lambda: review_subject(
            subject,
            settings=settings_from_args(args),
            worktree_root=default_worktree_root() / "reviews",
            host=host,
            post=not args.no_post,
            lines=args.lines,
        )
    )
    print(posted.markdown)
    if posted.comment_url:
        extra = f" and {posted.line_comments} line comments" if posted.line_comments else ""
        print(f"posted the review{extra}: {posted.comment_url}", file=sys.stderr)
    elif subject.forge is None:
        print(
            "not posted: no forge token (CLAUDECLUSTER_FORGE_TOKEN or GITHUB_TOKEN)",
            file=sys.stderr,
        )
    elif not args.no_post:
        print(f"not posted: {subject.label} has no open pull request", file=sys.stderr)
    return EXIT_OK


def _cmd_respond(args: argparse.Namespace) -> int:
    from claudecluster.pr_review import parse_pull_url
    from claudecluster.respond import respond

    if parse_pull_url(args.pull_request) is None:
        raise UsageError(
            f"{args.pull_request} is not a pull request URL",
            hint="Pass https://HOST/OWNER/NAME/pull/N.",
        )
    outcome = respond(
        args.pull_request,
        args.repo,
        verify=args.verify,
        max_parallel=args.max_parallel,
        settings=settings_from_args(args),
        settings_block=args.settings_block,
        forge_api_url=args.forge_api_url,
        announce=_announce,
    )
    if outcome.report is None:
        print("nothing to answer: every review thread is resolved or answered", file=sys.stderr)
        return EXIT_OK
    if not args.json:
        from claudecluster.report import print_run_report

        print_run_report(outcome.report)
    else:
        print(outcome.report.model_dump_json(indent=2))
    for line in outcome.lines:
        print(line, file=sys.stderr)
    return EXIT_OK if outcome.ok else EXIT_FAILED


def _cmd_demo(args: argparse.Namespace) -> int:
    from claudecluster.demo import DEMO_GOAL, DemoModel, create_sample_project, new_demo_dir
    from claudecluster.progress import listen
    from claudecluster.report import LiveProgress, print_run_report

    directory = Path(args.dir).resolve() if args.dir else new_demo_dir()
    repo = create_sample_project(directory)
    if args.serve_model is not None:
        return _serve_demo_model(repo, args.serve_model, args.latency)
    print("ClaudeCluster demo -- SCRIPTED MODEL: the model's answers are canned; the Claude Code")
    print("CLI, git, Prefect and the tests are real. Set ANTHROPIC_API_KEY and use")
    print("`claudecluster run` to do the same with a real model.")
    print(f"\nSample project: {repo}\nGoal: {DEMO_GOAL}\n")
    with DemoModel(latency_s=args.latency) as model:
        settings = WorkerSettings(model=args.model) if args.model else WorkerSettings()

        def call() -> RunReport:
            return api.run_goal(
                DEMO_GOAL,
                repo,
                verify=model.verify,
                max_parallel=args.max_parallel,
                settings=settings,
                ephemeral=args.ephemeral,
                announce=_announce,
            )

        if sys.stderr.isatty():
            with LiveProgress() as display, listen(display):
                report = call()
        else:
            report = call()
    print_run_report(report)
    print("\nWhere to look:")
    print(f"  merged work:  git -C {repo} log --oneline --graph {report.integration_branch}")
    print(f"  task branches: git -C {repo} branch --list 'claudecluster/{report.run_id}/*'")
    if report.ui_url:
        base = report.ui_url.split("/runs/")[0]
        print(f"  run + graph:  {report.ui_url}")
        print(f"  artifacts:    {base}/artifacts (diffs, test reports, run table, summary)")
    return EXIT_OK if report.status == "succeeded" else EXIT_FAILED


def _serve_demo_model(repo: Path, port: int, latency_s: float) -> int:
    """The sample project and the scripted model alone, for trying the Prefect path by hand:
    deployments, workers and ``prefect deployment run`` talk to the model until Ctrl-C."""
    import threading

    from claudecluster.demo import DEMO_GOAL, DemoModel

    with DemoModel(latency_s=latency_s, port=port) as model:
        url = model.server.base_url
        print(f"Sample project: {repo}")
        print(f"Scripted model: {url} (any goal gets the demo's plan; Ctrl-C stops it)")
        print("Point sessions at it, in the shell that starts the worker or the run:")
        print(f"  export ANTHROPIC_BASE_URL={url} ANTHROPIC_API_KEY=scripted-demo")
        print(f'  goal: "{DEMO_GOAL}"', flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return EXIT_OK


def _cmd_sweep(args: argparse.Namespace) -> int:
    from claudecluster.sweep import SweepSpec

    spec = SweepSpec(
        name=args.name,
        prompt=args.prompt,
        include=args.include or ["**/*.py"],
        exclude=args.exclude,
        changed_since_last=args.changed_since_last,
        batch_size=args.batch_size,
        max_files=args.max_files,
        kind=args.kind,
        verify=args.verify,
    )
    report = api.run_sweep(
        spec,
        args.repo,
        max_parallel=args.max_parallel,
        settings=settings_from_args(args),
        pool=args.pool,
        settings_block=args.settings_block,
        ephemeral=args.ephemeral,
        announce=_announce,
    )
    if not report.tasks and not args.json:
        print(f"sweep {args.name}: no files to sweep")
        return EXIT_OK
    return _finish(report, as_json=args.json)


def _cmd_resume(args: argparse.Namespace) -> int:

    report = api.resume_run(
        args.run_id,
        ephemeral=args.ephemeral,
        announce=_announce,
        on_interrupted=partial(_interrupted, as_json=args.json),
    )
    return _finish(report, as_json=args.json)


def _cmd_clean(args: argparse.Namespace) -> int:
    from claudecluster.clean import clean, reclaim_old
    from claudecluster.journal import runs_root
    from claudecluster.workspace import default_worktree_root, results_root

    root = Path(args.root) if args.root else default_worktree_root()
    report = clean(root, dry_run=args.dry_run)
    old = reclaim_old(
        results_root(), runs_root(), older_than_days=args.older_than, dry_run=args.dry_run
    )
    verb = "would remove" if args.dry_run else "removed"
    for path in report.removed:
        print(f"{verb} {path}")
    for kept in report.kept:
        print(f"kept {kept.path}: {kept.reason}")
    print(
        f"{verb} {len(report.removed)} worktree(s), {old.results_removed} result file(s) and "
        f"{len(old.journals_removed)} run journal(s) older than {args.older_than:g} days, "
        f"{(report.bytes_freed + old.bytes_freed) / 1e6:.1f} MB; kept {len(report.kept)} "
        "worktree(s). Branches are never deleted."
    )
    return EXIT_OK


def _cmd_setup(args: argparse.Namespace) -> int:
    from claudecluster.setup import setup

    server = api.connect(ephemeral=False, announce=_announce)
    report = setup(
        sessions=args.sessions,
        result_storage=args.result_storage,
        starts_per_second=args.starts_per_second,
        start_burst=args.start_burst,
        image=args.image,
        team=args.team,
    )
    where = server.api_url if server else os.environ.get("PREFECT_API_URL", "Prefect")
    print(f"Prepared {where} for ClaudeCluster:")
    for pool, what in report.pools.items():
        print(f"  work pool {pool}: {what}")
    print(f"  concurrency limit claudecluster-sessions: {report.session_limit} sessions")
    print(
        f"  rate limit claudecluster-session-starts: {report.starts_per_second:g} per second, "
        f"bursts of {report.start_burst}"
    )
    print(f"  block types: {', '.join(report.blocks)}")
    print(f"  automation claudecluster-lost-worker: {report.lost_worker_automation}")
    print("Next, from the repository root:")
    print("  prefect deploy --all --prefect-file deployments/prefect.yaml")
    print("  prefect worker start --pool claudecluster-process")
    return EXIT_OK


def _cmd_team_server(args: argparse.Namespace) -> int:
    from claudecluster import team_server

    if args.action == "stop":
        stopped = team_server.stop_team_server()
        print("stopped the team server" if stopped else "no team server running here")
        return EXIT_OK
    if args.action == "start":
        if not args.database_url or not args.redis_url:
            raise UsageError(
                "server start --team needs --database-url and --redis-url (or "
                "CLAUDECLUSTER_DATABASE_URL and CLAUDECLUSTER_REDIS_URL)",
                hint="e.g. --database-url postgresql://prefect:PASSWORD@db:5432/prefect "
                "--redis-url redis://cache:6379/0",
            )
        try:
            config = team_server.TeamServerConfig(
                database_url=args.database_url,
                redis_url=args.redis_url,
                replicas=args.replicas,
                host=args.host,
                port=args.port,
                public_url=args.public_url,
            )
        except ValidationError as exc:
            problem = exc.errors()[0]
            field = str(problem["loc"][0]).replace("_", "-")
            raise UsageError(
                f"--{field}: {problem['msg']}", hint="See claudecluster server --help."
            ) from None
        server = team_server.start_team_server(config)
    else:
        found = team_server.team_server_status()
        if found is None:
            print("no team server running here")
            return EXIT_FAILED
        server = found
    print(f"team server at {server.api_url} (UI {server.ui_url})")
    print(
        f"  {len(server.replica_pids)} API replicas (pids "
        + ", ".join(map(str, server.replica_pids))
        + f"), services pid {server.services_pid}, nginx pid {server.balancer_pid}"
    )
    print(f"  logs under {server.home}")
    print(f"  on every host: export PREFECT_API_URL={server.api_url}")
    return EXIT_OK


def _cmd_server(args: argparse.Namespace) -> int:
    from claudecluster import prefect_server

    if args.team:
        if args.action == "url":
            raise UsageError(
                "server url is for the embedded server", hint="use server status --team"
            )
        return _cmd_team_server(args)
    if args.action == "stop":
        stopped = prefect_server.stop_server()
        print("stopped the local Prefect server" if stopped else "no local Prefect server running")
        return EXIT_OK
    if args.action == "start":
        info = prefect_server.ensure_server()
        print(f"Prefect server at {info.api_url} (UI {info.ui_url}, pid {info.pid})")
        return EXIT_OK
    if args.action == "url":
        # For the prefect CLI: export PREFECT_API_URL=$(claudecluster server url)
        print(prefect_server.ensure_server().api_url)
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
    task.add_argument("--kind", default=TaskKind.OTHER.value, choices=KINDS)
    task.add_argument("--json", action="store_true", help="print the TaskResult as JSON only")
    task.add_argument("--verbose", action="store_true", help="show Prefect's logs too")
    add_session_options(task)
    add_backend_options(task)
    task.set_defaults(handler=_cmd_task)

    run = sub.add_parser("run", help="run a goal: plan, run workers, merge, verify, report")
    run.add_argument("goal", nargs="?", help="what to achieve ('-' reads it from stdin)")
    target = run.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo", help="path of the git repository")
    target.add_argument("--repo-block", help="name of a TargetRepository block to use")
    run.add_argument("--plan", help="plan file (YAML or JSON) to run instead of planning")
    run.add_argument(
        "--pool",
        help="work pool for tasks that name none ('local', the default, runs in-process)",
    )
    run.add_argument(
        "--settings-block", help="ClaudeCodeSettings block to use (flags override its values)"
    )
    run.add_argument("--verify", help="command that checks the work (overrides the plan's)")
    run.add_argument(
        "-P",
        "--max-parallel",
        type=_positive_int,
        help=f"concurrent sessions (default {default_parallelism()} on this machine)",
    )
    run.add_argument("--max-tasks", type=_positive_int, help="most tasks the planner may plan")
    run.add_argument(
        "--budget-usd",
        type=_positive_float,
        help="spending limit for the whole goal: no task starts once it is spent",
    )
    run.add_argument("--base", help="commit to start from (default: HEAD)")
    add_forge_options(run)
    run.add_argument(
        "--pr",
        choices=[m.value for m in PullRequestMode if m is not PullRequestMode.OFF],
        help="push the integration branch (branch), or open or update a pull request "
        "(draft, ready); needs a forge token (CLAUDECLUSTER_FORGE_TOKEN or GITHUB_TOKEN)",
    )
    run.add_argument(
        "--pr-base",
        metavar="BRANCH",
        help="the branch the pull request merges into (default: --base when it is a branch, "
        "else the checked-out branch)",
    )
    run.add_argument(
        "--review",
        choices=[m.value for m in ReviewMode],
        help="the review a pull request gets: summary (default), lines or none",
    )
    run.add_argument("--json", action="store_true", help="print the RunReport as JSON only")
    run.add_argument("--verbose", action="store_true", help="show Prefect's logs too")
    add_session_options(run)
    add_backend_options(run)
    run.set_defaults(handler=_cmd_run)

    review = sub.add_parser(
        "review", help="review a pull request or branch and post one sticky comment"
    )
    review.add_argument(
        "target", help="pull request URL (https://HOST/OWNER/NAME/pull/N) or branch"
    )
    review.add_argument(
        "--repo", default=".", help="path of a clone of the repository (default: .)"
    )
    review.add_argument(
        "--base", help="for a branch: what to compare it with (default: HEAD's branch)"
    )
    review.add_argument(
        "--lines", action="store_true", help="also post one review with line comments"
    )
    review.add_argument("--no-post", action="store_true", help="print the review, post nothing")
    review.add_argument("--verbose", action="store_true", help="show the reviewer session")
    add_forge_options(review)
    add_session_options(review)
    review.set_defaults(handler=_cmd_review)

    respond_cmd = sub.add_parser(
        "respond", help="answer a pull request's review threads: change, push, reply"
    )
    respond_cmd.add_argument("pull_request", help="pull request URL")
    respond_cmd.add_argument("--repo", default=".", help="path of a clone of the repository")
    respond_cmd.add_argument("--verify", help="command that checks the work")
    respond_cmd.add_argument("-P", "--max-parallel", type=_positive_int, help="concurrent sessions")
    respond_cmd.add_argument("--settings-block", help="ClaudeCodeSettings block to use")
    respond_cmd.add_argument("--json", action="store_true", help="print the RunReport as JSON only")
    respond_cmd.add_argument("--verbose", action="store_true", help="show Prefect's logs too")
    add_forge_options(respond_cmd)
    add_session_options(respond_cmd)
    add_backend_options(respond_cmd)
    respond_cmd.set_defaults(handler=_cmd_respond)

    plan = sub.add_parser("plan", help="plan a goal and print the plan, without running it")
    plan.add_argument("goal", help="what to achieve ('-' reads it from stdin)")
    plan.add_argument("--repo", required=True, help="path of the git repository")
    plan.add_argument("--out", help="write the plan to this file instead of stdout")
    plan.add_argument("--json", action="store_true", help="JSON instead of YAML")
    plan.add_argument("--verify", help="verify command to put in the plan")
    plan.add_argument("--max-tasks", type=_positive_int, help="most tasks to plan (default 12)")
    plan.add_argument("--base", help="commit to plan from (default: HEAD)")
    plan.add_argument("--verbose", action="store_true", help="show the planner session")
    add_session_options(plan)
    plan.set_defaults(handler=_cmd_plan)

    demo = sub.add_parser(
        "demo", help="run a real goal on a sample project with a SCRIPTED model (no key needed)"
    )
    demo.add_argument("--dir", help="where to create the sample project (default: a temp dir)")
    demo.add_argument(
        "--latency", type=float, default=0.2, help="seconds the scripted model takes per answer"
    )
    demo.add_argument(
        "-P", "--max-parallel", type=_positive_int, default=3, help="concurrent sessions"
    )
    demo.add_argument("--model", help="model name the sessions report (priced by Claude Code)")
    demo.add_argument("--verbose", action="store_true", help="show Prefect's logs too")
    demo.add_argument(
        "--serve-model",
        type=int,
        metavar="PORT",
        help="only write the sample project and serve the scripted model on this port (until "
        "Ctrl-C), for running the Prefect walkthrough by hand",
    )
    add_backend_options(demo)
    demo.set_defaults(handler=_cmd_demo)

    sweep = sub.add_parser("sweep", help="apply a prompt template to a set of files, now")
    sweep.add_argument("name", help="name of the sweep (its 'changed since' state is per name)")
    sweep.add_argument("--repo", required=True, help="path of the git repository")
    sweep.add_argument(
        "--prompt", required=True, help="prompt template; {files} becomes the batch's files"
    )
    sweep.add_argument("--include", action="append", help="glob of files (repeatable)")
    sweep.add_argument("--exclude", action="append", default=[], help="glob to skip")
    sweep.add_argument(
        "--changed-since-last",
        action="store_true",
        help="only files changed since the last successful sweep of this name",
    )
    sweep.add_argument("--batch-size", type=_positive_int, default=5, help="files per task")
    sweep.add_argument("--max-files", type=_positive_int, default=50, help="most files per run")
    sweep.add_argument("--kind", default=TaskKind.REFACTOR.value, choices=KINDS)
    sweep.add_argument("--verify", help="command that checks the work")
    sweep.add_argument("-P", "--max-parallel", type=_positive_int, help="concurrent sessions")
    sweep.add_argument("--pool", help="work pool for the tasks (default: local)")
    sweep.add_argument("--settings-block", help="ClaudeCodeSettings block to use")
    sweep.add_argument("--json", action="store_true", help="print the RunReport as JSON only")
    sweep.add_argument("--verbose", action="store_true", help="show Prefect's logs too")
    add_session_options(sweep)
    add_backend_options(sweep)
    sweep.set_defaults(handler=_cmd_sweep)

    resume = sub.add_parser(
        "resume", help="re-run a run: only what failed or never ran runs again (cached)"
    )
    resume.add_argument("run_id", help="the run id (as in claudecluster/<run-id>/...)")
    resume.add_argument("--json", action="store_true", help="print the RunReport as JSON only")
    resume.add_argument("--verbose", action="store_true", help="show Prefect's logs too")
    add_backend_options(resume)
    resume.set_defaults(handler=_cmd_resume)

    clean_cmd = sub.add_parser(
        "clean", help="remove finished worktrees (never unfinished work, never branches)"
    )
    clean_cmd.add_argument("--dry-run", action="store_true", help="only say what would go")
    clean_cmd.add_argument("--root", help="worktree folder (default: ~/.claudecluster/worktrees)")
    clean_cmd.add_argument(
        "--older-than",
        type=_non_negative_float,
        default=7.0,
        metavar="DAYS",
        help="also remove persisted results and run journals untouched for DAYS (default 7); "
        "they only serve `claudecluster resume`",
    )
    clean_cmd.set_defaults(handler=_cmd_clean)

    setup_cmd = sub.add_parser(
        "setup", help="create work pools, the session limit and block types on the server"
    )
    setup_cmd.add_argument(
        "--sessions",
        type=_positive_int,
        help="cluster-wide cap on concurrent Claude Code sessions (default 16, or keep current)",
    )
    setup_cmd.add_argument(
        "--starts-per-second",
        type=_positive_float,
        help="session starts per second across the cluster (default 8; tune to your API tier)",
    )
    setup_cmd.add_argument(
        "--start-burst", type=_positive_int, help="session starts allowed at once (default 16)"
    )
    setup_cmd.add_argument(
        "--result-storage",
        metavar="BLOCK_SLUG",
        help="filesystem block container pools persist results to, e.g. s3-bucket/results "
        "(needed when workers run on other hosts; on one machine results come back through "
        "the task branches)",
    )
    setup_cmd.add_argument(
        "--team",
        action="store_true",
        help="the server is shared by hosts that share no disk: process-pool runs keep their "
        "results on their own host (they come back through git)",
    )
    setup_cmd.add_argument(
        "--image",
        metavar="IMAGE",
        help="worker image for the Docker and Kubernetes pools, e.g. one pushed to your "
        "registry (pulled when a host does not have it)",
    )
    setup_cmd.set_defaults(handler=_cmd_setup, ephemeral=False)

    server = sub.add_parser(
        "server", help="manage the local Prefect server, or a team server (--team)"
    )
    server.add_argument(
        "action",
        choices=["status", "start", "stop", "url"],
        help="url starts the server if needed and prints its API URL (for PREFECT_API_URL)",
    )
    team = server.add_argument_group(
        "team server",
        "PostgreSQL and Redis (yours), API replicas and services behind nginx, for workers "
        "on other hosts",
    )
    team.add_argument(
        "--team", action="store_true", help="the team server instead of the embedded one"
    )
    team.add_argument(
        "--database-url",
        metavar="URL",
        default=os.environ.get("CLAUDECLUSTER_DATABASE_URL"),
        help="postgresql://USER:PASSWORD@HOST/DB (default: $CLAUDECLUSTER_DATABASE_URL, which "
        "keeps the password out of the process list and the shell history)",
    )
    team.add_argument(
        "--redis-url",
        metavar="URL",
        default=os.environ.get("CLAUDECLUSTER_REDIS_URL"),
        help="redis://[:PASSWORD@]HOST:6379/0 (default: $CLAUDECLUSTER_REDIS_URL)",
    )
    team.add_argument("--replicas", type=_positive_int, default=2, help="API replicas (default: 2)")
    team.add_argument(
        "--host", default="0.0.0.0", help="address the load balancer listens on (default: all)"
    )
    team.add_argument(
        "--port", type=_positive_int, default=4200, help="load balancer port (default: 4200)"
    )
    team.add_argument(
        "--public-url",
        metavar="URL",
        help="the URL workers and browsers use, e.g. http://prefect.internal:4200 "
        "(default: this host's name and --port)",
    )
    server.set_defaults(handler=_cmd_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``claudecluster`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verbose", False):
        # Prefect's console logs would scroll past the live display; they still reach the UI.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
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

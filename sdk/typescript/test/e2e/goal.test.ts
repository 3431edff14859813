// End to end against a real Prefect server (started by tests/integration/test_sdk_typescript.py
// with the goal deployment, a process worker and the scripted model): submit a goal, watch
// it to the end, read its report, artifacts and integration branch.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { describe, it } from "node:test";

import { parse } from "yaml";

import { ClaudeCluster, RunNotStartedError, constants, type RunUpdate } from "../../src/index.js";

const repo = process.env.E2E_REPO ?? "";
const planFile = process.env.E2E_PLAN ?? "";
const pool = process.env.E2E_POOL ?? "";
const resumePlan = process.env.E2E_RESUME_PLAN ?? "";
const flag = process.env.E2E_FLAG ?? "";
const cancelPlan = process.env.E2E_CANCEL_PLAN ?? "";

async function finalState(cluster: ClaudeCluster, id: string): Promise<RunUpdate> {
  let last: RunUpdate | undefined;
  for await (const update of cluster.watchRun(id, { logs: false, signal: AbortSignal.timeout(300_000) })) {
    last = update;
  }
  assert.ok(last);
  return last;
}

describe("a goal through the goal deployment", { skip: !repo && "run by tests/integration/test_sdk_typescript.py" }, () => {
  it("is submitted, watched to the end, and reported", async () => {
    const plan = parse(readFileSync(planFile, "utf8")) as { tasks: { id: string; paths: string[] }[] };
    const ids = plan.tasks.map((t) => t.id);
    const cluster = new ClaudeCluster();
    const run = await cluster.submitGoal({ plan: planFile, repo, pool, max_parallel: 2 });

    const updates: RunUpdate[] = [];
    for await (const update of cluster.watchRun(run.id, { signal: AbortSignal.timeout(300_000) })) {
      updates.push(update);
    }
    const last = updates.at(-1);
    assert.equal(last?.kind, "state");
    assert.equal(last.kind === "state" && last.final && last.state, "COMPLETED", JSON.stringify(last));

    // Progress as it happened: the plan, each task started and finished, the final table.
    const progress = updates.flatMap((u) => (u.kind === "progress" ? [u] : []));
    assert.deepEqual(progress.find((p) => p.progress.kind === "planned")?.progress.planned, ids);
    for (const id of ids) {
      assert.ok(progress.some((p) => p.progress.kind === "started" && p.progress.running.includes(id)), `no start of ${id}`);
      assert.ok(progress.some((p) => p.progress.kind === "finished" && p.progress.task?.id === id), `no end of ${id}`);
    }
    const table = progress.at(-1)?.tasks ?? [];
    assert.deepEqual(table.map((r) => [r.task, r.status]), ids.map((id) => [id, "succeeded"]));
    assert.ok(table.every((r) => (r.turns ?? 0) > 0 && (r.cost_usd ?? 0) > 0 && r.files === 1), JSON.stringify(table));
    // Task-run states and the worker runs' own logs (child flow runs on the pool).
    assert.ok(updates.some((u) => u.kind === "task" && u.state === "COMPLETED"));
    const logs = updates.flatMap((u) => (u.kind === "log" ? [u.log] : []));
    for (const id of ids) {
      assert.ok(
        logs.some((l) => l.flow_run_id !== run.id && l.message.includes(`task ${id} succeeded`)),
        `no log of ${id} from its worker run`,
      );
    }

    const report = await cluster.report(run.id);
    assert.equal(report.status, "succeeded", report.error ?? "");
    assert.deepEqual(report.tasks.map((t) => t.id).sort(), [...ids].sort());
    assert.ok(report.integration_branch);
    const info = await cluster.getRun(run.id);
    assert.equal(info.runId, report.run_id);
    assert.equal(info.state, "COMPLETED");
    // Every task's file is on the integration branch of the repository.
    for (const task of plan.tasks) {
      const shown = execFileSync("git", ["-C", repo, "show", `${report.integration_branch}:${task.paths[0]}`], { encoding: "utf8" });
      assert.ok(shown.length > 0);
    }
    const artifacts = await cluster.artifacts(run.id);
    const types = new Set(artifacts.map((a) => a.type));
    assert.ok(types.has(constants.REPORT_ARTIFACT_TYPE) && types.has("markdown") && types.has("table"), [...types].join());
    assert.equal(await cluster.pullRequest(run.id), null);
  });

  it("that cannot start fails with the CLI's line, before any session", async () => {
    const cluster = new ClaudeCluster();
    const run = await cluster.submitGoal({ plan: planFile, repo, pool: "no-such-pool" });
    await assert.rejects(cluster.report(run.id, { wait: true }), (error: RunNotStartedError) => {
      assert.ok(error instanceof RunNotStartedError, String(error));
      assert.match(error.oneLine(), /no-such-pool/);
      assert.ok(!error.oneLine().includes("\n"));
      return true;
    });
  });

  it("that failed is resumed: only what failed runs again, nothing is paid twice", async () => {
    const cluster = new ClaudeCluster();
    // Its second task's check wants a file that is not there yet.
    const run = await cluster.submitGoal({ plan: resumePlan, repo, settings: { retries: 0 } });
    const first = await finalState(cluster, run.id);
    assert.ok(first.kind === "state" && first.state === "FAILED", JSON.stringify(first));
    const failed = await cluster.report(run.id);
    assert.equal(failed.status, "failed");
    assert.deepEqual(
      failed.tasks.map((t) => [t.id, t.status]).sort(),
      [["rs-a", "succeeded"], ["rs-b", "failed"]],
    );
    assert.equal(failed.tasks.find((t) => t.id === "rs-b")?.failure_reason, "verify_failed");

    writeFileSync(flag, "fixed\n");
    const resumed = await cluster.resume(run.id);
    assert.equal(resumed.stateName, "AwaitingRetry");
    const second = await finalState(cluster, run.id);
    assert.ok(second.kind === "state" && second.state === "COMPLETED", JSON.stringify(second));
    const report = await cluster.report(run.id);
    assert.equal(report.status, "succeeded", report.error ?? "");
    assert.equal(report.run_id, failed.run_id);
    const byId = Object.fromEntries(report.tasks.map((t) => [t.id, t]));
    // Nothing paid again: rs-a's result is reused; rs-b's session had finished, so its
    // commit is reused and only its check runs again (and passes now).
    assert.equal(byId["rs-a"]?.cached, true);
    assert.equal(byId["rs-b"]?.cached, true);
    assert.equal(byId["rs-b"]?.status, "succeeded");
    assert.equal(byId["rs-b"]?.test_report?.exit_code, 0);
    await assert.rejects(cluster.resume(run.id), /already completed/);
  });

  it("is cancelled while a session runs", async () => {
    const cluster = new ClaudeCluster();
    const run = await cluster.submitGoal({ plan: cancelPlan, repo });
    const updates = cluster.watchRun(run.id, { signal: AbortSignal.timeout(300_000) });
    let cancelled = false;
    let last: RunUpdate | undefined;
    for await (const update of updates) {
      last = update;
      // Once Claude Code runs (its session's first log line), and the model thinks for 120 s.
      if (!cancelled && update.kind === "log" && /session \S+ started/.test(update.log.message)) {
        cancelled = true;
        assert.equal((await cluster.cancel(run.id)).state, "CANCELLING");
      }
    }
    assert.ok(cancelled, "the session never started");
    assert.ok(last?.kind === "state" && last.final && last.state === "CANCELLED", JSON.stringify(last));
    await assert.rejects(cluster.cancel(run.id), /already ended \(cancelled\)/);
    await assert.rejects(cluster.report(run.id), /ended cancelled without a report/);
  });
});

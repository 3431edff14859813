// The hand-written surface against a fake Prefect API: what it sends, and its errors.
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";

import {
  ClaudeCluster,
  RunNotFinishedError,
  RunNotFoundError,
  RunNotStartedError,
  ServerError,
  TaskTable,
  UsageError,
  constants,
  type ProgressEvent,
} from "../../src/index.js";

const API = "http://prefect.test/api";
const RUN = "6f1c4c1e-2b0a-4d7e-9a35-0d7c3c1f2a11";
const DEPLOYMENT = "0b7e0b0e-1111-4222-8333-944445555666";

type Route = (body: unknown, url: URL) => { status?: number; json?: unknown };
interface Sent {
  method: string;
  path: string;
  body: unknown;
  headers: Headers;
}

/** A fetch that answers from `routes` ("METHOD /path") and records what was sent. */
function fakeApi(routes: Record<string, Route>): { fetch: typeof fetch; sent: Sent[] } {
  const sent: Sent[] = [];
  const fetchImpl = (async (input: string | URL | Request, init?: RequestInit) => {
    const request = input instanceof Request ? input : new Request(input, init);
    const url = new URL(request.url);
    const path = url.pathname.replace(/^\/api/, "");
    const text = await request.text();
    const body = text ? JSON.parse(text) : undefined;
    sent.push({ method: request.method, path, body, headers: request.headers });
    const route = routes[`${request.method} ${path}`];
    if (!route) return new Response(JSON.stringify({ detail: "Not Found" }), { status: 404 });
    const { status = 200, json = {} } = route(body, url);
    return new Response(JSON.stringify(json), {
      status,
      headers: { "content-type": "application/json" },
    });
  }) as typeof fetch;
  return { fetch: fetchImpl, sent };
}

function flowRun(state: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    id: RUN,
    name: "20261127-101010-abcd",
    deployment_id: DEPLOYMENT,
    state: { type: state, name: state.charAt(0) + state.slice(1).toLowerCase(), message: null },
    ...extra,
  };
}

describe("connection", () => {
  it("needs PREFECT_API_URL, in one line", () => {
    const saved = process.env.PREFECT_API_URL;
    delete process.env.PREFECT_API_URL;
    try {
      assert.throws(
        () => new ClaudeCluster(),
        (error: ServerError) => {
          assert.ok(error instanceof ServerError);
          assert.match(error.oneLine(), /^PREFECT_API_URL is not set\. Set it to your Prefect server's API/);
          assert.ok(!error.oneLine().includes("\n"));
          return true;
        },
      );
    } finally {
      if (saved !== undefined) process.env.PREFECT_API_URL = saved;
    }
  });

  it("refuses a URL that is not http(s)", () => {
    assert.throws(() => new ClaudeCluster({ apiUrl: "ftp://x/api" }), /is not an http\(s\) URL/);
  });

  it("sends the auth string as basic auth, before an API key", async () => {
    const api = fakeApi({ [`GET /flow_runs/${RUN}`]: () => ({ json: flowRun("RUNNING") }), "POST /task_runs/filter": () => ({ json: [] }) });
    const cluster = new ClaudeCluster({ apiUrl: API, authString: "team:secret", apiKey: "key", fetch: api.fetch });
    await cluster.getRun(RUN);
    assert.equal(api.sent[0]?.headers.get("authorization"), `Basic ${Buffer.from("team:secret").toString("base64")}`);
  });

  it("says a server that does not answer does not answer", async () => {
    const refused = (async () => {
      throw new TypeError("fetch failed", { cause: new Error("connect ECONNREFUSED 127.0.0.1:9") });
    }) as typeof fetch;
    const cluster = new ClaudeCluster({ apiUrl: API, fetch: refused });
    await assert.rejects(cluster.getRun(RUN), (error: ServerError) => {
      assert.equal(
        error.oneLine(),
        `The Prefect server at PREFECT_API_URL=${API} does not answer (connect ECONNREFUSED 127.0.0.1:9). Start it (e.g. \`prefect server start\`) or fix the URL.`,
      );
      return true;
    });
  });

  it("waits out a passing 503", async () => {
    let calls = 0;
    const api = fakeApi({
      [`GET /flow_runs/${RUN}`]: () => (++calls < 3 ? { status: 503, json: { detail: "busy" } } : { json: flowRun("RUNNING") }),
      "POST /task_runs/filter": () => ({ json: [] }),
    });
    const run = await new ClaudeCluster({ apiUrl: API, fetch: api.fetch }).getRun(RUN);
    assert.equal(run.state, "RUNNING");
    assert.equal(calls, 3);
  });
});

describe("submitGoal", () => {
  const deployed = (): Record<string, Route> => ({
    "GET /deployments/name/claudecluster-goal/goal": () => ({ json: { id: DEPLOYMENT } }),
    [`POST /deployments/${DEPLOYMENT}/create_flow_run`]: () => ({ status: 201, json: flowRun("SCHEDULED") }),
  });

  it("creates a run of the goal deployment with the flow's parameters", async () => {
    const api = fakeApi(deployed());
    const cluster = new ClaudeCluster({ apiUrl: API, fetch: api.fetch });
    const run = await cluster.submitGoal({
      goal: "Add type hints",
      repo: "https://git.example.com/app.git",
      max_parallel: 4,
      settings: { model: "claude-sonnet-4-5", max_turns: 20 },
      tags: ["nightly"],
    });
    assert.equal(run.id, RUN);
    assert.equal(run.url, `http://prefect.test/runs/flow-run/${RUN}`);
    const created = api.sent.find((s) => s.path.endsWith("/create_flow_run"));
    assert.deepEqual(created?.body, {
      parameters: {
        goal: "Add type hints",
        repo: "https://git.example.com/app.git",
        max_parallel: 4,
        settings: { model: "claude-sonnet-4-5", max_turns: 20 },
      },
      tags: ["nightly"],
    });
  });

  it("reads a YAML plan file, and then needs no goal", async () => {
    const dir = mkdtempSync(join(tmpdir(), "plan-"));
    const path = join(dir, "plan.yaml");
    writeFileSync(path, "goal: Docs\ntasks:\n  - id: readme\n    title: README\n    prompt: Write it\n");
    const api = fakeApi(deployed());
    await new ClaudeCluster({ apiUrl: API, fetch: api.fetch }).submitGoal({ plan: path, repo: "/src/app" });
    const created = api.sent.find((s) => s.path.endsWith("/create_flow_run"));
    assert.deepEqual((created?.body as { parameters: unknown }).parameters, {
      goal: "",
      repo: "/src/app",
      plan: { goal: "Docs", tasks: [{ id: "readme", title: "README", prompt: "Write it" }] },
    });
  });

  it("refuses an empty goal with the CLI's line, before any request", async () => {
    const api = fakeApi(deployed());
    await assert.rejects(
      new ClaudeCluster({ apiUrl: API, fetch: api.fetch }).submitGoal({ goal: "  ", repo: "." }),
      (error: UsageError) => error instanceof UsageError && error.oneLine() === "the goal is empty. Say what the run should achieve." && error.exitCode === 2,
    );
    assert.equal(api.sent.length, 0);
  });

  it("says how to deploy when the goal deployment is missing", async () => {
    const api = fakeApi({});
    await assert.rejects(
      new ClaudeCluster({ apiUrl: API, fetch: api.fetch }).submitGoal({ goal: "x", repo: "." }),
      (error: UsageError) =>
        /^no deployment claudecluster-goal\/goal on the Prefect server at .*prefect deploy --all/.test(error.oneLine()),
    );
  });

  it("says a plan file that is not YAML is not YAML", async () => {
    const dir = mkdtempSync(join(tmpdir(), "plan-"));
    const path = join(dir, "plan.yaml");
    writeFileSync(path, "tasks: [unclosed\n");
    await assert.rejects(
      new ClaudeCluster({ apiUrl: API, fetch: fakeApi(deployed()).fetch }).submitGoal({ plan: path }),
      (error: UsageError) => error instanceof UsageError && /^the plan file .* is not YAML or JSON/.test(error.message),
    );
  });
});

describe("report", () => {
  const report = { run_id: "20261127-101010-abcd", status: "succeeded", tasks: [] };

  it("is the artifact the goal flow published", async () => {
    const api = fakeApi({
      [`GET /flow_runs/${RUN}`]: () => ({ json: flowRun("COMPLETED") }),
      "POST /artifacts/filter": () => ({ json: [{ type: constants.REPORT_ARTIFACT_TYPE, data: report }] }),
    });
    const got = await new ClaudeCluster({ apiUrl: API, fetch: api.fetch }).report(RUN);
    assert.deepEqual(got, report);
    const asked = api.sent.find((s) => s.path === "/artifacts/filter")?.body as Record<string, any>;
    assert.deepEqual(asked.artifacts, { flow_run_id: { any_: [RUN] }, type: { any_: ["claudecluster-run-report"] } });
  });

  it("of a run that never started is its one-line reason", async () => {
    const line = "the goal is empty. Say what the run should achieve.";
    const api = fakeApi({
      [`GET /flow_runs/${RUN}`]: () => ({ json: flowRun("FAILED", { state: { type: "FAILED", name: "Failed", message: line } }) }),
      "POST /artifacts/filter": () => ({ json: [] }),
    });
    await assert.rejects(
      new ClaudeCluster({ apiUrl: API, fetch: api.fetch }).report(RUN),
      (error: RunNotStartedError) => error instanceof RunNotStartedError && error.oneLine() === line,
    );
  });

  it("of a running run is not there yet", async () => {
    const api = fakeApi({
      [`GET /flow_runs/${RUN}`]: () => ({ json: flowRun("RUNNING") }),
      "POST /artifacts/filter": () => ({ json: [] }),
    });
    await assert.rejects(new ClaudeCluster({ apiUrl: API, fetch: api.fetch }).report(RUN), RunNotFinishedError);
  });

  it("of an unknown run says so", async () => {
    await assert.rejects(new ClaudeCluster({ apiUrl: API, fetch: fakeApi({}).fetch }).report(RUN), RunNotFoundError);
    await assert.rejects(new ClaudeCluster({ apiUrl: API, fetch: fakeApi({}).fetch }).report("my-run"), /is not a flow run id/);
  });
});

describe("cancel and resume", () => {
  /** A run whose state set_state changes, starting at `initial`. */
  function runIn(initial: string): { api: ReturnType<typeof fakeApi>; set: (state: string) => void } {
    let state = initial;
    const api = fakeApi({
      [`GET /flow_runs/${RUN}`]: () => ({ json: flowRun(state) }),
      [`POST /flow_runs/${RUN}/set_state`]: (body) => {
        state = (body as { state: { type: string } }).state.type;
        return { status: 201, json: { status: "ACCEPT" } };
      },
      "POST /task_runs/filter": () => ({ json: [] }),
    });
    return { api, set: (next) => (state = next) };
  }

  it("resume puts a failed deployment run back as Retry in the UI does", async () => {
    const { api } = runIn("FAILED");
    const run = await new ClaudeCluster({ apiUrl: API, fetch: api.fetch }).resume(RUN);
    assert.equal(run.state, "SCHEDULED");
    const set = api.sent.find((s) => s.path.endsWith("/set_state"))?.body as Record<string, any>;
    assert.equal(set.state.name, "AwaitingRetry");
    assert.equal(set.force, true);
  });

  it("resume of a run the CLI hosted says where to resume it", async () => {
    const api = fakeApi({ [`GET /flow_runs/${RUN}`]: () => ({ json: flowRun("FAILED", { deployment_id: null }) }) });
    await assert.rejects(
      new ClaudeCluster({ apiUrl: API, fetch: api.fetch }).resume(RUN),
      (error: UsageError) => error.oneLine().endsWith("claudecluster resume 20261127-101010-abcd"),
    );
  });

  it("resume of a run that succeeded is refused, and sends nothing", async () => {
    const { api } = runIn("COMPLETED");
    await assert.rejects(new ClaudeCluster({ apiUrl: API, fetch: api.fetch }).resume(RUN), /already completed/);
    assert.ok(!api.sent.some((s) => s.path.endsWith("/set_state")));
  });

  it("cancel of a finished run is refused; of a running one sets Cancelling", async () => {
    const { api, set } = runIn("COMPLETED");
    const cluster = new ClaudeCluster({ apiUrl: API, fetch: api.fetch });
    await assert.rejects(cluster.cancel(RUN), /already ended \(completed\)/);
    set("RUNNING");
    assert.equal((await cluster.cancel(RUN)).state, "CANCELLING");
  });
});

describe("TaskTable", () => {
  it("follows a run's progress events", () => {
    const table = new TaskTable();
    const event = (over: Partial<ProgressEvent>): ProgressEvent => ({
      run_id: "r", kind: "planned", total: 2, planned: ["a", "b"], done: [], running: [], failed: [],
      cost_usd: 0, task: null, message: "", ...over,
    });
    assert.deepEqual(table.update(event({})).map((r) => r.status), ["planned", "planned"]);
    assert.deepEqual(table.update(event({ kind: "started", running: ["a"] })).map((r) => r.status), ["running", "planned"]);
    const rows = table.update(
      event({
        kind: "finished", done: ["a"],
        task: { id: "a", status: "succeeded", turns: 3, cost_usd: 0.25, files: [{ path: "x", added: 1, removed: 0, change: "added" }] } as never,
      }),
    );
    assert.deepEqual(rows[0], { task: "a", status: "succeeded", turns: 3, cost_usd: 0.25, files: 1 });
  });
});

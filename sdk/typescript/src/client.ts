/**
 * The hand-written surface: submit a goal through the goal deployment, then read and steer
 * its run through Prefect's API alone (no file of the host that runs it).
 */
import { readFile } from "node:fs/promises";

import { parse as parseYaml } from "yaml";

import {
  ClaudeClusterError,
  RunNotFinishedError,
  RunNotFoundError,
  RunNotStartedError,
  UsageError,
} from "./errors.js";
import {
  constants,
  type GoalParameters,
  type Plan,
  type PullRequestInfo,
  type RunReport,
} from "./generated/claudecluster.js";
import {
  answer,
  connection,
  FINAL_STATES,
  restClient,
  type Artifact,
  type Connection,
  type FlowRun,
  type PrefectClient,
  type TaskRun,
} from "./prefect.js";
import { watch, type RunUpdate, type WatchOptions } from "./watch.js";

/** The goal deployment `prefect deploy --all --prefect-file deployments/prefect.yaml` creates. */
export const DEFAULT_DEPLOYMENT = `${constants.GOAL_FLOW}/goal`;

export interface ClaudeClusterOptions {
  /** The Prefect server's API URL; default PREFECT_API_URL. */
  apiUrl?: string;
  /** The server's basic-auth string ("user:password"); default PREFECT_API_AUTH_STRING. */
  authString?: string;
  /** An API key (Prefect Cloud); default PREFECT_API_KEY. */
  apiKey?: string;
  /** The goal deployment, "FLOW/DEPLOYMENT"; default "claudecluster-goal/goal". */
  deployment?: string;
  /** The fetch to use (tests pass their own). */
  fetch?: typeof fetch;
}

/**
 * What submitGoal takes: the goal flow's parameters (the same as `claudecluster run`'s
 * options, and the deployment's form), with the goal optional when a plan is given.
 */
export type SubmitGoal = Omit<GoalParameters, "goal" | "plan"> & {
  /** What the run should achieve; may be empty with a plan (its goal is used). */
  goal?: string;
  /** A plan to run instead of asking the planner: the object, or a YAML/JSON plan file's path. */
  plan?: Plan | string | null;
  /** Extra tags for the flow run. */
  tags?: string[];
};

/** A submitted goal run. */
export interface SubmittedRun {
  /** The flow run id: what every other method takes. */
  id: string;
  /** The run's page in the Prefect UI. */
  url: string;
}

/** A goal run as Prefect sees it now. */
export interface RunInfo {
  id: string;
  /** The run id (the flow run's name once it started): branches are named after it. */
  runId: string;
  /** SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CANCELLING, CANCELLED, CRASHED, PAUSED. */
  state: string;
  /** The state's name (e.g. AwaitingRetry, Late). */
  stateName: string;
  /** The state's message: for a run that did not start, why (the CLI's line). */
  message: string | null;
  /** True once the run is in a final state. */
  final: boolean;
  /** The run's page in the Prefect UI. */
  url: string;
  /** The goal deployment's id, or null for a run the CLI hosted. */
  deploymentId: string | null;
  /** Its task runs (planner, workers, integration) and their states. */
  tasks: { name: string; state: string }[];
}

/** One artifact of a run (diffs, test reports, the task table, the summary, the report). */
export interface RunArtifact {
  key: string | null;
  type: string | null;
  description: string | null;
  data: unknown;
  created: string | null;
  flowRunId: string | null;
  taskRunId: string | null;
}

export class ClaudeCluster {
  readonly connection: Connection;
  readonly deployment: string;
  private readonly api: PrefectClient;

  constructor(options: ClaudeClusterOptions = {}) {
    this.connection = connection(options);
    this.deployment = options.deployment ?? DEFAULT_DEPLOYMENT;
    if (!/^[^/]+\/[^/]+$/.test(this.deployment)) {
      throw new UsageError(`deployment ${JSON.stringify(this.deployment)} is not FLOW/DEPLOYMENT`, {
        hint: `Pass the goal deployment's full name, e.g. ${DEFAULT_DEPLOYMENT}.`,
      });
    }
    this.api = restClient(this.connection, options.fetch);
  }

  /** The UI page of a flow run. */
  runUrl(id: string): string {
    return `${this.connection.apiUrl.replace(/\/api$/, "")}/runs/flow-run/${id}`;
  }

  /** Start a goal as a run of the goal deployment; returns once Prefect created the run. */
  async submitGoal(goal: SubmitGoal): Promise<SubmittedRun> {
    const { tags, plan, ...rest } = goal;
    const parameters: Record<string, unknown> = { ...rest, goal: goal.goal ?? "" };
    if (typeof plan === "string") parameters.plan = await loadPlan(plan);
    else if (plan) parameters.plan = plan;
    if (!String(parameters.goal).trim() && !parameters.plan) {
      throw new UsageError("the goal is empty", { hint: "Say what the run should achieve." });
    }
    const [flowName, deploymentName] = this.deployment.split("/") as [string, string];
    const found = await this.api.GET("/deployments/name/{flow_name}/{deployment_name}", {
      params: { path: { flow_name: flowName, deployment_name: deploymentName } },
    });
    if (found.response.status === 404) {
      throw new UsageError(
        `no deployment ${this.deployment} on the Prefect server at ${this.connection.apiUrl}`,
        {
          hint:
            "Deploy it: `claudecluster setup` then " +
            "`prefect deploy --all --prefect-file deployments/prefect.yaml`.",
        },
      );
    }
    const deployment = answer(this.connection, "reading the goal deployment", found);
    const created = await this.api.POST("/deployments/{id}/create_flow_run", {
      params: { path: { id: deployment.id } },
      body: { parameters, ...(tags ? { tags } : {}) },
    });
    if (created.response.status === 409 || created.response.status === 422) {
      const detail = JSON.stringify((created.error as { detail?: unknown })?.detail ?? "");
      throw new UsageError(`the goal deployment refused the parameters: ${detail.slice(0, 300)}`, {
        hint: "Check them against the deployment's form (the goal flow's parameters).",
      });
    }
    const run = answer(this.connection, "creating the goal's flow run", created);
    return { id: run.id, url: this.runUrl(run.id) };
  }

  /** The run's state and its task runs. */
  async getRun(id: string): Promise<RunInfo> {
    const run = await this.flowRun(id);
    const taskRuns = answer(
      this.connection,
      "reading the run's task runs",
      await this.api.POST("/task_runs/filter", {
        body: { flow_runs: { id: { any_: [id] } }, sort: "EXPECTED_START_TIME_ASC", limit: 200 },
      }),
    ) as TaskRun[];
    const state = run.state?.type ?? "SCHEDULED";
    return {
      id: run.id,
      runId: run.name ?? "",
      state,
      stateName: run.state?.name ?? state,
      message: run.state?.message ?? null,
      final: FINAL_STATES.has(state),
      url: this.runUrl(run.id),
      deploymentId: run.deployment_id ?? null,
      tasks: taskRuns.map((t) => ({ name: t.name ?? "", state: t.state?.type ?? "PENDING" })),
    };
  }

  /**
   * The run's task states, progress and logs as they happen (Prefect's events and logs
   * websockets), ending with its final state.
   */
  watchRun(id: string, options: WatchOptions = {}): AsyncIterable<RunUpdate> {
    return watch(this.connection, this.api, id, options);
  }

  /**
   * The run's RunReport, as the goal flow published it (the artifact of type
   * "claudecluster-run-report"). With `wait`, waits for the run to end first.
   */
  async report(id: string, options: { wait?: boolean; signal?: AbortSignal } = {}): Promise<RunReport> {
    let run = await this.flowRun(id);
    if (options.wait) {
      for await (const update of this.watchRun(id, { logs: false, signal: options.signal })) {
        void update; // the watch ends at the final state
      }
      run = await this.flowRun(id);
    }
    const found = await this.reportArtifact(id);
    if (found) return found;
    const state = run.state?.type ?? "SCHEDULED";
    if (!FINAL_STATES.has(state)) throw new RunNotFinishedError(id, state);
    if (state === "FAILED" || state === "CRASHED") {
      throw new RunNotStartedError(id, run.state?.message ?? "");
    }
    throw new ClaudeClusterError(`run ${id} ended ${state.toLowerCase()} without a report`, {
      hint: "It was stopped before it finished; resume(id) runs what is left.",
    });
  }

  /** Every artifact of the run and of its worker runs, oldest first. */
  async artifacts(id: string): Promise<RunArtifact[]> {
    await this.flowRun(id);
    const runs = [id, ...(await this.childRuns(id))];
    const found = answer(
      this.connection,
      "reading the run's artifacts",
      await this.api.POST("/artifacts/filter", {
        body: { artifacts: { flow_run_id: { any_: runs } }, sort: "CREATED_DESC", limit: 200 },
      }),
    ) as Artifact[];
    return found.reverse().map((a) => ({
      key: a.key ?? null,
      type: a.type ?? null,
      description: a.description ?? null,
      data: a.data ?? null,
      created: a.created ?? null,
      flowRunId: a.flow_run_id ?? null,
      taskRunId: a.task_run_id ?? null,
    }));
  }

  /** Cancel the run: its sessions stop, its worker runs are cancelled, its branches are kept. */
  async cancel(id: string): Promise<RunInfo> {
    const run = await this.flowRun(id);
    const state = run.state?.type ?? "SCHEDULED";
    if (FINAL_STATES.has(state)) {
      throw new UsageError(`run ${id} already ended (${state.toLowerCase()})`, {
        hint: "Only a scheduled or running run can be cancelled.",
      });
    }
    await this.setState(id, { type: "CANCELLING", name: "Cancelling", message: "cancelled through the ClaudeCluster SDK" });
    return this.getRun(id);
  }

  /**
   * Run the run again, as Retry in the UI does: a worker of the goal deployment takes the same
   * flow run, and only what failed or never ran runs again (finished tasks are reused).
   */
  async resume(id: string): Promise<RunInfo> {
    const run = await this.flowRun(id);
    const state = run.state?.type ?? "SCHEDULED";
    if (!FINAL_STATES.has(state)) {
      throw new UsageError(`run ${id} has not ended (${state.toLowerCase()})`, {
        hint: "Resume a run that failed, crashed or was cancelled.",
      });
    }
    if (state === "COMPLETED") {
      throw new UsageError(`run ${id} already completed`, {
        hint: "Nothing in it failed, so nothing would run again; submit the goal again instead.",
      });
    }
    if (!run.deployment_id) {
      throw new UsageError(`run ${run.name} was started by \`claudecluster run\`, not a deployment`, {
        hint: `Resume it on the machine that ran it: claudecluster resume ${run.name}`,
      });
    }
    await this.setState(id, { type: "SCHEDULED", name: "AwaitingRetry", message: "resumed through the ClaudeCluster SDK" });
    return this.getRun(id);
  }

  /** The pull request the run opened or updated (run with pr: "draft" or "ready"), if any. */
  async pullRequest(id: string, options: { wait?: boolean } = {}): Promise<PullRequestInfo | null> {
    return (await this.report(id, options)).pull_request ?? null;
  }

  private async flowRun(id: string): Promise<FlowRun> {
    if (!/^[0-9a-f-]{36}$/i.test(id)) {
      throw new UsageError(`${JSON.stringify(id)} is not a flow run id`, {
        hint: "Pass the id submitGoal() returned (a UUID), not the run's name.",
      });
    }
    const result = await this.api.GET("/flow_runs/{id}", { params: { path: { id } } });
    if (result.response.status === 404) throw new RunNotFoundError(id, this.connection.apiUrl);
    return answer(this.connection, "reading the run", result) as FlowRun;
  }

  private async childRuns(id: string): Promise<string[]> {
    const children = answer(
      this.connection,
      "reading the run's worker runs",
      await this.api.POST("/flow_runs/filter", {
        body: { flow_runs: { parent_flow_run_id: { any_: [id] } }, limit: 200 },
      }),
    ) as FlowRun[];
    return children.map((c) => c.id);
  }

  private async reportArtifact(id: string): Promise<RunReport | null> {
    const found = answer(
      this.connection,
      "reading the run's report",
      await this.api.POST("/artifacts/filter", {
        body: {
          artifacts: {
            flow_run_id: { any_: [id] },
            type: { any_: [constants.REPORT_ARTIFACT_TYPE] },
          },
          sort: "CREATED_DESC",
          limit: 1,
        },
      }),
    ) as Artifact[];
    const data = found[0]?.data;
    if (data === undefined || data === null) return null;
    return (typeof data === "string" ? JSON.parse(data) : data) as RunReport;
  }

  private async setState(
    id: string,
    state: { type: "CANCELLING" | "SCHEDULED"; name: string; message: string },
  ): Promise<void> {
    answer(
      this.connection,
      `setting the run's state to ${state.name}`,
      await this.api.POST("/flow_runs/{id}/set_state", {
        params: { path: { id } },
        body: { state, force: true },
      }),
    );
  }
}

/** A plan file (YAML or JSON, the CLI's --plan format) as a Plan. */
export async function loadPlan(path: string): Promise<Plan> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    throw new UsageError(`cannot read the plan file ${path}: ${(error as Error).message}`, {
      hint: "Pass the path of a YAML or JSON plan file.",
    });
  }
  let plan: unknown;
  try {
    plan = parseYaml(text);
  } catch (error) {
    throw new UsageError(`the plan file ${path} is not YAML or JSON: ${(error as Error).message.split("\n")[0]}`, {
      hint: "Fix the file; `claudecluster plan GOAL --repo .` writes one to start from.",
    });
  }
  if (typeof plan !== "object" || plan === null || !Array.isArray((plan as Plan).tasks)) {
    throw new UsageError(`the plan file ${path} has no list of tasks`, {
      hint: "A plan is a mapping with `goal` and `tasks` (see the README's plan file section).",
    });
  }
  return plan as Plan;
}

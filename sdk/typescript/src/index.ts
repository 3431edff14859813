/**
 * @claudecluster/sdk: submit, watch and read ClaudeCluster goals from Node.
 *
 * ```ts
 * import { ClaudeCluster } from "@claudecluster/sdk";
 * const cluster = new ClaudeCluster(); // PREFECT_API_URL, PREFECT_API_AUTH_STRING
 * const run = await cluster.submitGoal({ goal: "Add type hints", repo: "/src/app" });
 * for await (const update of cluster.watchRun(run.id)) console.log(update.kind);
 * console.log((await cluster.report(run.id)).status);
 * ```
 */
export {
  ClaudeCluster,
  DEFAULT_DEPLOYMENT,
  loadPlan,
  type ClaudeClusterOptions,
  type RunArtifact,
  type RunInfo,
  type SubmitGoal,
  type SubmittedRun,
} from "./client.js";
export {
  ClaudeClusterError,
  RunNotFinishedError,
  RunNotFoundError,
  RunNotStartedError,
  ServerError,
  UsageError,
} from "./errors.js";
export * from "./generated/claudecluster.js";
export type { components as PrefectComponents, paths as PrefectPaths } from "./generated/prefect.js";
export { TaskTable, type TaskRow } from "./tasks.js";
export type { RunUpdate, WatchOptions } from "./watch.js";

// Submit the demo goal through the goal deployment and print its task table as it runs.
// PREFECT_API_URL (and PREFECT_API_AUTH_STRING, if the server has one) come from the environment.
import { ClaudeCluster } from "@claudecluster/sdk";

const cluster = new ClaudeCluster();
const run = await cluster.submitGoal({
  goal: "Document the inventory package, refactor its rounding, and cover pricing with tests",
  repo: process.argv[2],
  max_parallel: 3,
});
console.log(`submitted: ${run.url}`);

for await (const update of cluster.watchRun(run.id, { logs: false })) {
  if (update.kind === "progress") console.table(update.tasks);
  if (update.kind === "state") console.log(`run ${update.state.toLowerCase()}`);
}

const report = await cluster.report(run.id);
const { status, tasks, integration_branch, totals } = report;
console.log(`${status}: ${tasks.length} tasks on ${integration_branch}, $${totals.cost_usd.toFixed(2)}`);

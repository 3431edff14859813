/** A goal's task table, kept up to date from its progress events. */
import type { ProgressEvent, TaskStatus } from "./generated/claudecluster.js";

/** One row of a run's task table. */
export interface TaskRow {
  /** The task id (as in the plan). */
  task: string;
  /** planned, running, or how it ended (succeeded, failed, skipped, ...). */
  status: "planned" | "running" | TaskStatus;
  /** Conversation turns its session took (once it ended). */
  turns: number | null;
  /** What it cost, in USD (once it ended). */
  cost_usd: number | null;
  /** Files it changed (once it ended). */
  files: number | null;
}

export class TaskTable {
  private readonly rows = new Map<string, TaskRow>();

  /** Take in one progress event; returns the table as it now stands. */
  update(event: ProgressEvent): TaskRow[] {
    for (const id of event.planned) this.row(id);
    for (const id of event.running) this.row(id).status = "running";
    const result = event.task;
    if (event.kind === "finished" && result) {
      Object.assign(this.row(result.id), {
        status: result.status,
        turns: result.turns,
        cost_usd: result.cost_usd,
        files: result.files.length,
      });
    }
    return this.snapshot();
  }

  snapshot(): TaskRow[] {
    return [...this.rows.values()].map((row) => ({ ...row }));
  }

  private row(id: string): TaskRow {
    let row = this.rows.get(id);
    if (!row) {
      row = { task: id, status: "planned", turns: null, cost_usd: null, files: null };
      this.rows.set(id, row);
    }
    return row;
  }
}

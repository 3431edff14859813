/**
 * The SDK's errors: one hierarchy, each with the one-line message the CLI prints.
 *
 * Errors that ClaudeCluster's Python code raised inside a run (an empty goal, an unknown
 * pool, a missing repository) reach the SDK as the run's state message, which is that
 * error's one line already; errors of the SDK's own checks mirror the CLI's wording.
 */

/** Base of every error the SDK throws on purpose. */
export class ClaudeClusterError extends Error {
  /** What to do about it, when there is something to do. */
  readonly hint: string | undefined;
  /** The exit code the CLI uses for the same error (1 failure, 2 bad input). */
  readonly exitCode: number = 1;

  constructor(message: string, options: { hint?: string; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.hint = options.hint;
  }

  /** The message and the hint on one line, as the CLI prints it. */
  oneLine(): string {
    const text = this.message.replace(/\.+$/, "");
    return this.hint ? `${text}. ${this.hint}` : `${text}.`;
  }
}

/** Bad input: nothing was submitted or changed (the CLI exits 2). */
export class UsageError extends ClaudeClusterError {
  override readonly exitCode = 2;
}

/** No goal run with that id on this server. */
export class RunNotFoundError extends UsageError {
  constructor(readonly runId: string, apiUrl: string) {
    super(`no goal run ${runId} on the Prefect server at ${apiUrl}`, {
      hint: "Check the id: submitGoal() returns it, and the run's page in the UI ends with it.",
    });
  }
}

/** The Prefect server does not answer, answers an error, or lacks what the SDK needs. */
export class ServerError extends ClaudeClusterError {
  constructor(
    message: string,
    options: { hint?: string; cause?: unknown; status?: number } = {},
  ) {
    super(message, options);
    this.status = options.status;
  }
  /** The HTTP status, when the server answered. */
  readonly status: number | undefined;
}

/** The run failed before any model request; its message says why (the same line as the CLI). */
export class RunNotStartedError extends ClaudeClusterError {
  constructor(readonly runId: string, stateMessage: string) {
    super(stateMessage.trim() || `run ${runId} failed before it started`);
  }

  override oneLine(): string {
    // The state message is already the Python error's one line (message and hint).
    return this.message;
  }
}

/** The run has not ended yet, so it has no report. */
export class RunNotFinishedError extends ClaudeClusterError {
  constructor(readonly runId: string, readonly state: string) {
    super(`run ${runId} is still ${state.toLowerCase()}, so it has no report yet`, {
      hint: "Wait for it: report(id, { wait: true }) or watchRun(id).",
    });
  }
}

/**
 * Watching a run: Prefect's events websocket (the goal's state, its task runs' states, and
 * ClaudeCluster's progress events) and its logs websocket, merged into one async stream that
 * ends with the run's final state.
 */
import WebSocket from "ws";

import { ServerError } from "./errors.js";
import { constants, type ProgressEvent } from "./generated/claudecluster.js";
import {
  answer,
  FINAL_STATES,
  type Connection,
  type FlowRun,
  type Log,
  type PrefectClient,
  type PrefectEvent,
} from "./prefect.js";
import { TaskTable, type TaskRow } from "./tasks.js";

export type RunUpdate =
  | {
      /** The goal run's own state changed; the last update is its final state. */
      kind: "state";
      state: string;
      stateName: string;
      message: string | null;
      final: boolean;
      at: string;
    }
  | {
      /** A task run of the goal changed state (planner, workers, integration). */
      kind: "task";
      task: string;
      state: string;
      at: string;
    }
  | {
      /** ClaudeCluster's progress: planned, started, finished, integrating, done. */
      kind: "progress";
      progress: ProgressEvent;
      /** The task table after this event. */
      tasks: TaskRow[];
      at: string;
    }
  | {
      /** A log line of the goal or of one of its worker runs. */
      kind: "log";
      log: Log;
      at: string;
    };

export interface WatchOptions {
  /** Stream the run's logs too (default true). */
  logs?: boolean;
  /** Stop watching (the iteration ends). */
  signal?: AbortSignal | undefined;
  /**
   * How often the run's state and new log lines are also read over REST (ms, default 2000):
   * a server without Prefect's log streaming (off by default, and on ClaudeCluster's
   * embedded server) sends no logs over the websocket, and an event can be late.
   */
  pollMs?: number;
}

const RECONNECT_FOR_MS = 30_000;

class Queue<T> {
  private items: T[] = [];
  private waiting: ((value: IteratorResult<T>) => void) | null = null;
  private failed: ((error: unknown) => void) | null = null;
  private done = false;
  private error: unknown = null;

  push(item: T): void {
    if (this.done) return;
    if (this.waiting) {
      const resolve = this.waiting;
      this.waiting = this.failed = null;
      resolve({ value: item, done: false });
    } else this.items.push(item);
  }

  close(error: unknown = null): void {
    if (this.done) return;
    this.done = true;
    this.error = error;
    if (this.waiting) {
      const [resolve, reject] = [this.waiting, this.failed];
      this.waiting = this.failed = null;
      if (error && reject) reject(error);
      else resolve({ value: undefined, done: true });
    }
  }

  next(): Promise<IteratorResult<T>> {
    const item = this.items.shift();
    if (item !== undefined) return Promise.resolve({ value: item, done: false });
    if (this.done) {
      return this.error ? Promise.reject(this.error) : Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => {
      this.waiting = resolve;
      this.failed = reject;
    });
  }
}

/** A Prefect websocket: the "prefect" subprotocol, the auth message, then one filter. */
function subscribe(
  conn: Connection,
  path: "/events/out" | "/logs/out",
  filter: Record<string, unknown>,
  onMessage: (message: { type: string; event?: PrefectEvent; log?: Log }) => void,
  onClose: (error: Error | null) => void,
): WebSocket {
  const url = conn.apiUrl.replace(/^http/, "ws") + path;
  const socket = new WebSocket(url, ["prefect"], { headers: conn.headers });
  let authenticated = false;
  socket.on("open", () => socket.send(JSON.stringify({ type: "auth", token: conn.token })));
  socket.on("message", (raw) => {
    const message = JSON.parse(raw.toString()) as { type: string; event?: PrefectEvent; log?: Log };
    if (!authenticated) {
      if (message.type !== "auth_success") {
        socket.close();
        return;
      }
      authenticated = true;
      socket.send(JSON.stringify({ type: "filter", ...filter }));
      return;
    }
    onMessage(message);
  });
  socket.on("close", (code, reason) => {
    const normal = code === 1000 || code === 1005;
    onClose(
      normal && authenticated
        ? null
        : new ServerError(
            `the Prefect server at PREFECT_API_URL=${conn.apiUrl} closed the ${path} websocket` +
              ` (${code}${reason.length ? `: ${reason.toString()}` : ""})`,
            {
              hint:
                code === 1008
                  ? "Set PREFECT_API_AUTH_STRING (or PREFECT_API_KEY) to what the server expects."
                  : "Check the server's logs.",
            },
          ),
    );
  });
  socket.on("error", () => {
    /* reported by "close" */
  });
  return socket;
}

/** The run's state as the server holds it, as an update. */
function stateUpdate(run: FlowRun, final: boolean): RunUpdate {
  const state = run.state?.type ?? "SCHEDULED";
  return {
    kind: "state",
    state,
    stateName: run.state?.name ?? state,
    message: run.state?.message ?? null,
    final,
    at: run.state?.timestamp ?? new Date().toISOString(),
  };
}

export function watch(
  conn: Connection,
  api: PrefectClient,
  id: string,
  options: WatchOptions,
): AsyncIterable<RunUpdate> {
  return {
    [Symbol.asyncIterator](): AsyncIterator<RunUpdate> {
      const queue = new Queue<RunUpdate>();
      const seen = new Set<string>();
      const table = new TaskTable();
      const logRuns = new Set<string>([id]);
      const seenLogs = new Set<string>();
      let lastLogAt = "";
      const sockets = new Set<WebSocket>();
      let logSocket: WebSocket | null = null;
      let since = "";
      let finished = false;
      let lastContact = Date.now();
      let poller: NodeJS.Timeout | null = null;

      const stop = (error: unknown = null): void => {
        if (finished) return;
        finished = true;
        if (poller) clearInterval(poller);
        for (const socket of sockets) socket.close();
        queue.close(error);
      };
      let finishing = false;
      const finish = async (run: FlowRun): Promise<void> => {
        if (finishing) return;
        finishing = true;
        if (options.logs !== false) {
          // A log sent while a socket was being (re)opened is missed live: read what each run
          // logged once more (duplicates are dropped), so the stream holds every line.
          await followChildren().catch(() => {});
          await backfillLogs([...logRuns]).catch(() => {});
        }
        queue.push(stateUpdate(run, true));
        stop();
      };
      const readRun = async (): Promise<FlowRun> =>
        answer(conn, "reading the run", await api.GET("/flow_runs/{id}", { params: { path: { id } } }));

      const onEvent = (event: PrefectEvent): void => {
        if (seen.has(event.id) || finished) return;
        seen.add(event.id);
        since = event.occurred;
        const resource = event.resource as Record<string, string>;
        const name = event.event;
        if (name.startsWith(constants.PROGRESS_EVENT_PREFIX)) {
          const progress = event.payload as unknown as ProgressEvent;
          queue.push({ kind: "progress", progress, tasks: table.update(progress), at: event.occurred });
          if (progress.kind === "started" && options.logs !== false) follow();
        } else if (name.startsWith("prefect.task-run.")) {
          if (options.logs !== false) follow();
          queue.push({
            kind: "task",
            task: resource["prefect.resource.name"] ?? resource["prefect.resource.id"] ?? "",
            state: resource["prefect.state-type"] ?? name.split(".").pop() ?? "",
            at: event.occurred,
          });
        } else if (name.startsWith("prefect.flow-run.") && resource["prefect.resource.id"] === `prefect.flow-run.${id}`) {
          const state = resource["prefect.state-type"] ?? "";
          if (FINAL_STATES.has(state)) {
            // The state as the server holds it (its message included).
            readRun().then(finish, (error) => stop(error)).catch((error) => stop(error));
          } else {
            queue.push({
              kind: "state",
              state,
              stateName: resource["prefect.state-name"] ?? state,
              message: resource["prefect.state-message"] ?? null,
              final: false,
              at: event.occurred,
            });
          }
        }
      };

      const openEvents = (): void => {
        const filter = {
          filter: {
            any_resource: { id: [`prefect.flow-run.${id}`] },
            occurred: { since, until: new Date(Date.now() + 366 * 24 * 3600e3).toISOString() },
          },
          backfill: true,
        };
        const socket = subscribe(
          conn,
          "/events/out",
          filter,
          (message) => {
            lastContact = Date.now();
            if (message.type === "event" && message.event) onEvent(message.event);
          },
          (error) => {
            sockets.delete(socket);
            if (finished) return;
            // A replica restarting or a balancer dropping the socket: reconnect, with backfill
            // from the last event seen; give up after a while without contact.
            if (Date.now() - lastContact > RECONNECT_FOR_MS) stop(error ?? new ServerError("the events websocket closed"));
            else setTimeout(() => !finished && openEvents(), 1000);
          },
        );
        sockets.add(socket);
      };

      const openLogs = (): void => {
        if (logSocket) {
          sockets.delete(logSocket);
          logSocket.removeAllListeners("close");
          logSocket.close();
        }
        const socket = subscribe(
          conn,
          "/logs/out",
          { filter: { flow_run_id: { any_: [...logRuns] } } },
          (message) => {
            if (message.type === "log" && message.log) pushLog(message.log);
          },
          () => {
            sockets.delete(socket);
            if (!finished && logSocket === socket) setTimeout(() => !finished && openLogs(), 1000);
          },
        );
        logSocket = socket;
        sockets.add(socket);
      };

      // One lookup at a time: task events come in bursts.
      let following: Promise<void> | null = null;
      const follow = (): void => {
        following ??= followChildren()
          .catch(() => {})
          .finally(() => (following = null));
      };

      const pushLog = (log: Log): void => {
        const key = log.id ?? `${log.flow_run_id}:${log.timestamp}:${log.message}`;
        if (seenLogs.has(key)) return;
        seenLogs.add(key);
        if ((log.timestamp ?? "") > lastLogAt) lastLogAt = log.timestamp ?? lastLogAt;
        queue.push({ kind: "log", log, at: log.timestamp ?? "" });
      };

      // Worker runs on a pool are flow runs of their own: their logs need their ids. The logs
      // socket has no backfill, so what a new run logged before it was followed is read once.
      const followChildren = async (): Promise<void> => {
        const result = await api.POST("/flow_runs/filter", {
          body: { flow_runs: { parent_flow_run_id: { any_: [id] } }, limit: 200 },
        });
        if (!result.data || finished) return;
        const added = (result.data as FlowRun[]).map((c) => c.id).filter((c) => !logRuns.has(c));
        if (!added.length) return;
        for (const child of added) logRuns.add(child);
        openLogs();
        await backfillLogs(added);
      };

      // New lines since the newest one seen, one request at a time.
      let polling = false;
      const pollLogs = (): void => {
        if (polling || finished) return;
        polling = true;
        const since = lastLogAt ? { timestamp: { after_: lastLogAt } } : {};
        api
          .POST("/logs/filter", {
            body: {
              logs: { flow_run_id: { any_: [...logRuns] }, ...since },
              sort: "TIMESTAMP_ASC",
              limit: 200,
            },
          })
          .then((page) => {
            for (const log of (page.data ?? []) as Log[]) pushLog(log);
          })
          .catch(() => {})
          .finally(() => (polling = false));
      };

      const backfillLogs = async (runs: string[]): Promise<void> => {
        for (let offset = 0; ; offset += 200) {
          const page = await api.POST("/logs/filter", {
            body: { logs: { flow_run_id: { any_: runs } }, sort: "TIMESTAMP_ASC", limit: 200, offset },
          });
          const logs = (page.data ?? []) as Log[];
          for (const log of logs) pushLog(log);
          if (logs.length < 200 || finished) return;
        }
      };

      const start = async (): Promise<void> => {
        const run = await readRun();
        since = run.created ?? new Date(Date.now() - 60_000).toISOString();
        const state = run.state?.type ?? "SCHEDULED";
        if (FINAL_STATES.has(state)) {
          await finish(run);
          return;
        }
        queue.push(stateUpdate(run, false));
        openEvents();
        if (options.logs !== false) openLogs();
        poller = setInterval(() => {
          if (options.logs !== false) {
            follow();
            pollLogs();
          }
          readRun().then(
            (current) => {
              if (!finished && FINAL_STATES.has(current.state?.type ?? "")) {
                // The final event may still come; give it a moment before ending on REST's word.
                setTimeout(() => !finished && void finish(current), 2000);
              }
            },
            () => {
              /* a passing outage; the websockets report a lasting one */
            },
          );
        }, options.pollMs ?? 2000);
      };

      options.signal?.addEventListener("abort", () => stop(), { once: true });
      start().catch((error) => stop(error));
      return {
        next: () => queue.next(),
        return: async () => {
          stop();
          return { value: undefined, done: true };
        },
      };
    },
  };
}

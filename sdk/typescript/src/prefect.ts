/**
 * The one seam to the Prefect server's REST API: a typed openapi-fetch client whose failures
 * become the SDK's errors, with the CLI's wording.
 */
import createClient, { type Client } from "openapi-fetch";

import { ServerError } from "./errors.js";
import type { components, paths } from "./generated/prefect.js";

export type PrefectSchemas = components["schemas"];
export type FlowRun = PrefectSchemas["FlowRun"];
export type TaskRun = PrefectSchemas["TaskRun"];
export type Artifact = PrefectSchemas["Artifact"];
export type Log = PrefectSchemas["Log"];
export type PrefectEvent = PrefectSchemas["Event"];
export type StateType = PrefectSchemas["StateType"];

/** Final states: a run in one of these will not move on by itself. */
export const FINAL_STATES: ReadonlySet<string> = new Set([
  "COMPLETED",
  "FAILED",
  "CANCELLED",
  "CRASHED",
]);

// "Try again" answers (a load balancer between replicas, a database restarting): waited out
// for a while, as Prefect's own client does.
const RETRY_LATER = new Set([502, 503, 504]);
const RETRY_WINDOW_MS = 20_000;

export interface Connection {
  /** The server's API URL, ending in /api (PREFECT_API_URL). */
  readonly apiUrl: string;
  /** Headers that authenticate a request (PREFECT_API_AUTH_STRING or PREFECT_API_KEY). */
  readonly headers: Record<string, string>;
  /** The token of the websocket "auth" message, the same credential. */
  readonly token: string | null;
}

export function connection(options: {
  apiUrl?: string | undefined;
  authString?: string | undefined;
  apiKey?: string | undefined;
}): Connection {
  const raw = (options.apiUrl ?? process.env.PREFECT_API_URL ?? "").trim().replace(/\/+$/, "");
  if (!raw) {
    throw new ServerError("PREFECT_API_URL is not set", {
      hint:
        "Set it to your Prefect server's API, e.g. http://127.0.0.1:4200/api " +
        "(`claudecluster server url` prints the embedded server's), or pass apiUrl.",
    });
  }
  let url: URL | null = null;
  try {
    url = new URL(raw);
  } catch {
    // not a URL at all: the same error as a URL of another scheme
  }
  if (url?.protocol !== "http:" && url?.protocol !== "https:") {
    throw new ServerError(`PREFECT_API_URL ${JSON.stringify(raw)} is not an http(s) URL`, {
      hint: "Set it to your server's API, e.g. http://127.0.0.1:4200/api.",
    });
  }
  const authString = options.authString ?? process.env.PREFECT_API_AUTH_STRING;
  const apiKey = options.apiKey ?? process.env.PREFECT_API_KEY;
  const headers: Record<string, string> = {};
  // Same precedence as Prefect's Python client.
  if (authString) headers.Authorization = `Basic ${Buffer.from(authString).toString("base64")}`;
  else if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  return { apiUrl: raw, headers, token: authString || apiKey || null };
}

export type PrefectClient = Client<paths>;

/** The typed REST client; every request waits out a passing 502/503/504. */
export function restClient(conn: Connection, fetchImpl: typeof fetch = fetch): PrefectClient {
  const retrying: typeof fetch = async (input, init) => {
    const deadline = Date.now() + RETRY_WINDOW_MS;
    let delay = 500;
    for (;;) {
      // A Request's body can be read once: each try sends a copy.
      const request = input instanceof Request ? input.clone() : input;
      let response: Response;
      try {
        response = await fetchImpl(request, init);
      } catch (error) {
        throw unreachable(conn, error);
      }
      if (!RETRY_LATER.has(response.status) || Date.now() + delay > deadline) return response;
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 4000);
    }
  };
  return createClient<paths>({ baseUrl: conn.apiUrl, headers: conn.headers, fetch: retrying });
}

export function unreachable(conn: Connection, error: unknown): ServerError {
  const cause = error instanceof Error ? ((error.cause as Error | undefined) ?? error) : error;
  const detail = cause instanceof Error ? cause.message : String(cause);
  return new ServerError(
    `The Prefect server at PREFECT_API_URL=${conn.apiUrl} does not answer (${detail})`,
    {
      hint: "Start it (e.g. `prefect server start`) or fix the URL.",
      cause: error,
    },
  );
}

/** The data of an answer, or the SDK's error for a failed one. */
export function answer<T>(
  conn: Connection,
  what: string,
  result: { data?: T; error?: unknown; response: Response },
): T {
  const { response } = result;
  if (response.ok && result.data !== undefined) return result.data;
  const status = response.status;
  if (status === 401 || status === 403) {
    throw new ServerError(
      `The Prefect server at PREFECT_API_URL=${conn.apiUrl} refused the credentials (HTTP ${status})`,
      {
        hint: "Set PREFECT_API_AUTH_STRING (or PREFECT_API_KEY) to what the server expects.",
        status,
      },
    );
  }
  const detail = describe(result.error) ?? response.statusText;
  if (status >= 500) {
    throw new ServerError(
      `The Prefect server at PREFECT_API_URL=${conn.apiUrl} is unhealthy (HTTP ${status}: ${detail})`,
      { hint: "Check the server's logs.", status },
    );
  }
  throw new ServerError(`${what} failed: HTTP ${status}: ${detail}`, { status });
}

function describe(error: unknown): string | undefined {
  if (error === undefined || error === null) return undefined;
  if (typeof error === "string") return error;
  const detail = (error as { detail?: unknown }).detail;
  if (typeof detail === "string") return detail;
  return JSON.stringify(detail ?? error).slice(0, 300);
}

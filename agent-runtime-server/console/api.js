// The console's only way to the server: the documented HTTP API with the tab's token, and a small
// server-sent-events reader for POST streams (EventSource can neither POST nor send the header).

/** `/api/v1` when the console was opened under that prefix, so its calls use the same spelling. */
export const BASE = location.pathname.startsWith("/api/v1/") ? "/api/v1" : "";

const TOKEN_KEY = "agent-runtime.token";

/** The token kept for this tab (empty when none was given: the server may have auth off). */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY) ?? "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** An error answer of the API: its status, stable code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(`${code}: ${message}`);
    this.status = status;
    this.code = code;
    this.detail = message;
  }
}

function headers(extra = {}, tok = token()) {
  const h = { ...extra };
  if (tok) h["x-internal-auth"] = tok;
  return h;
}

async function failure(response) {
  let code = `HTTP_${response.status}`;
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch {
    // Not the API's error shape (a proxy in between?): keep the status line.
  }
  return new ApiError(response.status, code, message);
}

/** One JSON call. `tok` overrides the stored token (the login form checks a candidate with it). */
export async function call(method, path, body, tok) {
  const init = { method, headers: headers(body === undefined ? {} : { "content-type": "application/json" }, tok) };
  if (body !== undefined) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(BASE + path, init);
  } catch (e) {
    throw new ApiError(0, "NETWORK", `the server cannot be reached (${e.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response.json();
}

export const get = (path, tok) => call("GET", path, undefined, tok);
export const post = (path, body) => call("POST", path, body ?? {});
export const del = (path) => call("DELETE", path);

/**
 * Reads a `text/event-stream` body: calls `onEvent(event)` with each `data:` JSON (its `seq` from
 * the `id:` line when the JSON lacks one). Resolves when the stream ends.
 */
export async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let id = null;
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") data.push(val);
        else if (field === "id") id = val;
      }
      if (data.length === 0) continue;
      const event = JSON.parse(data.join("\n"));
      if (event.seq === undefined && id !== null) event.seq = Number(id);
      onEvent(event);
    }
  }
}

/** POSTs `body` to a streaming route and feeds its events to `onEvent`; HTTP errors throw. */
export async function stream(path, body, onEvent) {
  let response;
  try {
    response = await fetch(BASE + path, {
      method: "POST",
      headers: headers({ "content-type": "application/json", accept: "text/event-stream" }),
      body: JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, "NETWORK", `the server cannot be reached (${e.message})`);
  }
  if (!response.ok) throw await failure(response);
  await readEvents(response, onEvent);
}

/**
 * Follows a session's events for as long as `signal` is not aborted: replays those after
 * `lastSeq()` and follows live ones; after a drop it reconnects with `Last-Event-ID`, so nothing is
 * missed and nothing comes twice. `onState` hears "live", "reconnecting" or an ApiError.
 */
export async function follow(sessionId, lastSeq, onEvent, onState, signal) {
  let delay = 250;
  while (!signal.aborted) {
    try {
      const response = await fetch(
        `${BASE}/sessions/${encodeURIComponent(sessionId)}/events?follow=true`,
        { headers: headers({ "last-event-id": String(lastSeq()), accept: "text/event-stream" }), signal },
      );
      if (!response.ok) {
        const e = await failure(response);
        onState(e);
        if (e.status === 401 || e.status === 404) return;
      } else {
        onState("live");
        delay = 250;
        await readEvents(response, onEvent);
      }
    } catch (e) {
      if (signal.aborted) return;
    }
    onState("reconnecting");
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 5000);
  }
}
